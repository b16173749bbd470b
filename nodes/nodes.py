"""The artist-facing nodes (ComfyUI V3 schema). Thin: they build validated configs and call `install`."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from PIL import Image
from comfy_api.latest import ComfyExtension, io

import folder_paths

from ..cache_core import (FORECASTER_KINDS, MAX_TAYLOR_ORDER, ORDERS, POLICIES, SITE_KINDS, TOKEN_SELECTIONS,
                          CacheConfig, CacheRun, ForecasterConfig, Site, TeaCache, TokenConfig, Trace, make_policy,
                          render_map)
from .integration import SETUP_KEY, CacheHandle, install

CachePolicy = io.Custom("CACHE_POLICY")
CacheForecaster = io.Custom("CACHE_FORECASTER")
CacheTokens = io.Custom("CACHE_TOKENS")
CATEGORY = "model_patches/feature_cache"

_METHOD_HELP = {
    "fixed": "fixed interval (FORA): compute one step in every N, N from speed (1..6)",
    "teacache": "TeaCache: accumulated change of the timestep-modulated input",
    "easycache": "EasyCache: predicted output change from the input change and the transformation rate",
    "first_block": "first-block / DBCache: compare the residual of the probe blocks (needs a block site, probe >= 1)",
}


def _build(factory, **settings):
    """Build a config; its validation error (which names the setting to change) reaches the user prefixed with the pack's name."""
    try:
        return factory(**settings)
    except ValueError as error:
        raise ValueError(f"Feature cache: {error}") from None


class CachePolicyNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FeatureCachePolicy",
            display_name="Cache Policy",
            category=CATEGORY,
            description="When to compute the model and when to fill from the cache.",
            inputs=[
                io.Combo.Input("method", options=list(POLICIES), default="teacache",
                               tooltip="; ".join(f"{k}: {v}" for k, v in _METHOD_HELP.items())),
                io.Float.Input("speed", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="One slider from quality (0: compute every step, identical output) to speed (1)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching starts at this fraction of the schedule; earlier steps are computed."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching ends at this fraction of the schedule; later steps are computed."),
                io.Int.Input("warmup_steps", default=1, min=0, max=1000,
                             tooltip="The first model evaluations that are always computed."),
                io.Int.Input("max_consecutive", default=0, min=0, max=1000,
                             tooltip="At most this many filled evaluations in a row (0: no limit)."),
                io.Float.Input("threshold", default=-1.0, min=-1.0, max=100.0, step=0.001,
                               tooltip="Advanced: the method's own threshold (interval for 'fixed'); -1 derives it from speed."),
            ],
            outputs=[CachePolicy.Output(display_name="policy")],
        )

    @classmethod
    def execute(cls, method, speed, start_percent, end_percent, warmup_steps, max_consecutive, threshold):
        policy = _build(make_policy, method=method, speed=speed, start_percent=start_percent,
                        end_percent=end_percent, warmup_steps=warmup_steps, max_consecutive=max_consecutive,
                        threshold=None if threshold < 0 else threshold)
        return io.NodeOutput(policy)


_FORECASTER_HELP = {
    "reuse": "the last computed value",
    "taylor": "Taylor series in sigma with divided-difference derivatives (TaylorSeer); uses order",
    "hicache": "Taylor coefficients on a contracted Hermite basis (HiCache); uses order and contraction",
    "ab": "Adams-Bashforth combination of the last `order` computed values, weights in sigma (AB-Cache)",
    "foca": "BDF2 predictor + Heun corrector on the feature trajectory (FoCa): exact on lines, damps curvature",
    "spectrum": "Chebyshev ridge fit over every computed point of the run (Spectrum); uses degree and ridge",
    "freqca": "low spatial frequencies reused, high ones forecast by Hermite order 2 (FreqCa); uses cutoff",
    "hyca": "per group of feature channels, the candidate that forecast best during warmup (HyCa); uses groups",
}
_FORECASTER_DEFAULTS = ForecasterConfig()


class CacheForecasterNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = _FORECASTER_DEFAULTS
        return io.Schema(
            node_id="FeatureCacheForecaster",
            display_name="Cache Forecaster",
            category=CATEGORY,
            description="How a skipped computation is filled: reuse the last value or forecast it in sigma.",
            inputs=[
                io.Combo.Input("method", options=list(FORECASTER_KINDS), default="taylor",
                               tooltip="; ".join(f"{k}: {v}" for k, v in _FORECASTER_HELP.items())),
                io.Int.Input("order", default=2, min=0, max=MAX_TAYLOR_ORDER,
                             tooltip="taylor: 0-4 (0 = reuse); hicache: 1-4; ab: the number of values combined, 1-4 "
                                     "(1 = reuse). Higher orders need more computed steps and memory. Other methods "
                                     "ignore it."),
                io.Float.Input("contraction", default=d.contraction, min=0.05, max=1.0, step=0.01, optional=True,
                               tooltip="hicache / freqca: Hermite contraction; 0.71 keeps Taylor's first-order term, "
                                       "lower values damp the forecast more (authors: 0.5-0.7)."),
                io.Int.Input("degree", default=d.degree, min=1, max=12, optional=True,
                             tooltip="spectrum: degree of the Chebyshev fit in sigma."),
                io.Float.Input("ridge", default=d.ridge, min=0.0, max=100.0, step=0.01, optional=True,
                               tooltip="spectrum: ridge penalty on the fit's non-constant coefficients (0: plain "
                                       "least squares)."),
                io.Float.Input("cutoff", default=d.cutoff, min=0.01, max=0.99, step=0.01, optional=True,
                               tooltip="freqca: low-pass cutoff as a fraction of the highest spatial frequency of the "
                                       "token grid (authors: ~0.1)."),
                io.Int.Input("groups", default=d.groups, min=1, max=1024, optional=True,
                             tooltip="hyca: feature channels are split into this many groups, each with its own "
                                     "forecaster chosen during warmup."),
            ],
            outputs=[CacheForecaster.Output(display_name="forecaster")],
        )

    @classmethod
    def execute(cls, method, order, contraction=_FORECASTER_DEFAULTS.contraction, degree=_FORECASTER_DEFAULTS.degree,
                ridge=_FORECASTER_DEFAULTS.ridge, cutoff=_FORECASTER_DEFAULTS.cutoff, groups=_FORECASTER_DEFAULTS.groups):
        return io.NodeOutput(_build(ForecasterConfig, kind=method, order=order if method in ORDERS else 0,
                                    contraction=contraction, degree=degree, ridge=ridge, cutoff=cutoff, groups=groups))


class CacheTokenRatioNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FeatureCacheTokenRatio",
            display_name="Cache Token Ratio",
            category=CATEGORY,
            description="Token-level partial recompute on cached steps (ToCa / ClusCa). Not applied by this version yet.",
            inputs=[
                io.Combo.Input("selection", options=list(TOKEN_SELECTIONS), default="score",
                               tooltip="score: most-changed tokens (ToCa); cluster: one token per cluster (ClusCa); random."),
                io.Float.Input("ratio", default=0.25, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of tokens recomputed on cached steps."),
                io.Int.Input("clusters", default=16, min=1, max=256, tooltip="Cluster count for 'cluster' selection."),
            ],
            outputs=[CacheTokens.Output(display_name="tokens")],
        )

    @classmethod
    def execute(cls, selection, ratio, clusters):
        return io.NodeOutput(_build(TokenConfig, selection=selection, ratio=ratio, clusters=clusters))


class ApplyFeatureCacheNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplyFeatureCache",
            display_name="Apply Feature Cache",
            category=CATEGORY,
            description="Returns a model that samples with feature caching. Bypass or remove it to get the plain model.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with feature caching."),
                io.Combo.Input("site", options=list(SITE_KINDS), default="span",
                               tooltip="model: the whole model's output (any architecture); span: the blocks between "
                                       "the probe and corrector blocks as one residual; blocks: each block on its own "
                                       "(Flux, Wan)."),
                io.Int.Input("probe_blocks", default=1, min=0, max=200,
                             tooltip="Block sites only: first blocks always computed (Fn); their residual is the "
                                     "first_block policy's indicator."),
                io.Int.Input("corrector_blocks", default=0, min=0, max=200,
                             tooltip="Block sites only: last blocks always computed (Bn)."),
                io.Combo.Input("cache_device", options=["compute", "cpu"], default="compute",
                               tooltip="Keep caches on the compute device, or offload them to CPU memory."),
                io.Float.Input("memory_budget_mb", default=0.0, min=0.0, max=1e6, step=64.0,
                               tooltip="Stop caching for the run if caches exceed this size (0: no limit)."),
                CachePolicy.Input("policy", optional=True, tooltip="Default: TeaCache at speed 0.5."),
                CacheForecaster.Input("forecaster", optional=True, tooltip="Default: reuse."),
                CacheTokens.Input("tokens", optional=True, tooltip="Token-level partial recompute (not available yet)."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, site, probe_blocks, corrector_blocks, cache_device, memory_budget_mb,
                policy=None, forecaster=None, tokens=None):
        site_config = _build(Site, kind=site, probe_blocks=probe_blocks if site != "model" else 0,
                             corrector_blocks=corrector_blocks if site != "model" else 0)
        config = _build(CacheConfig, policy=policy or TeaCache(), forecaster=forecaster or ForecasterConfig(),
                        site=site_config, tokens=tokens, offload_to_cpu=cache_device == "cpu",
                        memory_budget_mb=memory_budget_mb)
        return io.NodeOutput(_build(install, model=model, config=config, handle=CacheHandle(cls.hidden.unique_id)))


class CacheMapNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FeatureCacheMap",
            display_name="Cache Map",
            category=CATEGORY,
            description="The last run's step x layer map (red computed, blue reused, green forecast) and its report.",
            inputs=[
                io.Model.Input("model", tooltip="The output of Apply Feature Cache."),
                io.Latent.Input("samples", tooltip="The sampler's output: makes this node run after sampling."),
                io.Int.Input("cell_size", default=8, min=1, max=64, tooltip="Pixels per map cell."),
                io.String.Input("filename_prefix", default="feature_cache/map",
                                tooltip="The map PNG and report JSON are saved under ComfyUI's output folder."),
            ],
            outputs=[io.Image.Output(display_name="map"), io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, samples, cell_size, filename_prefix):
        setup = model.model_options.get("transformer_options", {}).get(SETUP_KEY)
        if setup is None:
            raise ValueError("Cache Map: this model has no feature cache; connect the output of Apply Feature Cache.")
        report = setup.handle.report_for(samples["samples"])
        if report is None:
            report = _no_run_report(setup)
        pixels = render_map(Trace.from_dict(report["trace"]), cell_size)
        image = torch.from_numpy(pixels.astype(np.float32) / 255.0).unsqueeze(0)
        text = json.dumps(report, indent=1)
        summary = {k: v for k, v in report.items() if k != "trace"}
        folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder_paths.get_output_directory(),
                                                                       pixels.shape[1], pixels.shape[0])
        stem = os.path.join(folder, f"{name}_{counter:05}_")
        Image.fromarray(pixels).save(stem + ".png")
        with open(stem + ".json", "w") as f:
            f.write(text)
        return io.NodeOutput(image, text, ui={"text": (json.dumps(summary, indent=1),), "feature_cache_report": (report,)})


def _no_run_report(setup) -> dict:
    """An empty map that says why: never a previous prompt's report, never a wrong instruction."""
    note = ("no sampling run of this prompt used this cached model: the sampler connected to 'samples' sampled "
            "nothing (denoise 0, or start step at or after its end step) or samples another model (connect this "
            "Apply Feature Cache's MODEL output to the sampler's model input)")
    logging.getLogger("FeatureCache").warning("Cache Map: %s", note)
    report = CacheRun(setup.config, setup.rows, []).report()
    report["notes"].append(note)
    return report


NODES = [CachePolicyNode, CacheForecasterNode, CacheTokenRatioNode, ApplyFeatureCacheNode, CacheMapNode]


class FeatureCacheExtension(ComfyExtension):
    async def get_node_list(self):
        return NODES
