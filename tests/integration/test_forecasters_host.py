"""Every forecaster kind through the real host on the tiny models; the heunpp2 NaN regression (issue 10)."""
import dataclasses

import pytest
import torch

from benchmarks.graphs import GRAPHS, with_cache

STEPS = 8
FIXED = {"method": "fixed", "threshold": 4.0}  # interval 4: evaluations 0 and 4 computed
KINDS = ["reuse", "taylor", "hicache", "ab", "foca", "spectrum", "freqca", "hyca", "auto"]
# (family, site) per run: every kind at the model site on Wan and at the blocks site on Flux
# (whose single blocks see cat(txt, img)); freqca also on Wan's span.
RUNS = [(kind, "wan", "model") for kind in KINDS] + [(kind, "flux", "blocks") for kind in KINDS] + [
    ("freqca", "wan", "span")]


@pytest.fixture(scope="module")
def reuse_reports(paths, run_graph):
    """The reuse run of each (family, site): its compute fraction is what every kind must reach."""
    cache = {}

    def get(family, site):
        if (family, site) not in cache:
            graph = with_cache(GRAPHS[family](paths, steps=STEPS), policy=FIXED, apply={"site": site},
                               forecaster={"method": "reuse", "order": 0})
            cache[(family, site)] = run_graph(graph)
        return cache[(family, site)]
    return get


@pytest.mark.parametrize("kind, family, site", RUNS)
def test_every_forecaster_kind_samples_through_the_host(kind, family, site, paths, run_graph, reuse_reports):
    graph = with_cache(GRAPHS[family](paths, steps=STEPS), policy=FIXED, apply={"site": site},
                       forecaster={"method": kind})
    latent, report = run_graph(graph)
    reuse_latent, reuse_report = reuse_reports(family, site)
    assert torch.isfinite(latent).all()
    assert report["evaluations"] == STEPS and report["evaluations_computed"] == 2
    assert report["compute_fraction"] == pytest.approx(reuse_report["compute_fraction"])
    if kind == "reuse":
        assert torch.equal(latent, reuse_latent)
    elif kind not in ("hyca", "auto"):  # selections may keep reuse everywhere after two computed points
        assert not torch.equal(latent, reuse_latent)


@pytest.mark.parametrize("family", list(GRAPHS))
def test_heunpp2_with_a_second_order_taylor_gives_a_finite_image(family, paths, run_graph):
    """heunpp2 returns to a sigma it used two evaluations earlier; the divided difference divided by zero (all NaN)."""
    graph = with_cache(GRAPHS[family](paths, steps=8, sampler_name="heunpp2"),
                       policy={"method": "easycache", "threshold": 0.1}, apply={"site": "model"},
                       forecaster={"method": "taylor", "order": 2})
    latent, report = run_graph(graph)
    assert torch.isfinite(latent).all()
    assert report["evaluations_filled"] > 0
    assert report["guarded_fills"] == 0  # finite by the forecaster itself, not by the guard


def test_freqca_on_blocks_without_a_token_grid_names_the_inputs_to_change(host, paths, product, monkeypatch):
    adapters = product("nodes.adapters")
    monkeypatch.setattr(adapters, "ADAPTERS", tuple(dataclasses.replace(a, patch=()) for a in adapters.ADAPTERS))
    graph = with_cache(GRAPHS["wan"](paths, steps=2), apply={"site": "span"}, forecaster={"method": "freqca"})
    with pytest.raises(RuntimeError, match="site to 'model'.*Cache Forecaster method"):
        host.execute(graph)
