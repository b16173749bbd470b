"""Token-level partial recompute on plain tensors: gather, selections, ratio 1, ClusCa propagation, fractions,
attention to cached keys and values."""
import dataclasses

import pytest
import torch

from cache_core import (AttentionLayout, BlockRunner, CacheConfig, CacheRun, FixedInterval, ForecasterConfig, Site, TokenConfig,
                        TokenLayout, Trace, COMPUTED, PARTIAL, REUSED)
from cache_core.tokens import SelfAttention, TokenState, gather, kmeans, positions_of, spread_over_clusters

from test_engine import LAYOUT, SIGMAS, STREAMS, TinyDiT, _inputs, sample

# TinyDiT's double blocks see (img, txt), its single blocks cat(txt, img), as Flux's do.
LAYOUTS = {"double": TokenLayout("img", text="txt", rows=(("pe", 1),)),
           "single": TokenLayout("img", text="txt", text_in_stream=True, rows=(("pe", 1),))}


REUSE = CacheConfig(policy=FixedInterval(interval=3, warmup_steps=0), site=Site("span", probe_blocks=1))


def sample_tokens(config, uuids=("c", "u"), model=None):
    return sample(config, uuids, model=model, token_layouts=LAYOUTS)


def config(selection="score", ratio=0.5, site="span", interval=3, **tokens):
    return CacheConfig(policy=FixedInterval(interval=interval, warmup_steps=0), site=Site(site, probe_blocks=1),
                       tokens=TokenConfig(selection=selection, ratio=ratio, **tokens))


def test_gather_takes_the_token_rows_and_their_positional_rows_behind_the_text():
    txt, img = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    pe = torch.arange(8.0).view(1, 8, 1)  # one row per position: 3 text, then 5 tokens
    index = torch.tensor([1, 4])
    double = gather({"img": img, "txt": txt, "pe": pe, "vec": 7}, LAYOUTS["double"], ("img", "txt"), index, 3)
    assert torch.equal(double["img"], img[:, [1, 4]]) and torch.equal(double["txt"], txt)
    assert double["txt"] is not txt  # blocks may update their input in place: whole streams are copies
    assert double["pe"].flatten().tolist() == [0, 1, 2, 4, 7] and double["vec"] == 7
    single = gather({"img": torch.cat([txt, img], 1), "pe": pe}, LAYOUTS["single"], ("img",), index, 3)
    assert torch.equal(single["img"], torch.cat([txt, img[:, [1, 4]]], 1))
    # scattering the rows back where they came from restores the stream
    assert torch.equal(torch.zeros_like(img).index_copy(1, index, double["img"])[:, index], img[:, index])


def test_gather_shares_broadcast_rows_and_expands_coarse_rows():
    layout = TokenLayout("img", rows=(("vec", 1), ("mask", (-2, -1))))
    img = torch.randn(1, 6, 2)
    per_frame = torch.tensor([[10.0], [20.0], [30.0]]).view(1, 3, 1)  # each row covers 2 consecutive tokens
    mask = torch.arange(36.0).view(1, 6, 6)
    index = torch.tensor([0, 3, 5])
    sub = gather({"img": img, "vec": per_frame, "mask": mask}, layout, ("img",), index, 0)
    assert sub["vec"].flatten().tolist() == [10, 20, 30]
    assert torch.equal(sub["mask"], mask[:, index][:, :, index])
    shared = gather({"img": img, "vec": torch.ones(1, 1, 6)}, layout, ("img",), index, 0)
    assert shared["vec"].shape == (1, 1, 6)


@pytest.mark.parametrize("selection", ["score", "cluster", "random"])
@pytest.mark.parametrize("site", ["span", "blocks"])
def test_ratio_one_is_a_full_compute_bit_for_bit(selection, site):
    outs, run, _ = sample_tokens(config(selection, ratio=1.0, site=site, clusters=2))
    full, _, _ = sample(CacheConfig(policy=FixedInterval(interval=1), site=Site(site, probe_blocks=1)))
    assert [ev.decision for ev in run.trace.evaluations].count(PARTIAL) == 4
    assert all(torch.equal(a, b) for a, b in zip(outs, full))
    assert run.report()["compute_fraction"] == 1.0


@pytest.mark.parametrize("selection", ["score", "cluster", "random"])
def test_partial_evaluation_recomputes_the_selected_tokens_and_fills_the_others(selection):
    """TinyDiT's blocks act per token, so recomputed rows equal the full compute and the others the plain fill."""
    full, _, _ = sample(CacheConfig(policy=FixedInterval(interval=1), site=Site("span", probe_blocks=1)))
    reuse, _, _ = sample(REUSE)
    one, run1, _ = _first_partial(selection)
    chosen = run1.tokens.memory["c"].age == 0
    assert 0 < int(chosen.sum()) < chosen.numel()
    assert torch.allclose(one[:, chosen], full[1][:, chosen], atol=1e-6)
    assert torch.equal(one[:, ~chosen], reuse[1][:, ~chosen])


def _first_partial(selection, gamma=0.0):
    """Outputs of evaluation 1 of a token run fed the full-compute trajectory's inputs (so inputs agree)."""
    cfg = config(selection, ratio=0.5, clusters=2, gamma=gamma)
    model = TinyDiT()
    run = CacheRun(cfg, cfg.site.rows(LAYOUT), SIGMAS)
    runner = BlockRunner(run, cfg.site.plan(LAYOUT), STREAMS, token_layouts=LAYOUTS)
    img, txt = _inputs()
    out0 = model(img, txt, SIGMAS[0], ["c", "u"], runner)
    img = img + 0.05 * out0
    return model(img, txt, SIGMAS[1], ["c", "u"], runner), run, model


def test_cluster_propagation_with_gamma_zero_is_reuse_and_with_gamma_moves_the_cluster():
    reuse, _, _ = sample(REUSE)
    still, run, _ = _first_partial("cluster", gamma=0.0)
    moved, _, _ = _first_partial("cluster", gamma=0.5)
    others = run.tokens.memory["c"].age > 0
    assert torch.equal(still[:, others], reuse[1][:, others])
    assert not torch.allclose(moved[:, others], reuse[1][:, others])


def test_gamma_zero_changes_no_filled_row():
    state = TokenState(TokenConfig(selection="cluster", clusters=2, gamma=0.0))
    state.labels = {4: torch.tensor([0, 0, 1, 1])}
    fill, index = torch.randn(1, 4, 3), torch.tensor([0, 2])
    assert state.update("k", ["c"], fill, index, torch.randn(1, 2, 3)) is None
    state = TokenState(TokenConfig(selection="cluster", clusters=2, gamma=0.5))
    state.labels = {4: torch.tensor([0, 0, 1, 1])}
    fresh = torch.randn(1, 2, 3)
    change = state.update("k", ["c"], fill, index, fresh)
    assert torch.allclose(change[:, 1], 0.5 * (fresh[:, 0] - fill[:, 0]))  # half its cluster's update
    assert torch.allclose(change[:, 3], 0.5 * (fresh[:, 1] - fill[:, 2]))
    assert torch.equal(change[:, index], torch.zeros(1, 2, 3))


@pytest.mark.parametrize("selection", ["score", "cluster", "random"])
def test_selection_is_deterministic_for_a_fixed_seed(selection):
    def indices(seed):
        _, run, _ = sample_tokens(config(selection, ratio=0.5, clusters=2, seed=seed))
        return run.tokens.memory["c"].age.tolist(), [ev.actions for ev in run.trace.evaluations]
    assert indices(0) == indices(0)
    if selection == "random":
        assert indices(0) != indices(3)


def test_score_prefers_changed_and_old_tokens():
    state = TokenState(TokenConfig(selection="score", ratio=0.25))
    base = torch.ones(1, 8, 2)
    state.select(base, ["c"], 0, compute=True, partial=False, reference=0)
    moved = base.clone()
    moved[0, 5] += 3.0
    assert state.select(moved, ["c"], 1, compute=False, partial=True, reference=0).tolist() == [0, 5]
    # token 5 is fresh now; the oldest tokens (all but 0 and 5) win, lowest index first on ties
    assert state.select(moved, ["c"], 2, compute=False, partial=True, reference=0).tolist() == [1, 2]


def test_kmeans_is_deterministic_and_every_cluster_gives_a_token_first():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10, 4, generator=g) + 10, torch.randn(6, 4, generator=g) - 10])
    labels = kmeans(x, 2)
    assert torch.equal(labels, kmeans(x, 2))
    assert len(set(labels[:10].tolist())) == 1 and len(set(labels[10:].tolist())) == 1
    chosen = spread_over_clusters(labels, 4, torch.randperm(16, generator=g))
    assert set(labels[chosen].tolist()) == {0, 1} and chosen.numel() == 4


def test_duca_alternates_partial_and_plain_fills():
    _, run, _ = sample_tokens(config("random", ratio=0.5, interval=4, alternate=True))
    assert [ev.decision for ev in run.trace.evaluations] == [COMPUTED, PARTIAL, REUSED, PARTIAL, COMPUTED, PARTIAL]


def test_forecasters_fill_the_tokens_that_were_not_recomputed():
    cfg = CacheConfig(policy=FixedInterval(interval=3, warmup_steps=0), site=Site("span", probe_blocks=1),
                      forecaster=ForecasterConfig("taylor", 1), tokens=TokenConfig(ratio=0.5))
    outs, run, _ = sample_tokens(cfg)
    assert all(torch.isfinite(o).all() for o in outs)
    assert run.report()["evaluations_partial"] == 4


def test_compute_fraction_counts_partial_cells_at_their_fraction():
    # TinyDiT: 6 tokens + 3 text rows; ratio 0.5 runs 3 tokens + the text: 6 of 9 rows
    _, run, model = sample_tokens(config("random", ratio=0.5))
    cells = run.trace.counts()
    assert cells[PARTIAL] == 4 * 4 and cells[COMPUTED] == 2 * 5 + 4
    assert run.report()["compute_fraction"] == pytest.approx((14 + 16 * 6 / 9) / 30)
    again = Trace.from_dict(run.report()["trace"])
    assert again.compute_fraction() == run.trace.compute_fraction()


def test_token_memory_is_counted_in_the_peak_cache_bytes():
    _, plain, _ = sample(REUSE)
    _, tokens, _ = sample_tokens(config("score"))
    assert tokens.report()["peak_cache_bytes"] > plain.report()["peak_cache_bytes"]


@pytest.mark.parametrize("make, message", [
    (lambda: TokenConfig(ratio=0.0), "ratio"),
    (lambda: TokenConfig(ratio=1.5), "ratio"),
    (lambda: CacheConfig(site=Site("model"), tokens=TokenConfig()), "'span' or 'blocks'"),
])
def test_bad_input_says_what_to_change(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_cluster_count_is_at_most_the_tokens_recomputed():
    assert TokenConfig(selection="cluster", clusters=8, ratio=0.25).clusters_for(16) == 4
    assert TokenConfig(selection="cluster", clusters=3, ratio=0.25).clusters_for(16) == 3
    _, run, _ = sample_tokens(config("cluster", ratio=0.5, clusters=64))
    assert any("clusters used" in note for note in run.report()["notes"])


def test_more_clusters_than_image_tokens_are_refused_and_other_selections_ignore_clusters():
    with pytest.raises(ValueError, match="9 clusters but the latent has only 8 image tokens.*at most 8"):
        TokenConfig(selection="cluster", clusters=9).check_tokens(8)
    TokenConfig(selection="cluster", clusters=8).check_tokens(8)
    TokenConfig(selection="score", clusters=9).check_tokens(8)


# -- attention to cached keys and values -----------------------------------------------------------
ATTENDING = {kind: dataclasses.replace(layout, attention=AttentionLayout(sequence_dim=1))
             for kind, layout in LAYOUTS.items()}


def _with_hook(args, hook):
    return {**args, "hook": hook}


class AttendingDiT(TinyDiT):
    """TinyDiT whose blocks mix tokens: self-attention over cat(txt, img) (the args' "hook" routes the call, as
    the host's attention override does), then a second attention call (cross-attention to a fixed context)."""

    def __init__(self, dim=8, seed=0):
        super().__init__(dim, seed)
        self.context = torch.randn(1, 2, dim, generator=torch.Generator().manual_seed(seed + 1))

    def _block(self, kind, i, sigma):
        w = self.weights[(kind, i)]

        def attention(q, k, v):
            return torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1) @ v

        def run(args):
            self.calls += 1
            hook = args.get("hook")
            attend = (lambda *a: hook(attention, *a)) if hook else attention
            h = torch.cat([args["txt"], args["img"]], 1) if kind == "double" else args["img"]
            h = h + sigma * attend(h @ w, h @ w.T, torch.tanh(h))
            h = h + attend(h, self.context.expand(h.shape[0], -1, -1), self.context.expand(h.shape[0], -1, -1))
            if kind == "double":
                return {"txt": h[:, :args["txt"].shape[1]], "img": h[:, args["txt"].shape[1]:]}
            return {"img": h}
        return run


def _attending_runner(cfg, attention=True):
    run = CacheRun(cfg, cfg.site.rows(LAYOUT), SIGMAS)
    return run, BlockRunner(run, cfg.site.plan(LAYOUT), STREAMS, token_layouts=ATTENDING,
                            with_attention=_with_hook if attention else None)


@pytest.mark.parametrize("site", ["span", "blocks"])
def test_ratio_one_with_cached_attention_is_a_full_compute(site):
    model, (img, txt) = AttendingDiT(), _inputs()
    full_run, full = _attending_runner(CacheConfig(policy=FixedInterval(interval=1), site=Site(site, probe_blocks=1)))
    run, partial = _attending_runner(config("random", ratio=1.0, site=site, recompute_text=True))
    for sigma in SIGMAS[:4]:
        expected = model(img, txt, sigma, ["c", "u"], full)
        assert torch.equal(model(img, txt, sigma, ["c", "u"], partial), expected)
        img = img + 0.05 * expected
    assert [ev.decision for ev in run.trace.evaluations] == [COMPUTED, PARTIAL, PARTIAL, COMPUTED]
    assert run.report()["attention_cache_bytes"] > 0


@pytest.mark.parametrize("selection", ["score", "cluster", "random"])
def test_the_subset_attends_to_the_cached_keys_and_values_of_every_token(selection):
    """An evaluation whose input equals the computed one's: with cached keys and values the recomputed tokens
    see exactly what they saw then, so the whole output is the computed one; attending only to each other
    they do not."""
    model, (img, txt) = AttendingDiT(), _inputs()
    outputs = {}
    for attention in (True, False):
        run, runner = _attending_runner(config(selection, ratio=0.5, clusters=2), attention)
        computed = model(img, txt, SIGMAS[0], ["c", "u"], runner)
        outputs[attention] = model(img, txt, SIGMAS[0], ["c", "u"], runner)  # a new evaluation, same input
        assert [ev.decision for ev in run.trace.evaluations] == [COMPUTED, PARTIAL]
    assert torch.allclose(outputs[True], computed, atol=1e-5)
    assert not torch.allclose(outputs[False], computed, atol=1e-3)


def test_self_attention_hook_passes_other_calls_and_writes_fresh_rows_into_the_cached_keys():
    kept = []
    cached = (torch.zeros(1, 5, 2), torch.ones(1, 5, 2))
    hook = SelfAttention(AttentionLayout(sequence_dim=1, call=1), lambda k, v: kept.append((k, v)), cached,
                         positions_of(torch.tensor([1, 2]), 1))  # text row 0, tokens 1 and 2: positions 0, 2, 3
    echo = lambda q, k, v, *rest, **kw: (k, v, rest, kw)
    fresh = torch.full((1, 3, 2), 7.0)
    assert hook(echo, fresh, fresh, fresh)[0] is fresh  # call 0 (cross-attention, say): untouched
    k, v, rest, kw = hook(echo, fresh, fresh, fresh, 4, mask=None)
    assert k[0, :, 0].tolist() == [7, 0, 7, 7, 0] and v[0, :, 0].tolist() == [7, 1, 7, 7, 1]
    assert rest == (4,) and kw == {"mask": None} and kept[0][0] is k
    assert torch.equal(cached[0], torch.zeros(1, 5, 2))  # the cache is written by `keep`, never in place


def test_cached_attention_keeps_two_tables_per_cached_block_and_conditioning():
    run, runner = _attending_runner(config("random", ratio=0.5))
    AttendingDiT()(*_inputs(), SIGMAS[0], ["c", "u"], runner)
    # span site, probe 1: 4 cached blocks (1 double, 3 single), each attending over 3 text + 6 tokens of width 8
    assert run.tokens.keys_values_bytes == 4 * 2 * 2 * (9 * 8 * 4)
    assert run.report()["peak_cache_bytes"] >= run.tokens.keys_values_bytes


def test_kept_keys_values_are_batched_per_conditioning_and_dropped_with_its_caches():
    state = TokenState(TokenConfig())
    k, v = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    state.keep_keys_values("b", ["c", "u"], k, v)
    assert state.keys_values_bytes == 2 * k.numel() * 4
    assert torch.equal(state.cached_keys_values("b", ["u", "c"], 5, 1)[0], torch.cat([k[1:], k[:1]]))
    assert state.cached_keys_values("b", ["c"], 6, 1) is None  # other positions: not these
    state.drop_keys_values("c")
    assert state.cached_keys_values("b", ["c", "u"], 5, 1) is None and state.keys_values_bytes == k.numel() * 4
    state.drop_keys_values()
    assert state.keys_values == {} and state.keys_values_bytes == 0


def test_the_memory_budget_bounds_the_kept_keys_values_and_those_blocks_attend_to_the_subset():
    def first_partial(budget_mb):
        cfg = dataclasses.replace(config("random", ratio=0.5), memory_budget_mb=budget_mb)
        run, runner = _attending_runner(cfg)
        model, (img, txt) = AttendingDiT(), _inputs()
        model(img, txt, SIGMAS[0], ["c", "u"], runner)
        return model(img, txt, SIGMAS[0], ["c", "u"], runner), run
    unbounded, run = first_partial(0.0)
    per_block = run.tokens.keys_values_bytes // 4
    room = (run.cache_bytes + run.tokens.nbytes - 2 * per_block) / 2**20  # for all but two blocks' keys and values
    bounded, run = first_partial(room)
    assert 0 < run.tokens.keys_values_bytes < 4 * per_block
    assert any("leaves no room for the attention keys" in note for note in run.report()["notes"])
    assert not torch.allclose(bounded, unbounded, atol=1e-3)  # some blocks attended to the subset only


def test_without_a_budget_the_kept_keys_values_take_at_most_a_share_of_the_free_memory(monkeypatch):
    import cache_core.engine as engine

    def first_partial(free_bytes):
        monkeypatch.setattr(engine, "free_memory_bytes", lambda device: free_bytes)
        run, runner = _attending_runner(config("random", ratio=0.5))
        model, (img, txt) = AttendingDiT(), _inputs()
        model(img, txt, SIGMAS[0], ["c", "u"], runner)
        return model(img, txt, SIGMAS[0], ["c", "u"], runner), run
    unbounded, run = first_partial(None)  # free memory unknown: no limit
    per_block = run.tokens.keys_values_bytes // 4
    assert per_block > 0 and not run.report()["notes"]
    bounded, run = first_partial(2 * per_block / engine.ATTENTION_SHARE_OF_FREE)  # room for two blocks
    assert run.tokens.keys_values_bytes == 2 * per_block
    assert any("of the cpu memory free at the start" in note for note in run.report()["notes"])
    assert not torch.allclose(bounded, unbounded, atol=1e-3)


def test_filled_text_runs_only_the_tokens_and_they_still_see_the_kept_text():
    """With the text filled, the recomputed tokens attend to the text's kept keys and values: an evaluation whose
    input equals the computed one's gives the computed output, though only the tokens (and one row of the double
    blocks' own text stream, which a block needs) ran. Without kept keys and values the text runs whole."""
    model, (img, txt) = AttendingDiT(), _inputs()
    run, runner = _attending_runner(config("random", ratio=0.5, recompute_text=False))
    computed = model(img, txt, SIGMAS[0], ["c", "u"], runner)
    assert torch.allclose(model(img, txt, SIGMAS[0], ["c", "u"], runner), computed, atol=1e-5)
    # TinyDiT at the span site: probe double block 0, cached double block 1 and single blocks 0-2; 3 text rows
    assert run.trace.evaluations[1].actions == [COMPUTED, PARTIAL, PARTIAL, PARTIAL, PARTIAL]
    assert run.trace.compute_fraction() == pytest.approx((5 + 1 + (1 + 3) / 9 + 3 * 3 / 9) / 10)
    for recompute_text, attention in ((True, True), (False, False)):  # asked for, or nothing kept to attend to
        run, runner = _attending_runner(config("random", ratio=0.5, recompute_text=recompute_text), attention)
        model(img, txt, SIGMAS[0], ["c", "u"], runner)
        model(img, txt, SIGMAS[0], ["c", "u"], runner)
        assert run.trace.compute_fraction() == pytest.approx((5 + 1 + 4 * 6 / 9) / 10)
