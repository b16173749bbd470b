"""Token-level partial recompute (ToCa, DuCa, ClusCa): on a filled evaluation, recompute a subset of tokens.

A partial evaluation fills every cached segment as usual (reuse or forecast), runs the segment's
blocks one after the other on a subset of the image/video tokens (everything else a block reads
stays whole), and takes the rows that ran from that run; the other tokens keep their fill. The
recomputed rows are remembered as a per-token correction of the fill (fresh residual - forecast at
that time), so later fills of those tokens start from the fresher value: with reuse the correction is
exactly the fresh residual, with a forecaster the forecast's trend is kept on top of it. A full
compute drops the corrections (they cost one token residual per segment and conditioning, counted in
the cache bytes).

Attention mixes tokens. With `cached_attention` (and an adapter that says where a block's
self-attention sees the positions), a computed evaluation keeps each cached block's self-attention
keys and values (as the attention function receives them, after RoPE) and a partial evaluation lets
the subset's queries attend to all of them, the rows that ran replaced by their fresh keys and values
(which then stay in the cache). Without it the subset attends only to itself and the text (ToCa's
approximation), which lost 4-5 dB against whole-step reuse on the tiny Flux.

Text rows (Flux's text tokens; Wan's text is cross-attention context, not rows): where the subset
attends to the kept keys and values, the text is filled like the tokens that are not recomputed, so a
partial block costs about `ratio` of a full one (a text stream of its own keeps one row: a block
cannot take an empty stream). `recompute_text` runs every text row as well (ToCa's rule), and then
ratio 1 is exactly a full compute; without kept keys and values the text always runs.

Which rows to recompute (`selection`):
- score (ToCa): relative change of the token's input since it was last computed, plus its cache age;
- cluster (ClusCa): k-means of the tokens at the last computed evaluation, the recomputed rows spread
  over every cluster; the other tokens of a cluster take `gamma` times the mean update (fresh - filled
  residual) of its recomputed tokens. (ClusCa's own rule blends the value instead, gamma * cluster
  value + (1 - gamma) * cached with gamma 0.005-0.01; on the trained tiny Wan that was no better than
  no propagation, while propagating the update gained 2-3 dB: see the README's benchmark notes.)
- random: a baseline, seeded per evaluation so runs repeat exactly;
`alternate` (DuCa): filled evaluations alternate between partial (conservative) and plain fills
(aggressive), starting with a partial one after each compute.

Pure torch, architecture-neutral: the adapter describes each block kind's tokens as a TokenLayout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .forecasters.history import nbytes

SCORE, CLUSTER, RANDOM = "score", "cluster", "random"
TOKEN_SELECTIONS = (SCORE, CLUSTER, RANDOM)
KMEANS_ITERATIONS = 8


@dataclass(frozen=True)
class TokenConfig:
    """`ratio`: fraction of the image tokens recomputed on a partial evaluation; `clusters`/`gamma`: ClusCa;
    `recompute_text`: partial evaluations also run every text row (else it is filled where it can be)."""

    selection: str = SCORE
    ratio: float = 0.25
    clusters: int = 16
    gamma: float = 1.0
    alternate: bool = False
    cached_attention: bool = True
    recompute_text: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.selection not in TOKEN_SELECTIONS:
            raise ValueError(f"unknown token selection '{self.selection}'; available: {', '.join(TOKEN_SELECTIONS)}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"token ratio must be in (0, 1], got {self.ratio}: set ratio above 0 and at most 1")
        if self.clusters < 1:
            raise ValueError(f"clusters must be >= 1, got {self.clusters}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be within [0, 1], got {self.gamma}")

    def count(self, tokens: int) -> int:
        """Tokens recomputed out of `tokens`."""
        return max(1, min(tokens, round(self.ratio * tokens)))

    def check_tokens(self, tokens: int) -> None:
        """Refuse, before sampling, ClusCa clusters that the latent's `tokens` image tokens cannot fill."""
        if self.selection == CLUSTER and self.clusters > tokens:
            raise ValueError(f"Cache Token Ratio: {self.clusters} clusters but the latent has only {tokens} image "
                             f"tokens: set 'clusters' to at most {tokens} (or use a larger latent)")

    def clusters_for(self, tokens: int) -> int:
        """ClusCa's cluster count: every cluster gets a recomputed token, so at most the tokens recomputed."""
        return min(self.clusters, self.count(tokens))

    @property
    def label(self) -> str:
        name = {SCORE: "toca", CLUSTER: "clusca", RANDOM: "random"}[self.selection]
        return (f"{'duca-' if self.alternate else ''}{name}{self.ratio:g}{'' if self.cached_attention else '-subset'}"
                f"{'-text' if self.recompute_text else ''}")


@dataclass(frozen=True)
class AttentionLayout:
    """Where a block's self-attention sees the positions (the adapter's description), so that a token subset can
    attend to the cached keys and values of every position.

    sequence_dim: the dim of the q, k, v the attention function receives that holds the positions, ordered as
        the layout's per-position rows are (the text, when the layout has one, then the tokens).
    call: which of the block's attention calls (in call order) is its self-attention.
    key_rows: (entry, dim) of per-position tables whose `dim` indexes the keys (attention masks): kept whole.
    """

    sequence_dim: int
    call: int = 0
    key_rows: tuple = ()


@dataclass(frozen=True)
class TokenLayout:
    """Where a block kind's image/video tokens are (the adapter's declarative description).

    stream: the hidden-state entry whose dim 1 holds the tokens.
    text: the entry whose dim-1 length is the text token count; when a block's args lack it (Flux single
        blocks), the length it had in an earlier block of the same call is used.
    text_in_stream: the stream is cat(text, tokens) (Flux single blocks); else it holds tokens only.
    rows: (entry, dims) of per-position tables (rotary tables, masks, per-token modulation) whose
        positions are the text (when `text` is set) followed by the tokens. Along each dim, size 1 is
        shared by every position; size s covers ceil(positions / s) consecutive positions per row.
    attention: where the block's self-attention sees the positions; None: the subset attends to itself.
    """

    stream: str
    text: Optional[str] = None
    text_in_stream: bool = False
    rows: tuple = ()
    attention: Optional[AttentionLayout] = None


def _dims(dims) -> tuple:
    return dims if isinstance(dims, tuple) else (dims,)


def gather_rows(value: torch.Tensor, dims, positions: torch.Tensor, total: int, name: str) -> torch.Tensor:
    """The rows of a per-position table that `positions` (of `total`) read."""
    for dim in _dims(dims):
        size = value.shape[dim]
        if size == 1:
            continue
        if size > total:
            raise ValueError(f"cannot gather token rows of '{name}': {size} rows along dim {dim} for {total} positions")
        per = math.ceil(total / size)
        value = value.index_select(dim, positions // per)
    return value


def gather(args: dict, layout: TokenLayout, streams: tuple, index: torch.Tensor, text: int,
           state: Optional[dict] = None, all_keys: bool = False, text_rows: Optional[torch.Tensor] = None) -> dict:
    """A block's args for the token subset `index` (sorted, relative to the tokens) and the text rows
    `text_rows` (None: every text row). Streams come from `state` (the subset's hidden states after the
    previous block of the segment) or from `args`; other streams are copied whole (blocks may update them
    in place), untouched entries are shared.
    `all_keys`: the subset attends to every position's keys, so the tables' key dims stay whole."""
    sub = dict(args)
    positions = positions_of(index, text, text_rows)
    for s in streams:
        if state is not None:
            sub[s] = state[s]
        elif s == layout.stream:
            sub[s] = args[s].index_select(1, positions if layout.text_in_stream else index)
        elif s == layout.text and text_rows is not None:
            sub[s] = args[s].index_select(1, text_rows)
        else:
            sub[s] = args[s].clone()
    whole = set(layout.attention.key_rows) if all_keys and layout.attention is not None else set()
    for name, dims in layout.rows:
        dims = tuple(d for d in _dims(dims) if (name, d) not in whole)
        if sub.get(name) is not None and dims:
            value = sub[name]
            sub[name] = gather_rows(value, dims, positions.to(value.device), text + _tokens(args, layout, text), name)
    return sub


def positions_of(index: torch.Tensor, text: int, text_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The positions (text first, then the tokens) that the token subset `index` and the text rows `text_rows`
    (None: every text row) run."""
    text_rows = torch.arange(text, device=index.device) if text_rows is None else text_rows.to(index.device)
    return torch.cat([text_rows, index + text])


class SelfAttention:
    """The attention hook of one block call, `(attend, q, k, v, *args, **kwargs)` -> attend's output, where
    `attend` is the attention function (the host's, or the hook that was there before).

    At the block's self-attention call (`layout.call`, counted in call order) it hands `keep` the keys and
    values; with `cached` (k, v of every position) it first writes the call's fresh rows (`positions`)
    into copies of them, so the subset's queries attend to every position. Other calls pass through."""

    def __init__(self, layout: AttentionLayout, keep, cached: Optional[tuple] = None,
                 positions: Optional[torch.Tensor] = None):
        self.layout, self.keep, self.cached, self.positions = layout, keep, cached, positions
        self.calls = 0

    def __call__(self, attend, *args, **kwargs):
        call, self.calls = self.calls, self.calls + 1
        if call != self.layout.call or len(args) < 3:
            return attend(*args, **kwargs)
        q, k, v, *rest = args
        if self.cached is not None:
            dim, rows = self.layout.sequence_dim, self.positions.to(k.device)
            k, v = (c.to(device=k.device, dtype=k.dtype).index_copy(dim, rows, fresh)
                    for c, fresh in zip(self.cached, (k, v)))
        self.keep(k, v)
        return attend(q, k, v, *rest, **kwargs)


def _tokens(args: dict, layout: TokenLayout, text: int) -> int:
    return args[layout.stream].shape[1] - (text if layout.text_in_stream else 0)


def kmeans(x: torch.Tensor, k: int, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Cluster labels of the rows of x [N, C]: Lloyd's algorithm from k evenly spaced rows (deterministic)."""
    x = x.float()
    centers = x[torch.linspace(0, x.shape[0] - 1, k).round().long()].clone()
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for _ in range(iterations):
        labels = torch.cdist(x, centers).argmin(dim=1)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)  # an empty cluster keeps its center
    return labels


def spread_over_clusters(labels: torch.Tensor, n: int, order: torch.Tensor) -> torch.Tensor:
    """n tokens spread over the clusters in proportion to their sizes, every cluster first.

    Tokens are ranked within their cluster in `order` (a permutation); the n smallest rank / cluster
    size are taken, so every cluster gives its first token before any gives a second."""
    k = int(labels.max()) + 1
    ordered = labels[order]
    counts = torch.bincount(labels, minlength=k)
    rank = torch.zeros_like(order)
    for c in range(k):  # rank of each token within its cluster, in `order`
        members = (ordered == c).nonzero().flatten()
        rank[members] = torch.arange(members.numel(), device=labels.device)
    key = rank.double() / counts[ordered].double() + torch.arange(order.numel(), device=labels.device) * 1e-9
    return order[torch.argsort(key)[:n]].sort().values


class _Memory:
    """What the selection remembers of one conditioning's tokens."""

    def __init__(self, features: torch.Tensor):
        self.last = features.detach().clone()  # each token's input when it was last computed
        self.age = torch.zeros(features.shape[0], device=features.device)  # evaluations since then


class TokenState:
    """Per-run state of token-level recompute: selections, per-token memory and fill corrections."""

    def __init__(self, config: TokenConfig):
        self.config = config
        self.memory: dict = {}  # uuid -> _Memory
        self.labels: dict = {}  # token count -> ClusCa clusters of the last computed call with that many tokens
        self.corrections: dict = {}  # (segment key, uuid) -> [1, N, C] correction of the fill's token rows
        self.keys_values: dict = {}  # (block, uuid) -> (k, v) of the block's self-attention, every position
        self.notes: list = []  # for the run's report (the engine takes them)
        self.clusters_noted = False

    def _clusters(self, tokens: int) -> int:
        clusters = self.config.clusters_for(tokens)
        if clusters < self.config.clusters and not self.clusters_noted:
            self.clusters_noted = True
            self.notes.append(f"Cache Token Ratio: {self.config.clusters} clusters but {clusters} tokens recomputed per "
                              f"partial evaluation (ratio {self.config.ratio:g} x {tokens} image tokens): {clusters} "
                              "clusters used; raise 'ratio' or lower 'clusters' to choose")
        return clusters

    def partial_step(self, consecutive_fills: int) -> bool:
        """Whether a filled evaluation (the consecutive_fills-th since a compute) recomputes tokens."""
        return not self.config.alternate or consecutive_fills % 2 == 1

    def select(self, features: torch.Tensor, uuids: list, evaluation: int, compute: bool, partial: bool,
               reference: int) -> Optional[torch.Tensor]:
        """features [B, N, C]: the tokens at the first cached block, one batch chunk per uuid.
        Returns the sorted token indices a partial call recomputes, else None (and remembers a compute)."""
        chunks = features.chunk(len(uuids))
        if compute:
            for uuid, chunk in zip(uuids, chunks):
                self.memory[uuid] = _Memory(chunk.flatten(0, -2) if chunk.shape[0] == 1 else chunk.mean(0))
                self.corrections = {k: v for k, v in self.corrections.items() if k[1] != uuid}
            if self.config.selection == CLUSTER and reference >= 0:
                self.labels[features.shape[1]] = kmeans(chunks[reference][0], self._clusters(features.shape[1]))
            return None
        if not partial:
            for uuid in uuids:
                if uuid in self.memory:
                    self.memory[uuid].age += 1
            return None
        tokens = features.shape[1]
        n = self.config.count(tokens)
        rows = [c[0] if c.shape[0] == 1 else c.mean(0) for c in chunks]
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + evaluation)
        order = torch.randperm(tokens, generator=generator).to(features.device)
        if self.config.selection == RANDOM:
            index = order[:n].sort().values
        elif self.config.selection == CLUSTER:
            labels = self.labels.get(tokens)
            if labels is None:  # no computed call of this size saw the reference conditioning (regional prompts)
                labels = self.labels[tokens] = kmeans(rows[0], self._clusters(tokens))
            index = spread_over_clusters(labels, n, order)
        else:
            index = self._top_scores(rows, uuids, n)
        for uuid, row in zip(uuids, rows):
            memory = self.memory.setdefault(uuid, _Memory(row))
            memory.age += 1
            memory.age[index] = 0
            memory.last[index] = row[index]
        return index

    def _top_scores(self, rows: list, uuids: list, n: int) -> torch.Tensor:
        """ToCa-style score: relative input change since the token's last compute + its normalised cache age."""
        score = 0.0
        for uuid, row in zip(uuids, rows):
            memory = self.memory.setdefault(uuid, _Memory(row))
            change = (row.float() - memory.last.float()).norm(dim=-1) / memory.last.float().norm(dim=-1).clamp_min(1e-6)
            score = score + change / change.mean().clamp_min(1e-12) + memory.age / memory.age.max().clamp_min(1.0)
        return torch.sort(score, descending=True, stable=True).indices[:n].sort().values

    def correction(self, key, uuids: list, like: torch.Tensor) -> Optional[torch.Tensor]:
        """The correction of a segment's token rows for the call's uuids, batched like `like` [B, N, C]."""
        parts = [self.corrections.get((key, u)) for u in uuids]
        if all(p is None for p in parts):
            return None
        shape = (like.shape[0] // len(uuids), *like.shape[1:])
        return torch.cat([torch.zeros(shape, dtype=like.dtype, device=like.device) if p is None
                          else p.to(like.device) for p in parts])

    def update(self, key, uuids: list, fill: torch.Tensor, index: torch.Tensor,
               fresh: torch.Tensor) -> Optional[torch.Tensor]:
        """Record the recomputed rows' fresh residual (fresh [B, n, C]) as a correction of later fills of the
        token rows (fill [B, N, C]: their filled residual now). With the cluster selection and gamma > 0, the
        other tokens of each cluster take gamma times the mean update (fresh - fill) of the cluster's
        recomputed tokens: returns that change of the filled rows (zero at the recomputed rows), else None."""
        update = fresh - fill[:, index]
        change = None
        if self.config.selection == CLUSTER and self.config.gamma > 0:
            labels = self.labels[fill.shape[1]]
            k = int(labels.max()) + 1
            chosen = labels[index]
            sums = torch.zeros(fill.shape[0], k, fill.shape[2], dtype=fill.dtype, device=fill.device)
            sums.index_add_(1, chosen, update)
            means = sums / torch.bincount(chosen, minlength=k).clamp_min(1).to(fill.dtype).view(1, k, 1)
            change = self.config.gamma * means[:, labels]
            change[:, index] = 0
        correction = torch.zeros_like(fill) if change is None else change.clone()
        correction[:, index] = update
        for uuid, part in zip(uuids, correction.chunk(len(uuids))):
            previous = self.corrections.get((key, uuid))
            self.corrections[(key, uuid)] = part if previous is None else previous.to(part.device) + part
        return change

    def keep_keys_values(self, block, uuids: list, k: torch.Tensor, v: torch.Tensor,
                         device: Optional[torch.device] = None) -> None:
        """Keep a block's self-attention keys and values of every position (batched over `uuids`), on `device`
        (None: where they are)."""
        for uuid, *pair in zip(uuids, k.detach().chunk(len(uuids)), v.detach().chunk(len(uuids))):
            self.keys_values[(block, uuid)] = tuple(t.to(device) if device is not None else t for t in pair)

    def growth_of_keys_values(self, block, uuids: list, k: torch.Tensor, v: torch.Tensor) -> int:
        """Bytes that keeping these keys and values would add to those kept now."""
        return nbytes((k, v)) - sum(nbytes(self.keys_values.get((block, u), ())) for u in uuids)

    def drop_keys_values(self, uuid=None, block=None) -> None:
        """Forget the kept keys and values of one conditioning, or of one block (None and None: all)."""
        for key in [k for k in self.keys_values if (uuid is None or k[1] == uuid) and (block is None or k[0] == block)]:
            del self.keys_values[key]

    def cached_keys_values(self, block, uuids: list, positions: int, dim: int) -> Optional[tuple]:
        """A block's kept keys and values for the call's uuids, batched; None unless every uuid has them for
        `positions` positions (along `dim`)."""
        parts = [self.keys_values.get((block, u)) for u in uuids]
        if any(p is None or p[0].shape[dim] != positions for p in parts):
            return None
        return tuple(torch.cat([p[i].to(parts[0][i].device) for p in parts]) if len(parts) > 1 else parts[0][i]
                     for i in range(2))

    @property
    def nbytes(self) -> int:
        tensors = [m.last for m in self.memory.values()] + list(self.corrections.values())
        return nbytes(tensors) + self.keys_values_bytes

    @property
    def keys_values_bytes(self) -> int:
        return sum(nbytes(pair) for pair in self.keys_values.values())
