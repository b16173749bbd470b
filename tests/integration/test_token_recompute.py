"""Token-level partial recompute (Cache Token Ratio) on the tiny Wan and Flux through the host's own sampler."""
import pytest
import torch

from benchmarks.graphs import GRAPHS, flux_graph, wan_graph, with_cache

STEPS = 6
INTERVAL = 3  # computed evaluations 0 and 3, the others filled
# 64-pixel latents are 8x8: 16 image tokens per frame (2x2 patches); the label conditioning has 8 text tokens
# (graph, rows of the trace, image tokens, text tokens, text rows each cached block runs on a partial evaluation):
# Wan's text is cross-attention context; Flux fills its text, its cached double block keeps one row of its own
# text stream, its 4 single blocks (cat(txt, img)) none.
CASES = {
    "wan-image": (lambda paths: wan_graph(paths, steps=STEPS), 4, 16, 0, (0, 0, 0)),
    "wan-video": (lambda paths: wan_graph(paths, steps=STEPS, frames=2), 4, 32, 0, (0, 0, 0)),
    "flux-image": (lambda paths: flux_graph(paths, steps=STEPS), 6, 16, 8, (1, 0, 0, 0, 0)),
}
SELECTIONS = {"score": {}, "cluster": {"selection": "cluster", "clusters": 2}, "random": {"selection": "random"},
              "duca": {"selection": "random", "alternate": True}}


def token_graph(graph, site="span", **tokens):
    graph = with_cache(graph, policy={"method": "fixed", "threshold": float(INTERVAL), "warmup_steps": 0},
                       apply={"site": site, "probe_blocks": 1})
    graph["cache_tokens"] = {"class_type": "FeatureCacheTokenRatio", "inputs": {
        "selection": "score", "ratio": 0.25, "clusters": 16, "gamma": 1.0, "alternate": False, **tokens}}
    graph["cache_apply"]["inputs"]["tokens"] = ["cache_tokens", 0]
    return graph


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_every_selection_samples_and_computes_the_predicted_fraction(case, selection, paths, run_graph):
    _samples_with_the_predicted_fraction(case, "span", selection, paths, run_graph)


@pytest.mark.parametrize("case", list(CASES))
def test_the_blocks_site_recomputes_tokens_block_by_block(case, paths, run_graph):
    _samples_with_the_predicted_fraction(case, "blocks", "random", paths, run_graph)


def _samples_with_the_predicted_fraction(case, site, selection, paths, run_graph):
    make, rows, tokens, text, text_run = CASES[case]
    latent, report = run_graph(token_graph(make(paths), site=site, **SELECTIONS[selection]))
    assert torch.isfinite(latent).all()
    decisions = [e["decision"] for e in report["trace"]["evaluations"]]
    partial = [1, 4] if selection == "duca" else [1, 2, 4, 5]
    assert [i for i, d in enumerate(decisions) if d == "partial"] == partial
    assert [i for i, d in enumerate(decisions) if d == "computed"] == [0, 3]
    cells = sum((t + round(0.25 * tokens)) / (text + tokens) for t in text_run)  # rows run / rows of a full run
    work = 2 * rows + len(partial) * (1 + cells) + (STEPS - 2 - len(partial))  # the probe block always runs
    assert report["compute_fraction"] == pytest.approx(work / (STEPS * rows))
    assert report["cells"]["partial"] == len(partial) * (rows - 1)


@pytest.mark.parametrize("family", list(GRAPHS))
@pytest.mark.parametrize("site", ["span", "blocks"])
def test_ratio_one_is_bit_identical_to_the_uncached_graph(family, site, paths, run_graph):
    """Every token and text row gathered (with its rotary rows) and scattered back: exactly a full compute."""
    plain, _ = run_graph(GRAPHS[family](paths, steps=STEPS))
    latent, report = run_graph(token_graph(GRAPHS[family](paths, steps=STEPS), site=site, ratio=1.0,
                                           recompute_text=True))
    assert report["evaluations_partial"] == 4
    assert report["attention_cache_bytes"] > 0  # the subset attended to the kept keys and values
    assert torch.equal(latent, plain)


def test_more_clusters_than_recomputed_tokens_use_fewer_clusters_and_say_so(paths, run_graph):
    graph = token_graph(wan_graph(paths, steps=STEPS), selection="cluster", clusters=8)  # 4 of 16 tokens recomputed
    latent, report = run_graph(graph)
    assert bool(latent.isfinite().all()) and report["evaluations_partial"] > 0
    assert any("4 clusters used" in note and "'clusters'" in note for note in report["notes"]), report["notes"]


def test_more_clusters_than_image_tokens_are_refused_before_sampling(host, paths):
    graph = token_graph(wan_graph(paths, steps=STEPS), selection="cluster", clusters=17)  # 16 image tokens
    with pytest.raises(RuntimeError, match="17 clusters but the latent has only 16 image tokens.*'clusters' to at most 16"):
        host.execute(graph)


def test_the_model_site_with_tokens_says_to_choose_span_or_blocks(host, paths):
    graph = token_graph(wan_graph(paths, steps=2), site="model")
    with pytest.raises(RuntimeError, match="choose site 'span' or 'blocks'"):
        host.execute(graph)


def test_a_model_whose_adapter_cannot_gather_tokens_is_refused_before_sampling(product, models, monkeypatch):
    import dataclasses
    adapters, integration, core = product("nodes.adapters"), product("nodes.integration"), product("cache_core")
    wan = models["wan"][0]
    adapter = adapters.adapter_for(wan.model.diffusion_model)
    blind = dataclasses.replace(adapter, kinds=tuple(dataclasses.replace(k, token_rows=None) for k in adapter.kinds))
    config = core.CacheConfig(site=core.Site("span", probe_blocks=1), tokens=core.TokenConfig())
    monkeypatch.setattr(integration, "adapter_for", lambda _model: blind)  # an architecture without token layouts
    with pytest.raises(ValueError, match="cannot gather the tokens.*disconnect the tokens input"):
        integration.install(wan, config, integration.CacheHandle())


@pytest.mark.parametrize("name, tokens", [
    ("fixed+reuse@span+toca0.25", {"selection": "score", "ratio": 0.25}),
    ("fixed+reuse@span+clusca0.1", {"selection": "cluster", "clusters": 4, "ratio": 0.1}),
    ("fixed+reuse@span+random0.5", {"selection": "random", "ratio": 0.5}),
    ("fixed+reuse@span+duca0.25", {"selection": "random", "alternate": True, "ratio": 0.25}),
])
def test_benchmark_token_names_set_the_token_node(host, name, tokens):
    from benchmarks.frontier import names
    assert names.parse(host, name).inputs["tokens"] == tokens


# (sequence dim of the self-attention's q, k, v; text rows; image tokens) of the tiny models at 64 pixels
ATTENTION = {"flux": (2, 8, 16), "wan": (1, 0, 16)}


@pytest.mark.parametrize("family", list(ATTENTION))
def test_cached_attention_chains_the_users_attention_override_and_leaves_nothing_behind(family, models, product):
    """The recomputed tokens' queries meet every position's keys, the user's own override still runs (after
    ours), and after sampling the model's options hold exactly what they held before."""
    from test_model_restored import _sample
    integration, core = product("nodes.integration"), product("cache_core")
    base, labels, shape = models[family]
    dim, text, tokens = ATTENTION[family]
    lengths = []

    def user_override(func, *args, **kwargs):
        lengths.append((args[0].shape[dim], args[1].shape[dim]))
        return func(*args, **kwargs)

    user = base.clone()
    user.model_options["transformer_options"][integration.ATTENTION_OVERRIDE] = user_override
    config = core.CacheConfig(policy=core.FixedInterval(interval=INTERVAL, warmup_steps=0),
                              site=core.Site("span", probe_blocks=1), tokens=core.TokenConfig("random", 0.25))
    outputs = {}
    for model in (user, base):
        handle = integration.CacheHandle()
        cached = integration.install(model, config, handle)
        outputs[model is user] = _sample(cached, labels, shape)
        assert handle.last["evaluations_partial"] > 0 and handle.last["attention_cache_bytes"] > 0
        assert cached.model_options["transformer_options"].get(integration.ATTENTION_OVERRIDE) is \
            model.model_options["transformer_options"].get(integration.ATTENTION_OVERRIDE)
    assert integration.ATTENTION_OVERRIDE not in base.model_options["transformer_options"]
    assert (round(0.25 * tokens), text + tokens) in lengths  # a subset's queries (text filled), every position's keys
    assert (text + tokens, text + tokens) in lengths  # whole blocks still reach the user's override
    assert torch.equal(outputs[True], outputs[False])  # the user's override only watched
