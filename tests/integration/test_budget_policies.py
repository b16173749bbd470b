"""Every policy through the real host: finite output, and with `speed` the compute fraction lands on its budget."""
import pytest
import torch

from benchmarks.graphs import GRAPHS, with_cache
from cache_core import budget_for_speed

STEPS = 20
SPEED = 0.5  # budget 0.387: reachable at the span site of the 4-block Wan and 6-block Flux fixtures
METHODS = [("fixed", "model"), ("planned", "model"), ("teacache", "span"), ("easycache", "model"),
           ("first_block", "span"), ("dicache", "span"), ("default", "span")]


@pytest.fixture()
def user_directory(host, tmp_path):
    """MagCache stores its calibrations under ComfyUI's user directory: a fresh one per test."""
    import folder_paths  # importable once the host is up
    before = folder_paths.get_user_directory()
    folder_paths.set_user_directory(str(tmp_path))
    try:
        yield tmp_path
    finally:
        folder_paths.set_user_directory(before)


def _graph(family, paths, method, site, speed=SPEED):
    return with_cache(GRAPHS[family](paths, steps=STEPS), apply={"site": site},
                      policy={"method": method, "speed": speed, "max_consecutive": -1},
                      forecaster={"method": "taylor", "order": 1})


@pytest.mark.parametrize("family", list(GRAPHS))
@pytest.mark.parametrize("method,site", METHODS)
def test_policy_spends_its_budget(family, method, site, paths, run_graph):
    latent, report = run_graph(_graph(family, paths, method, site))
    assert torch.isfinite(latent).all()
    assert report["budget"] == pytest.approx(budget_for_speed(SPEED))
    assert abs(report["compute_fraction"] - report["budget"]) <= 0.05, report["notes"]
    assert report["evaluations_filled"] > 0


@pytest.mark.parametrize("family", list(GRAPHS))
def test_magcache_calibrates_on_first_use_then_spends_its_budget(family, paths, run_graph, user_directory):
    uncached, _ = run_graph(GRAPHS[family](paths, steps=STEPS))
    first, report = run_graph(_graph(family, paths, "magcache", "model"))
    assert torch.equal(first, uncached) and report["evaluations_filled"] == 0
    assert any("computes every step to calibrate" in n for n in report["notes"])
    assert any("calibration saved" in n for n in report["notes"])
    assert list((user_directory / "feature_cache" / "magcache").glob("*.json"))
    second, report = run_graph(_graph(family, paths, "magcache", "model"))
    assert torch.isfinite(second).all()
    assert any("calibration of this schedule" in n for n in report["notes"])
    assert abs(report["compute_fraction"] - report["budget"]) <= 0.05, report["notes"]
    fewer = with_cache(GRAPHS[family](paths, steps=STEPS - 4), apply={"site": "model"},
                       policy={"method": "magcache", "speed": SPEED})
    _, report = run_graph(fewer)
    assert any(f"interpolated to {STEPS - 4} steps" in n for n in report["notes"]) and report["evaluations_filled"]


def test_dicache_on_the_model_site_is_refused_before_sampling(paths, run_graph):
    with pytest.raises(Exception, match="probe_blocks >= 1"):
        run_graph(_graph("wan", paths, "dicache", "model"))


@pytest.mark.parametrize("method", ["easycache", "default"])
def test_budget_holds_with_two_evaluations_per_step(method, paths, run_graph):
    """Heun evaluates the model twice per step (once at the end): the controller learns it as the run goes;
    the default's plan computes every evaluation of a planned step."""
    graph = with_cache(GRAPHS["wan"](paths, steps=12, sampler_name="heun"), apply={"site": "model"},
                       policy={"method": method, "speed": SPEED})
    latent, report = run_graph(graph)
    assert report["evaluations"] > 12 and torch.isfinite(latent).all()
    assert abs(report["compute_fraction"] - report["budget"]) <= 0.05, report["notes"]
