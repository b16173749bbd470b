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

from ..cache_core import (CACHE_DTYPES, DEFAULT_METHOD, FORECASTER_KINDS, MAX_TAYLOR_ORDER, ORDERS, POLICIES,
                          RECOMMENDED_FORECASTER, RECOMMENDED_PROBE_BLOCKS, RECOMMENDED_SITE, SITE_KINDS,
                          TOKEN_SELECTIONS, CacheConfig, CacheRun, ForecasterConfig, Site, TokenConfig, make_policy)
from .adapters import HostDrift
from .figure import render_figure
from .integration import SETUP_KEY, CacheHandle, install
from .progress import compact

CachePolicy = io.Custom("CACHE_POLICY")
CacheForecaster = io.Custom("CACHE_FORECASTER")
CacheTokens = io.Custom("CACHE_TOKENS")
CATEGORY = "model_patches/feature_cache"

_METHOD_HELP = {
    DEFAULT_METHOD: "the recommended method (README: chosen on the benchmark across models and samplers)",
    "fixed": "fixed interval (FORA): evenly spaced computes within the budget",
    "planned": "computes planned from the sampler's sigmas before the run: the long steps far from the last "
               "compute are computed, the others filled (the same decisions for every run of a schedule)",
    "teacache": "TeaCache: accumulated change of the timestep-modulated input",
    "easycache": "EasyCache: predicted output change from the input change and the transformation rate",
    "first_block": "first-block / DBCache: compare the residual of the probe blocks (needs a block site, probe >= 1)",
    "dicache": "DiCache: the probe blocks' accumulated change decides, their trajectory scales the fill (needs a block "
               "site with probe >= 1; first 20% of steps computed)",
    "magcache": "MagCache: calibrated magnitude ratio of the residual; the first run of a model/sampler/schedule "
                "computes every step to calibrate (stored in ComfyUI's user folder), later runs use it",
    "foresight": "Foresight: each block reuses while its input changes less than its own threshold, calibrated on "
                 "the first steps (block sites; 'blocks' decides per block)",
    "delta": "Δ-DiT: between full computes a window of blocks is filled, sliding from the rear blocks (early "
             "steps) to the front blocks (late steps) (block sites; 'blocks' decides per block)",
    "speca": "SpeCa: every step drafted by the forecaster and verified on the first cached block; a draft off by "
             "more than a threshold that decays over the schedule is computed instead (block sites)",
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
                io.Combo.Input("method", options=[DEFAULT_METHOD, *POLICIES], default=DEFAULT_METHOD,
                               tooltip="; ".join(f"{k}: {v}" for k, v in _METHOD_HELP.items())),
                io.Float.Input("speed", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="The compute budget: the fraction of the model's work done is 0.15 ** speed "
                                       "(0: every step, identical output; 0.5: 39%, about 2.6x; 1: 15%, about 6.7x)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching starts at this fraction of the schedule; earlier steps are computed."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching ends at this fraction of the schedule; later steps are computed."),
                io.Int.Input("warmup_steps", default=1, min=0, max=1000,
                             tooltip="The first model evaluations that are always computed."),
                io.Int.Input("max_consecutive", default=0, min=-1, max=1000,
                             tooltip="At most this many filled evaluations in a row (0: no limit; -1: the method's "
                                     "default, 4 for magcache, else no limit)."),
                io.Float.Input("threshold", default=-1.0, min=-1.0, max=100.0, step=0.001,
                               tooltip="Advanced: the method's own threshold (interval for 'fixed'); -1 derives the "
                                       "budget from speed instead."),
                io.Float.Input("retention_ratio", default=-1.0, min=-1.0, max=0.99, step=0.01, optional=True,
                               tooltip="Fraction of the first steps always computed (-1: the method's default, 0.2 for "
                                       "dicache and magcache, else 0)."),
                io.Float.Input("max_gain", default=0.0, min=0.0, max=10.0, step=0.05, optional=True,
                               tooltip="dicache: clip of the probe-trajectory gain of a fill (1 = plain reuse; 0: the "
                                       "model family's default, Flux 1.5, Wan 2)."),
            ],
            outputs=[CachePolicy.Output(display_name="policy")],
        )

    @classmethod
    def execute(cls, method, speed, start_percent, end_percent, warmup_steps, max_consecutive, threshold,
                retention_ratio=-1.0, max_gain=0.0):
        settings = dict(speed=speed, start_percent=start_percent, end_percent=end_percent, warmup_steps=warmup_steps,
                        threshold=None if threshold < 0 else threshold)
        if max_consecutive >= 0:
            settings["max_consecutive"] = max_consecutive
        if retention_ratio >= 0:
            settings["retention_ratio"] = retention_ratio
        if max_gain > 0:
            if method != "dicache":
                raise ValueError(f"Feature cache: max_gain applies to the dicache method, not '{method}': set it to 0")
            settings["max_gain"] = max_gain
        return io.NodeOutput(_build(make_policy, method=method, **settings))


_FORECASTER_HELP = {
    "reuse": "the last computed value",
    "taylor": "Taylor series in sigma with divided-difference derivatives (TaylorSeer); uses order",
    "hicache": "Taylor coefficients on a contracted Hermite basis (HiCache); uses order and contraction",
    "ab": "Adams-Bashforth combination of the last `order` computed values, weights in sigma (AB-Cache)",
    "foca": "BDF2 predictor + Heun corrector on the feature trajectory (FoCa): exact on lines, damps curvature",
    "spectrum": "Chebyshev ridge fit over every computed point of the run (Spectrum); uses degree and ridge",
    "freqca": "low spatial frequencies reused, high ones forecast by Hermite order 2 (FreqCa); uses cutoff",
    "hyca": "per group of feature channels, the candidate that forecast best during warmup (HyCa); uses groups",
    "auto": "online selection: at every computed step each candidate (reuse, Taylor, HiCache, FoCa, Spectrum) is "
            "back-tested on the value just computed, and the one with the least recent error fills; uses groups",
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
                             tooltip="hyca / auto: feature channels are split into this many groups, each with its "
                                     "own forecaster (hyca: chosen during warmup; auto: revised at every compute)."),
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
            description="Token-level partial recompute (ToCa / DuCa / ClusCa): on evaluations the policy fills, a "
                        "fraction of the image tokens is recomputed through the cached blocks, the rest is filled. "
                        "Needs the 'span' or 'blocks' site.",
            inputs=[
                io.Combo.Input("selection", options=list(TOKEN_SELECTIONS), default="score",
                               tooltip="score (ToCa): tokens whose input changed most since their last compute, and "
                                       "the longest cached; cluster (ClusCa): spread over k-means clusters of the "
                                       "tokens, their update shared within each cluster (see gamma); random: a "
                                       "baseline."),
                io.Float.Input("ratio", default=0.25, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of the image tokens recomputed on a partial evaluation."),
                io.Int.Input("clusters", default=16, min=1, max=256,
                             tooltip="'cluster' selection: the number of k-means clusters; more than the latent's image "
                                     "tokens is refused when sampling starts, more than the tokens recomputed "
                                     "(ratio x image tokens) uses that many and says so."),
                io.Float.Input("gamma", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="'cluster' selection: the other tokens of a cluster take gamma times the mean "
                                       "update of its recomputed tokens (0 = plain fill for them)."),
                io.Boolean.Input("alternate", default=False,
                                 tooltip="DuCa: filled evaluations alternate between a partial recompute and a plain "
                                         "fill (faster), starting with a partial one."),
                io.Boolean.Input("cached_attention", default=True, optional=True,
                                 tooltip="The recomputed tokens attend to every token: keys and values of each "
                                         "cached block's self-attention are kept from the last computed step "
                                         "(more memory: two token tables per block and conditioning, within "
                                         "Apply Feature Cache's memory budget when one is set, else within half "
                                         "of the memory free on their device; the run's report shows it). "
                                         "Off: they attend only to each other and the text."),
                io.Boolean.Input("recompute_text", default=False, optional=True,
                                 tooltip="Partial evaluations also run every text token (Flux; Wan's text is not "
                                         "recomputed per token), and ratio 1 is then exactly a full compute. Off: "
                                         "with cached attention the text is filled like the tokens that are not "
                                         "recomputed (the recomputed tokens attend to its kept keys and values), "
                                         "so a partial evaluation costs about 'ratio' of a full one."),
            ],
            outputs=[CacheTokens.Output(display_name="tokens")],
        )

    @classmethod
    def execute(cls, selection, ratio, clusters, gamma, alternate, cached_attention=True, recompute_text=False):
        return io.NodeOutput(_build(TokenConfig, selection=selection, ratio=ratio, clusters=clusters, gamma=gamma,
                                    alternate=alternate, cached_attention=cached_attention,
                                    recompute_text=recompute_text))


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
                io.Combo.Input("site", options=list(SITE_KINDS), default=RECOMMENDED_SITE,
                               tooltip="model: the whole model's output (any architecture); span: the blocks between "
                                       "the probe and corrector blocks as one residual (on SD1.5/SDXL U-Nets: DeepCache, the deep "
                                       "branch below probe_blocks); blocks: each block on its own (DiT families)."),
                io.Int.Input("probe_blocks", default=RECOMMENDED_PROBE_BLOCKS, min=0, max=200,
                             tooltip="Block sites only: first blocks always computed (Fn); their residual is the "
                                     "first_block and dicache policies' indicator. U-Nets: the shallow blocks kept "
                                     "on each side."),
                io.Int.Input("corrector_blocks", default=0, min=0, max=200,
                             tooltip="Block sites only: last blocks always computed (Bn)."),
                io.Combo.Input("cache_device", options=["compute", "cpu"], default="compute",
                               tooltip="Keep caches on the compute device, or offload them to CPU memory."),
                io.Float.Input("memory_budget_mb", default=0.0, min=0.0, max=1e6, step=64.0,
                               tooltip="Cache memory limit (0: none). Over it the run first lowers the forecaster "
                                       "order, then moves caches to CPU memory (GPU runs), and only then stops "
                                       "caching; the report says which."),
                CachePolicy.Input("policy", optional=True,
                                  tooltip="Default: the recommended method ('default' of Cache Policy) at speed 0.5."),
                CacheForecaster.Input("forecaster", optional=True,
                                      tooltip=f"Default: the recommended forecaster ({RECOMMENDED_FORECASTER.label}); "
                                              "dicache: taylor 1 (its aligned fill)."),
                CacheTokens.Input("tokens", optional=True,
                                  tooltip="Token-level partial recompute on filled evaluations (span or blocks site)."),
                io.Combo.Input("cache_dtype", options=list(CACHE_DTYPES), default="auto", optional=True,
                               tooltip="Storage dtype of cached values; forecast differences and sums stay float32. "
                                       "auto: the model's dtype."),
                io.Boolean.Input("cfg_cache", default=False, optional=True,
                                 tooltip="CFG-branch cache (FasterCache): with cfg > 1, the negative (unconditional) "
                                         "branch is computed only on every cfg_refresh-th computed step and filled "
                                         "in between from the positive branch plus their cached difference, "
                                         "halving the batch on those steps. Any site. Does nothing at cfg 1 (the "
                                         "report says so)."),
                io.Int.Input("cfg_refresh", default=3, min=2, max=100, optional=True,
                             tooltip="CFG-branch cache only: both branches are computed on every N-th computed step, "
                                     "refreshing their cached difference."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, site, probe_blocks, corrector_blocks, cache_device, memory_budget_mb,
                policy=None, forecaster=None, tokens=None, cache_dtype="auto", cfg_cache=False, cfg_refresh=3):
        site_config = _build(Site, kind=site, probe_blocks=probe_blocks if site != "model" else 0,
                             corrector_blocks=corrector_blocks if site != "model" else 0)
        policy = policy or make_policy(DEFAULT_METHOD)
        if forecaster is None:  # the method's own fill if it defines one (DiCache: linear), else the recommended
            order = policy.forecaster_order
            forecaster = RECOMMENDED_FORECASTER if order is None else ForecasterConfig("taylor", order)
        config = _build(CacheConfig, policy=policy, forecaster=forecaster,
                        site=site_config, tokens=tokens, offload_to_cpu=cache_device == "cpu",
                        memory_budget_mb=memory_budget_mb, cache_dtype=cache_dtype,
                        cfg_refresh=cfg_refresh if cfg_cache else 0)
        try:
            return io.NodeOutput(install(model, config, CacheHandle(cls.hidden.unique_id)))
        except (ValueError, HostDrift) as error:  # raised before sampling (model, site, host), with what to do instead
            message = str(error)
            prefixed = message if message.startswith("Feature cache:") else f"Feature cache: {message}"
            raise type(error)(prefixed) from None


class CacheMapNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FeatureCacheMap",
            display_name="Cache Map",
            category=CATEGORY,
            description="The last run's step x block map (computed, reused, forecast, partial, verified-rejected) as a "
                        "figure with axes and legend, and the run's report (also saved as PNG + JSON).",
            inputs=[
                io.Model.Input("model", tooltip="The output of Apply Feature Cache."),
                io.Latent.Input("samples", tooltip="The sampler's output: makes this node run after sampling."),
                io.Int.Input("cell_size", default=8, min=1, max=64,
                             tooltip="Pixels per map cell in the saved figure (rows get thinner on very deep models)."),
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
        pixels = render_figure(report, cell_size)
        image = torch.from_numpy(pixels.astype(np.float32) / 255.0).unsqueeze(0)
        text = json.dumps(report, indent=1)
        summary = {k: v for k, v in report.items() if k != "trace"}
        folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder_paths.get_output_directory(),
                                                                       pixels.shape[1], pixels.shape[0])
        stem = os.path.join(folder, f"{name}_{counter:05}_")
        Image.fromarray(pixels).save(stem + ".png")
        with open(stem + ".json", "w") as f:
            f.write(text)
        ui = {"text": (json.dumps(summary, indent=1),), "feature_cache_report": (report,),
              "feature_cache_map": (compact(report),)}  # the widget's state, also after a page reload
        return io.NodeOutput(image, text, ui=ui)


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
