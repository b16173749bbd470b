"""The engine and block runner on a plain-torch stand-in for a two-kind DiT (like Flux: double then single)."""
import pytest
import torch

from cache_core import (FORECASTER_KINDS, BlockRunner, CacheConfig, CacheRun, DiCache, FirstBlock, FixedInterval,
                        ForecasterConfig, MagCache, Site, TeaCache, TokenConfig, TokenGrid, COMPUTED, REUSED, FORECAST)

LAYOUT = [("double", 2), ("single", 3)]
STREAMS = {"double": ("img", "txt"), "single": ("img",)}


class TinyDiT:
    """Blocks h -> h + sigma * tanh(W h); 'single' blocks see cat(txt, img) as Flux does.

    Like Flux, some streams are updated in place (txt and the single-block stream), so the engine
    must never rely on a block's input tensor after the block ran.
    """

    def __init__(self, dim=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weights = {(k, i): torch.randn(dim, dim, generator=g) / dim ** 0.5 for k, n in LAYOUT for i in range(n)}
        self.calls = 0

    def _block(self, kind, i, sigma):
        def run(args):
            self.calls += 1
            out = {}
            for s in STREAMS[kind]:
                update = sigma * torch.tanh(args[s] @ self.weights[(kind, i)])
                if s == "img" and kind == "double":
                    out[s] = args[s] + update
                else:
                    out[s] = args[s].add_(update)  # in place, as Flux's txt and single streams
            return out
        return run

    def __call__(self, img, txt, sigma, uuids, hook=None, control=None):
        """`control`: per double block, added in place to img after the block (as Flux adds ControlNet residuals)."""
        def through(kind, i, args):
            run = self._block(kind, i, sigma)
            return hook(kind, i, args, run, uuids, sigma) if hook else run(args)
        img, txt = img.clone(), txt.clone()  # fresh hidden states, as a model's embedding layers make
        for i in range(2):
            out = through("double", i, {"img": img, "txt": txt})
            img, txt = out["img"], out["txt"]
            if control is not None:
                img += control[i]
        h = torch.cat([txt, img], dim=1)
        for i in range(3):
            h = through("single", i, {"img": h})["img"]
        return h[:, txt.shape[1]:]


SIGMAS = [1.0, 0.8, 0.62, 0.45, 0.3, 0.18, 0.08]


def _inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 6, 8, generator=g), torch.randn(batch, 3, 8, generator=g)


def sample(config, uuids=("c", "u"), separate=False, model=None, token_grid=None, token_layouts=None):
    """A toy sampler: each evaluation feeds a slightly moved input; returns outputs and the run."""
    model = model or TinyDiT()
    run = CacheRun(config, config.site.rows(LAYOUT), SIGMAS)
    runner = BlockRunner(run, config.site.plan(LAYOUT), STREAMS, token_grid=token_grid, token_layouts=token_layouts)
    img, txt = _inputs(len(uuids))
    outs = []
    for sigma in SIGMAS[:-1]:
        if separate:
            parts = [model(img[i:i + 1], txt[i:i + 1], sigma, [u], runner) for i, u in enumerate(uuids)]
            out = torch.cat(parts)
        else:
            out = model(img, txt, sigma, list(uuids), runner)
        outs.append(out)
        img = img + 0.05 * out
    return outs, run, model


def test_speed_zero_is_bit_identical_to_no_runner():
    outs, _, _ = sample(CacheConfig(policy=TeaCache(speed=0.0), site=Site("span")))
    model = TinyDiT()
    img, txt = _inputs()
    for sigma, out in zip(SIGMAS[:-1], outs):
        ref = model(img, txt, sigma, ["c", "u"])
        assert torch.equal(out, ref)
        img = img + 0.05 * ref


def test_fixed_interval_computes_exactly_the_traced_evaluations_and_skips_block_calls():
    config = CacheConfig(policy=FixedInterval(interval=2, warmup_steps=0), site=Site("span", probe_blocks=1))
    _, run, model = sample(config)
    assert run.trace.computed_evaluations() == [0, 2, 4]
    filled = len(SIGMAS) - 1 - 3
    assert model.calls == (len(SIGMAS) - 1) * 5 - filled * 4  # 4 cached blocks skipped per filled evaluation
    ev = run.trace.evaluations[1]
    assert ev.actions == [COMPUTED, REUSED, REUSED, REUSED, REUSED]
    assert run.report()["compute_fraction"] == pytest.approx((3 * 5 + 3 * 1) / 30)


def _record_block_inputs(model) -> dict:
    """From now on, the "img" input each block of `model` first receives, by (kind, index)."""
    seen = {}
    real = model._block

    def spy(kind, i, sigma):
        run_block = real(kind, i, sigma)
        def wrapped(args):
            seen.setdefault((kind, i), args["img"].clone())
            return run_block(args)
        return wrapped
    model._block = spy
    return seen


def _double_span_every_other_step():
    """The two double blocks as one cached span (the singles always computed), filled every other step."""
    config = CacheConfig(policy=FixedInterval(interval=2, warmup_steps=0), site=Site("span", corrector_blocks=3))
    run = CacheRun(config, config.site.rows(LAYOUT), SIGMAS)
    return TinyDiT(), run, BlockRunner(run, config.site.plan(LAYOUT), STREAMS)


def test_filled_span_adds_the_cached_residual_to_its_input():
    model, run, runner = _double_span_every_other_step()
    img, txt = _inputs()
    plain_first = model(img, txt, 1.0, ["c", "u"])  # residual of the double span at sigma 1.0
    model(img, txt, 1.0, ["c", "u"], runner)
    img2 = img + 1.0
    seen = _record_block_inputs(model)
    model(img2, txt, 0.8, ["c", "u"], runner)
    # the first corrector (single 0) received cat(txt + R_txt, img2 + R_img) with R from sigma 1.0
    d = TinyDiT()
    a = {"img": img.clone(), "txt": txt.clone()}
    for i in range(2):
        a = d._block("double", i, 1.0)(a)
    expected = torch.cat([txt + (a["txt"] - txt), img2 + (a["img"] - img)], dim=1)
    assert torch.allclose(seen[("single", 0)], expected)
    assert plain_first.shape == img.shape


def test_additions_between_blocks_stay_outside_the_cached_residual():
    """A filled span gets the current step's control residuals, not the ones of the step it was cached at."""
    model, run, runner = _double_span_every_other_step()
    img, txt = _inputs()
    g = torch.Generator().manual_seed(5)
    old = [torch.randn(img.shape, generator=g) for _ in range(2)]
    new = [torch.randn(img.shape, generator=g) for _ in range(2)]
    model(img, txt, 1.0, ["c", "u"], runner, control=old)
    img2 = img + 1.0
    seen = _record_block_inputs(model)
    model(img2, txt, 0.8, ["c", "u"], runner, control=new)
    assert run.trace.evaluations[1].decision == REUSED
    d = TinyDiT()  # the double span's own residual at sigma 1.0, control excluded
    a = d._block("double", 0, 1.0)({"img": img.clone(), "txt": txt.clone()})
    a["img"] = a["img"] + old[0]
    a = d._block("double", 1, 1.0)(a)
    blocks_residual = a["img"] - img - old[0]
    expected_img = img2 + blocks_residual + new[0] + new[1]
    assert torch.allclose(seen[("single", 0)][:, txt.shape[1]:], expected_img, atol=1e-6)


@pytest.mark.parametrize("site", [Site("span", probe_blocks=1), Site("blocks", probe_blocks=1, corrector_blocks=1)])
@pytest.mark.parametrize("policy", [TeaCache(speed=0.3, warmup_steps=0), FirstBlock(threshold=0.3, warmup_steps=0),
                                    FixedInterval(interval=3), DiCache(speed=0.5, max_gain=2.0)])
def test_batched_and_separate_calls_take_the_same_decisions(site, policy):
    config = CacheConfig(policy=policy, site=site, forecaster=ForecasterConfig("taylor", 1))
    batched, run_b, _ = sample(config)
    separate, run_s, _ = sample(config, separate=True)
    decisions = lambda run: [(ev.decision, ev.actions) for ev in run.trace.evaluations]
    assert decisions(run_b) == decisions(run_s)
    assert any(ev.decision != COMPUTED for ev in run_b.trace.evaluations)
    for a, b in zip(batched, separate):
        assert torch.allclose(a, b, atol=1e-5)


def test_dicache_with_gain_one_is_reuse_and_its_gain_moves_the_fill():
    linear = ForecasterConfig("taylor", 1)
    site = Site("span", probe_blocks=1)
    reuse, run, _ = sample(CacheConfig(policy=DiCache(speed=0.2, max_gain=2.0), site=site))
    unit, _, _ = sample(CacheConfig(policy=DiCache(speed=0.2, max_gain=1.0), site=site, forecaster=linear))
    aligned, aligned_run, _ = sample(CacheConfig(policy=DiCache(speed=0.2, max_gain=2.0), site=site, forecaster=linear))
    assert any(ev.decision != COMPUTED for ev in run.trace.evaluations)
    assert all(torch.equal(a, b) for a, b in zip(reuse, unit))
    gains = [aligned_run.policy_state.gain(u) for u in ("c", "u")]
    assert all(1.0 < g <= 2.0 for g in gains)
    assert not all(torch.equal(a, b) for a, b in zip(reuse, aligned))


def test_dicache_and_magcache_read_what_their_site_has():
    with pytest.raises(ValueError, match="probe_blocks >= 1"):
        CacheConfig(policy=DiCache(), site=Site("model"))
    _, run, _ = sample(CacheConfig(policy=MagCache(speed=1.0), site=Site("span", probe_blocks=1)))
    assert all(ev.decision == COMPUTED for ev in run.trace.evaluations)  # no curve: a calibration run
    assert len(run.policy_state.recorded) == len(SIGMAS) - 1


def test_forecast_fill_is_marked_and_differs_from_reuse():
    reuse, _, _ = sample(CacheConfig(policy=FixedInterval(interval=3), site=Site("blocks")))
    config = CacheConfig(policy=FixedInterval(interval=3), site=Site("blocks"), forecaster=ForecasterConfig("taylor", 1))
    taylor, run, _ = sample(config)
    assert FORECAST in run.trace.evaluations[-1].actions
    assert not torch.allclose(reuse[-1], taylor[-1])


def test_shape_change_resets_the_caches():
    config = CacheConfig(policy=FixedInterval(interval=2, warmup_steps=0), site=Site("span"))
    model = TinyDiT()
    run = CacheRun(config, config.site.rows(LAYOUT), SIGMAS)
    runner = BlockRunner(run, config.site.plan(LAYOUT), STREAMS)
    img, txt = _inputs()
    model(img, txt, 1.0, ["c", "u"], runner)
    model(img[:, :4], txt, 0.8, ["c", "u"], runner)  # fewer tokens: must compute, not add a stale residual
    assert run.trace.evaluations[1].decision == COMPUTED
    assert run.notes and "reset" in run.notes[0]


def test_memory_budget_stops_caching_and_says_so():
    config = CacheConfig(policy=FixedInterval(interval=2, warmup_steps=0), site=Site("blocks"),
                         memory_budget_mb=1e-4)
    _, run, _ = sample(config)
    assert all(ev.decision == COMPUTED for ev in run.trace.evaluations)
    assert "budget" in run.report()["notes"][0]


def test_memory_budget_lowers_the_forecaster_order_before_it_stops_caching():
    # span site, 2 uuids: 144 values each; taylor order 2 holds 12 bytes per value (fp32 model), order 1 holds 8
    config = CacheConfig(policy=FixedInterval(interval=2, warmup_steps=0), site=Site("span"),
                         forecaster=ForecasterConfig("taylor", 2), memory_budget_mb=2500 / 2**20)
    _, run, _ = sample(config)
    report = run.report()
    assert report["orders_lowered"] == 1 and not run.over_budget
    assert 2500 < run.peak_bytes <= 288 * 12 and run.cache_bytes == 288 * 8
    assert any(ev.decision == FORECAST for ev in run.trace.evaluations)
    assert "order lowered by 1" in report["notes"][0]


@pytest.mark.parametrize("cache_dtype, value_bytes", [("auto", 4), ("fp32", 4), ("bf16", 2), ("fp16", 2)])
def test_cache_dtype_stores_values_in_it_and_differences_in_float32(cache_dtype, value_bytes):
    config = CacheConfig(policy=FixedInterval(interval=2, warmup_steps=0), site=Site("span"),
                         forecaster=ForecasterConfig("taylor", 1), cache_dtype=cache_dtype)
    outs, run, _ = sample(config)
    assert run.peak_bytes == 288 * (value_bytes + 4)
    reference, _, _ = sample(CacheConfig(policy=FixedInterval(interval=2, warmup_steps=0), site=Site("span"),
                                         forecaster=ForecasterConfig("taylor", 1)))
    for a, b in zip(outs, reference):
        assert torch.allclose(a, b, rtol=0.02, atol=0.02)


def test_cpu_offload_keeps_results():
    base, _, _ = sample(CacheConfig(policy=FixedInterval(interval=2), site=Site("span")))
    offload, run, _ = sample(CacheConfig(policy=FixedInterval(interval=2), site=Site("span"), offload_to_cpu=True))
    assert all(torch.equal(a, b) for a, b in zip(base, offload))
    assert run.report()["peak_cache_bytes"] > 0


def test_plans_split_segments_by_kind_and_granularity():
    span = Site("span", probe_blocks=1, corrector_blocks=1).plan(LAYOUT)
    assert [s.key for s in span.segments] == ["double[1:2]", "single[0:2]"]
    blocks = Site("blocks").plan(LAYOUT)
    assert len(blocks.segments) == 5


@pytest.mark.parametrize("make", [
    lambda: Site("span", probe_blocks=3, corrector_blocks=2).validate(LAYOUT),
    lambda: Site("model", probe_blocks=1),
    lambda: Site("everything"),
    lambda: CacheConfig(policy=FirstBlock(), site=Site("span", probe_blocks=0)),
    lambda: CacheConfig(site=Site("model"), tokens=TokenConfig()),
    lambda: TokenConfig(ratio=0.0),
])
def test_impossible_settings_raise_clear_errors(make):
    with pytest.raises(ValueError):
        make()


def test_fn_plus_bn_error_says_what_to_change():
    with pytest.raises(ValueError, match="at most 4"):
        Site("span", probe_blocks=3, corrector_blocks=2).validate(LAYOUT)


def test_cache_core_never_imports_comfyui():
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[2] / "cache_core"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "import comfy" not in text and "from comfy" not in text and "folder_paths" not in text, path


def test_trace_round_trips_through_its_dict():
    from cache_core import Trace
    _, run, _ = sample(CacheConfig(policy=FixedInterval(interval=2), site=Site("span", probe_blocks=1)))
    data = run.trace.to_dict()
    assert Trace.from_dict(data).to_dict() == data


@pytest.mark.parametrize("kind", FORECASTER_KINDS)
def test_every_forecaster_kind_fills_block_sites_end_to_end(kind):
    """The image stream's last 6 rows are a 2x3 token grid (the single blocks see cat(txt, img))."""
    config = CacheConfig(policy=FixedInterval(interval=3), site=Site("blocks"), forecaster=ForecasterConfig(kind))
    outs, run, model = sample(config, token_grid=lambda kind, stream: TokenGrid((2, 3)) if stream == "img" else None)
    reuse, _, _ = sample(CacheConfig(policy=FixedInterval(interval=3), site=Site("blocks")))
    assert all(torch.isfinite(o).all() for o in outs)
    fill = run.fill_action
    assert [ev.decision for ev in run.trace.evaluations] == [COMPUTED, fill, fill, COMPUTED, fill, fill]
    assert run.report()["forecaster"] == config.forecaster.label
    if kind == "reuse":
        assert all(torch.equal(a, b) for a, b in zip(outs, reuse))
    elif kind not in ("hyca", "auto"):  # two computed points are too few for a selection to prefer a forecast
        assert not torch.allclose(outs[-1], reuse[-1])


def _two_uuid_run(forecaster=ForecasterConfig("taylor", 1), fill_call=("c", "u"), last=(2.0, 2.0)):
    """Computed at sigma 1.0 and 0.8 (c and u: 1, then `last`), then the call `fill_call` fills at 0.6 (interval 3)."""
    config = CacheConfig(policy=FixedInterval(interval=3, warmup_steps=2), forecaster=forecaster)
    run = CacheRun(config, ["model"], [1.0, 0.8, 0.6, 0.4, 0.0])
    for sigma, values in ((1.0, (1.0, 1.0)), (0.8, last)):
        run.begin_call(["c", "u"], sigma, torch.zeros(2, 3))
        assert run.decide(["model"], lambda kind: None)
        run.store("model", torch.tensor(values).repeat_interleave(3).view(2, 3))
    run.begin_call(list(fill_call), 0.6, torch.zeros(len(fill_call), 3))
    return run


def _force_forecast(forecaster, value: float) -> None:
    """Make `forecaster` forecast a constant (through predict: no fused evaluation for it)."""
    forecaster.predict = lambda t, device=None: torch.full((1, 3), value)
    forecaster.fused_terms = lambda t: None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 10.0, 0.01])
def test_guard_replaces_a_non_finite_or_overshooting_forecast_by_the_last_computed_value(bad):
    run = _two_uuid_run()
    _force_forecast(run.forecasters[("model", "u")], bad)
    assert not run.decide(["model"], lambda kind: None)
    filled = run.fill("model", torch.zeros(2, 3))
    # both conditionings reuse the value computed at 0.8 (c's line through (1, 1), (0.8, 2) would give 3):
    # cond forecast and uncond reused would let CFG amplify their difference
    assert torch.equal(filled, torch.full((2, 3), 2.0))
    report = run.report()
    assert report["guarded_fills"] == 2 and any("replaced by the last computed value" in n for n in report["notes"])


def test_guard_keeps_the_fallback_for_the_later_calls_of_the_evaluation():
    run = _two_uuid_run(fill_call=("c",))  # cond and uncond in separate calls: c's forecast overshoots
    _force_forecast(run.forecasters[("model", "c")], 50.0)
    assert not run.decide(["model"], lambda kind: None)
    assert torch.equal(run.fill("model", torch.zeros(1, 3)), torch.full((1, 3), 2.0))
    run.begin_call(["u"], 0.6, torch.zeros(1, 3))
    assert not run.decide(["model"], lambda kind: None)
    assert torch.equal(run.fill("model", torch.zeros(1, 3)), torch.full((1, 3), 2.0))  # u's line would give 3


@pytest.mark.parametrize("forecaster", [ForecasterConfig("taylor", 1), ForecasterConfig("reuse")])
def test_guard_computes_when_no_cached_value_is_finite(forecaster):
    run = _two_uuid_run(forecaster, last=(float("nan"), 2.0))
    assert run.decide(["model"], lambda kind: None)
    assert run.trace.evaluations[-1].decision == COMPUTED
    assert any("not finite" in n for n in run.report()["notes"])


def test_a_plausible_forecast_passes_the_guard_unchanged():
    run = _two_uuid_run()
    assert not run.decide(["model"], lambda kind: None)
    assert torch.allclose(run.fill("model", torch.zeros(2, 3)), torch.full((2, 3), 3.0))
    assert run.report()["guarded_fills"] == 0


def test_overhead_counts_our_code_and_excludes_the_model(monkeypatch):
    """A fake clock: each reading advances it 1 ms, each block call 10 s. Model time must not leak into the
    overhead, and every evaluation records some."""
    import cache_core.engine as engine

    clock = [0.0]

    def perf_counter():
        clock[0] += 1e-3
        return clock[0]

    monkeypatch.setattr(engine.time, "perf_counter", perf_counter)
    model = TinyDiT()
    block = model._block

    def slow_block(kind, i, sigma):
        run = block(kind, i, sigma)

        def timed(args):
            clock[0] += 10.0
            return run(args)
        return timed

    model._block = slow_block
    _, run, _ = sample(CacheConfig(policy=FixedInterval(interval=2, warmup_steps=0), site=Site("span")), model=model)
    report = run.report()
    assert 0 < report["overhead_ms_per_cached_step"] < 500
    assert 0 < report["overhead_ms_per_computed_step"] < 500
    assert set(run.overhead_s) == {ev.index for ev in run.trace.evaluations}
