"""Regression tests for the reliability findings of issue 10, in the real host (tiny Wan and Flux).

Prompt scheduling (ConditioningSetTimestepRange), regional prompts (ConditioningSetArea), the
host's Skip Layer Guidance node after Apply Feature Cache, two Apply nodes stacked on one model,
and the messages of the Cache Map and of the nodes.
"""
import pytest
import torch

import test_randomized as randomized
from benchmarks.graphs import GRAPHS, flux_graph, wan_graph, with_cache, without_cache
from reliability_probes import CallLog, check_report_against_calls

EXAMPLE = {"policy": {"method": "fixed", "speed": 0.5, "start_percent": 0.0, "end_percent": 1.0, "warmup_steps": 0,
                      "max_consecutive": 0, "threshold": 2.0},
           "forecaster": {"method": "taylor", "order": 1},
           "apply": {"site": "span", "probe_blocks": 1, "corrector_blocks": 0, "cache_device": "compute",
                     "memory_budget_mb": 0.0}}
RUN = {"sampler": "euler", "scheduler": "simple", "steps": 8, "cfg": 2.0, "batch": 1, "height": 8, "width": 8,
       "frames": 1, "denoise": 1.0, "seed": 5, "labels": [0, 2, 1]}


def _sample_logged(host, models, product, family, example, run):
    base, labels_path, _ = models[family]
    patched = randomized.Patched(host, product("nodes.integration"), {"family": family, **example}, base)
    log = CallLog(base.model.diffusion_model)
    try:
        output = randomized.sample(patched.model, family, run, labels_path)
    finally:
        log.remove()
    report = patched.handle.last
    check_report_against_calls(report, log.calls, patched.cached_rows())
    assert report["evaluations"] == patched.evaluations
    assert torch.isfinite(output).all()
    return output, report


@pytest.mark.parametrize("family", ["wan", "flux"])
@pytest.mark.parametrize("site", ["model", "span"])
def test_prompt_scheduling_reports_the_evaluations_that_ran(family, site, host, models, product):
    """A second prompt starts at 40% of the schedule (evaluation 4 of 8 on both models, between the computes at
    0, 3 and 6): that evaluation computes for it, and the report says so."""
    example = {**EXAMPLE, "policy": {**EXAMPLE["policy"], "threshold": 3.0},
               "apply": {**EXAMPLE["apply"], "site": site, "probe_blocks": 0 if site == "model" else 1}}
    _, report = _sample_logged(host, models, product, family, example, {**RUN, "conditioning": "timestep_range"})
    assert report["evaluations_filled"] > 0


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_caching_goes_on_when_the_reference_prompt_leaves_the_schedule(family, host, models, product):
    """cfg 1: the only conditioning is scheduled, so the one that decided leaves at 40%; the next one decides."""
    run = {**RUN, "cfg": 1.0, "steps": 10, "conditioning": "timestep_range"}
    _, report = _sample_logged(host, models, product, family, EXAMPLE, run)
    evaluations = report["trace"]["evaluations"]
    late = [e for e in evaluations if e["index"] >= len(evaluations) // 2]
    assert any(e["decision"] != "computed" for e in late), [e["decision"] for e in evaluations]


@pytest.mark.parametrize("family", ["wan", "flux"])
@pytest.mark.parametrize("site", ["model", "span", "blocks"])
def test_regional_prompts_are_cached_at_their_own_size(family, site, host, models, product):
    example = {**EXAMPLE, "apply": {**EXAMPLE["apply"], "site": site, "probe_blocks": 0 if site == "model" else 1}}
    run = {**RUN, "height": 12, "width": 12, "conditioning": "area"}
    _, report = _sample_logged(host, models, product, family, example, run)
    assert not [n for n in report["notes"] if "reset" in n], report["notes"]
    assert report["evaluations_filled"] > 0


def _with_slg(graph, double, single, **slg):
    graph["slg"] = {"class_type": "SkipLayerGuidanceDiT", "inputs": {
        "model": list(graph["sampler"]["inputs"]["model"]), "double_layers": double, "single_layers": single,
        "scale": 3.0, "start_percent": 0.0, "end_percent": 1.0, "rescaling_scale": 0.0, **slg}}
    graph["sampler"]["inputs"]["model"] = ["slg", 0]
    return graph


@pytest.mark.parametrize("family, site, double, single, speed", [
    ("flux", "span", "", "0", 0.0),  # was: size mismatch in cache_core/blocks.py
    ("flux", "span", "0", "", 1.0),  # was: size mismatch in the fill
    ("flux", "model", "1", "2", 1.0),  # was: the guidance pass entered the positive's cache
    ("wan", "span", "1", "", 1.0),  # was: KeyError 'img'
    ("wan", "blocks", "0", "", 1.0),
])
def test_skip_layer_guidance_after_the_cache_runs_apart_from_it(family, site, double, single, speed, paths,
                                                               run_graph):
    steps = 6
    graph = with_cache(GRAPHS[family](paths, steps=steps), policy={"method": "fixed", "speed": speed, "warmup_steps": 0},
                       apply={"site": site, "probe_blocks": 0 if site == "model" else 1}, forecaster={"order": 1})
    latent, report = run_graph(_with_slg(graph, double, single))
    assert torch.isfinite(latent).all()
    assert report["calls_stood_aside"] == steps  # one guidance pass per step, each run uncached
    assert [e["aside"] for e in report["trace"]["evaluations"]] == [1] * steps
    assert any("Skip Layer Guidance" in n for n in report["notes"])
    if speed == 0.0:
        plain, _ = run_graph(without_cache(graph))
        assert torch.equal(latent, plain)
    else:
        assert report["evaluations_filled"] > 0


def test_two_apply_nodes_on_one_model_are_refused_with_a_clear_message(host, paths):
    graph = with_cache(wan_graph(paths, steps=3))
    graph["cache_apply_2"] = {"class_type": "ApplyFeatureCache", "inputs": {
        **graph["cache_apply"]["inputs"], "model": ["cache_apply", 0]}}
    graph["sampler"]["inputs"]["model"] = ["cache_apply_2", 0]
    with pytest.raises(RuntimeError, match="Feature cache: this model already comes from an Apply Feature Cache"):
        host.execute(graph)


def test_cache_map_on_a_cache_the_sampler_did_not_use_says_so(host, paths):
    graph = with_cache(wan_graph(paths, steps=3))
    graph["sampler"]["inputs"]["model"] = ["model", 0]  # the sampler samples the plain model
    outputs = host.execute(graph)
    report = outputs["cache_map"]["feature_cache_report"][0]
    assert report["evaluations"] == 0
    assert "samples another model" in report["notes"][-1] and "sampled nothing" in report["notes"][-1]


def test_over_budget_note_gives_a_readable_size_for_small_caches(run_graph, paths):
    graph = with_cache(wan_graph(paths, steps=4), policy={"method": "fixed", "threshold": 2.0},
                       apply={"memory_budget_mb": 0.001})
    _, report = run_graph(graph)
    note = next(n for n in report["notes"] if "budget" in n)
    assert "0.0 MiB" not in note and "KiB" in note, note


def test_probe_plus_corrector_error_is_prefixed(host, paths):
    graph = with_cache(flux_graph(paths, steps=2), apply={"probe_blocks": 4, "corrector_blocks": 2})
    with pytest.raises(RuntimeError, match="Feature cache: probe_blocks"):
        host.execute(graph)
