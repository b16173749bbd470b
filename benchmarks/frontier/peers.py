"""The other ComfyUI caching packs, side by side with ours (`make bench-peers`).

Each pack is run from its own checkout at a pinned commit (never copied into this project), loaded
by the host's own custom-node loader, and each of its caching nodes is put where our Apply Feature
Cache was and swept over its main threshold, with the model type its node needs for each case.
`--peers DIR` (`make bench-peers`: $FC_PEERS_DIR, else .peers/) takes the checkouts in DIR and
clones the pinned commit of each pack that is absent there.
Left out: AccelDiff's sampler-level methods (AdaptiveDiff, EasyCache, SADA, ZEUS), which return a
SAMPLER for a custom-sampler graph, not a MODEL for the KSampler graphs of the cases; its TeaCache
and MagCache model methods, which port the dedicated packs measured here.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess

import torch

from benchmarks.frontier.methods import Method, Param, failing_method, node_method


@dataclasses.dataclass(frozen=True)
class PeerNode:
    node: str  # node class
    label: str  # method name after "PACK:"
    threshold: str  # the input swept
    values: dict  # model family ("wan", "flux") -> swept values
    inputs: dict = dataclasses.field(default_factory=dict)  # fixed inputs
    family_inputs: dict = dataclasses.field(default_factory=dict)  # model family -> fixed inputs


@dataclasses.dataclass(frozen=True)
class Peer:
    repo: str  # owner/name on GitHub
    commit: str
    nodes: tuple

    @property
    def folder(self) -> str:
        return self.repo.split("/")[1]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


WAN_TEACACHE = "wan2.1_t2v_1.3B"
PEERS = (
    Peer("welltop-cn/ComfyUI-TeaCache", "91dff8e31684ca70a5fda309611484402d8fa192", (
        PeerNode("TeaCache", "TeaCache", "rel_l1_thresh",
                 {"wan": (0.05, 0.1, 0.2, 0.4), "flux": (0.2, 0.4, 0.6, 0.8)}, {"cache_device": _device()},
                 {"wan": {"model_type": WAN_TEACACHE}, "flux": {"model_type": "flux"}}),)),
    Peer("Zehong-Ma/ComfyUI-MagCache", "47bdd2aca97e568087c4e92d2d2f0426bdce7a37", (
        # the authors' fast setting for Wan 1.3B (K 4); their Flux default K is 5
        PeerNode("MagCache", "MagCache", "magcache_thresh", {"wan": (0.03, 0.06, 0.12, 0.24),
                                                              "flux": (0.06, 0.12, 0.24, 0.3)},
                 {}, {"wan": {"model_type": "wan2.1_t2v_1.3B", "magcache_K": 4},
                      "flux": {"model_type": "flux", "magcache_K": 5}}),)),
    Peer("philipy1219/ComfyUI-TaylorSeer", "94dc45db2a54e84bb1944117af4bad6523f86c88", (
        # the full node supports flux and hidream only: on Wan it is recorded as whatever it does
        PeerNode("TaylorSeer", "TaylorSeer", "fresh_threshold", {"wan": (3, 4, 5, 6), "flux": (3, 4, 5, 6)},
                 {}, {"wan": {"model_type": "flux"}, "flux": {"model_type": "flux"}}),
        PeerNode("TaylorSeerLite", "TaylorSeerLite", "fresh_threshold", {"wan": (3, 4, 5, 6), "flux": (3, 4, 5, 6)},
                 {}, {"wan": {"model_type": "wanvideo"}, "flux": {"model_type": "flux"}}),)),
    Peer("chengzeyi/Comfy-WaveSpeed", "8253745127785d820cff0a9621d1537a5aae5424", (
        PeerNode("ApplyFBCacheOnModel", "ApplyFBCacheOnModel", "residual_diff_threshold",
                 {"wan": (0.03, 0.06, 0.12, 0.24), "flux": (0.03, 0.06, 0.12, 0.24)}),)),
    Peer("jiajianxie/ComfyUI-AccelDiff", "06bc7973074e15c21f1a1a1368583040cc1b2429", (
        PeerNode("AccelDiffUnified", "AccelDiff[TaylorSeer]", "fresh_threshold",
                 {"wan": (3, 4, 5, 6), "flux": (3, 4, 5, 6)},
                 {"model_method": "TaylorSeer"}, {"wan": {"taylorseer_model_type": "wan2.1"},
                                                   "flux": {"taylorseer_model_type": "flux"}}),
        PeerNode("AccelDiffUnified", "AccelDiff[HiCache]", "hicache_fresh_threshold",
                 {"wan": (3, 4, 5, 6), "flux": (3, 4, 5, 6)},
                 {"model_method": "HiCache"}, {"wan": {"hicache_model_type": "wan2.1"},
                                                "flux": {"hicache_model_type": "flux"}}),
        PeerNode("AccelDiffUnified", "AccelDiff[SeaCache]", "seacache_thresh",
                 {"wan": (0.1, 0.2, 0.4, 0.8), "flux": (0.1, 0.2, 0.4, 0.8)},
                 {"model_method": "SeaCache"}, {"wan": {"seacache_model_type": "wan2.1"},
                                                 "flux": {"seacache_model_type": "flux"}}),
        PeerNode("AccelDiffUnified", "AccelDiff[TC-Pade]", "tcpade_n_threshold",
                 {"wan": (0.7, 1.4, 2.1, 2.8), "flux": (0.7, 1.4, 2.1, 2.8)},
                 {"model_method": "TC-Pade", "tcpade_cache_device": _device()},
                 {"wan": {"tcpade_model_type": "wan2.1"}, "flux": {"tcpade_model_type": "flux"}}),)),
)


def model_family(case_id: str) -> str | None:
    return next((family for family in ("wan", "flux") if case_id.startswith(family)), None)


def _params(node: PeerNode, case_ids, quick: bool) -> list:
    """The node's fixed inputs and threshold sweep as --param values scoped to each case."""
    params = [Param(node.node, key, None, [str(value)]) for key, value in node.inputs.items()]
    for case_id in case_ids:
        family = model_family(case_id)
        if family is None:
            continue
        values = node.values[family]
        values = values[len(values) // 2:][:1] if quick else values
        params += [Param(node.node, key, case_id, [str(value)])
                   for key, value in node.family_inputs.get(family, {}).items()]
        params.append(Param(node.node, node.threshold, case_id, [str(v) for v in values]))
    return params


def peer_methods(host, folder: str, case_ids, quick: bool) -> tuple[list[Method], dict]:
    """(a method per node of every pack; {pack: commit checked out}). A pack that does not load, or a
    node that cannot be set up, is a method that fails on every case with the full error."""
    clone_missing(folder)
    methods, commits = [], {}
    for peer in PEERS:
        path = os.path.join(folder, peer.folder)
        commits[peer.folder] = checked_out_commit(path)
        try:
            host.load_pack(path)
            error = None
        except Exception as exc:
            error = exc
        for node in peer.nodes:
            name = f"{peer.folder}:{node.label}"
            if error is None:
                try:
                    methods.append(node_method(host, name, node.node, _params(node, case_ids, quick), "peer", case_ids))
                    continue
                except Exception as exc:
                    methods.append(failing_method(name, exc, "peer"))
                    continue
            methods.append(failing_method(name, error, "peer"))
    return methods, commits


def checked_out_commit(folder: str) -> str | None:
    """The commit a peer checkout is at (read from its .git without running git), or None."""
    head = os.path.join(folder, ".git", "HEAD")
    if not os.path.isfile(head):
        return None
    with open(head) as f:
        ref = f.read().strip()
    if not ref.startswith("ref: "):
        return ref
    path = os.path.join(folder, ".git", ref[5:])
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    return None


def clone_missing(folder: str) -> None:
    """Clones each pack that is not in `folder` at its pinned commit; says which commit each checkout is at."""
    os.makedirs(folder, exist_ok=True)
    for peer in PEERS:
        path = os.path.join(folder, peer.folder)
        if not os.path.isdir(path):
            subprocess.run(["git", "clone", "--quiet", f"https://github.com/{peer.repo}.git", path], check=True)
            subprocess.run(["git", "-C", path, "checkout", "--quiet", peer.commit], check=True)
        commit = checked_out_commit(path)
        note = "" if commit == peer.commit else f" (pinned: {peer.commit})"
        print(f"{peer.folder}: {commit or 'not a git checkout'}{note}")

