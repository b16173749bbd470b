"""Test-only ComfyUI nodes (not part of the product): tiny-model loading, label conditioning,
an exact latent decoder and a latent capture, so graphs run end to end without text encoders or VAEs.
"""
import json
import os
import sys

from safetensors import safe_open
from safetensors.torch import load_file

from comfy_api.latest import ComfyExtension, io

# The host loads this pack by file path, so the repo's own modules may not be importable yet.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
if _REPO_ROOT not in sys.path:
    sys.path.append(_REPO_ROOT)

from benchmarks.fixtures import FLUX_CONFIG_KEY, build_flux  # noqa: E402
from benchmarks.latent import latent_to_image  # noqa: E402

# Latents stored by FCFixtureCapture, read back by tests (benchmarks.host.Host.captured).
CAPTURED: dict = {}

CATEGORY = "FeatureCache/fixtures"


def _resolve(path: str) -> str:
    """Shared workflows name the bundled files relative to this repository (the server's cwd is the host's)."""
    return path if os.path.isabs(path) else os.path.join(_REPO_ROOT, path)


class FluxLoader(io.ComfyNode):
    """Flux detection pins the full model's width, so tiny Flux files carry their config instead."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FCFixtureFluxLoader",
            category=CATEGORY,
            inputs=[io.String.Input("path", tooltip="A .safetensors Flux state dict with a 'flux_config' metadata entry "
                                                     "(relative paths: from this repository).")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, path: str) -> io.NodeOutput:
        import comfy.model_management
        import comfy.model_patcher

        path = _resolve(path)
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        if FLUX_CONFIG_KEY not in metadata:
            raise ValueError(f"{path} has no '{FLUX_CONFIG_KEY}' metadata")
        offload_device = comfy.model_management.unet_offload_device()
        model = build_flux(json.loads(metadata[FLUX_CONFIG_KEY]), load_file(path)).to(offload_device)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=offload_device)
        return io.NodeOutput(patcher)


class LabelConditioning(io.ComfyNode):
    """Stands in for a text encoder: picks a stored embedding by class label."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FCFixtureLabelConditioning",
            category=CATEGORY,
            inputs=[
                io.String.Input("path", tooltip="A .safetensors file with 'labels' [N, L, D] and optional 'pooled' [N, P] "
                                                "(relative paths: from this repository)."),
                io.Int.Input("label", default=0, min=0),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, path: str, label: int, guidance: float) -> io.NodeOutput:
        path = _resolve(path)
        tensors = load_file(path)
        labels = tensors["labels"]
        if label >= labels.shape[0]:
            raise ValueError(f"label {label} out of range: {path} holds {labels.shape[0]} labels")
        extra = {"guidance": guidance}
        if "pooled" in tensors:
            extra["pooled_output"] = tensors["pooled"][label:label + 1].float()
        return io.NodeOutput([[labels[label:label + 1].float(), extra]])


class Decode(io.ComfyNode):
    """Exact inverse of the fixture latent map (benchmarks/latent.py); video frames become a batch."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FCFixtureDecode",
            category=CATEGORY,
            inputs=[io.Latent.Input("samples")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        images = latent_to_image(samples["samples"])
        if images.ndim == 5:  # [B, 3, T, H, W] -> [B*T, 3, H, W]
            images = images.movedim(2, 1).flatten(0, 1)
        return io.NodeOutput(images.movedim(1, -1).contiguous())  # ComfyUI IMAGE is [B, H, W, C]


class Capture(io.ComfyNode):
    """Output node that keeps a copy of a latent for the test that ran the graph."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FCFixtureCapture",
            category=CATEGORY,
            is_output_node=True,
            inputs=[io.Latent.Input("samples"), io.String.Input("key", default="out")],
            outputs=[],
        )

    @classmethod
    def execute(cls, samples, key: str) -> io.NodeOutput:
        CAPTURED[key] = samples["samples"].clone()
        return io.NodeOutput()


class FixtureExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [FluxLoader, LabelConditioning, Decode, Capture]


def comfy_entrypoint():
    return FixtureExtension()
