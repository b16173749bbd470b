"""What artists stack on a cached model: LoRA, ControlNet, torch.compile, multi-call samplers."""
import pytest
import torch

from benchmarks import coverage


@pytest.fixture(scope="module")
def api(host, product):
    return product("nodes.integration"), product("cache_core")


def _install(api, model, site="span", probe=1, **policy):
    integration, core = api
    config = core.CacheConfig(policy=core.make_policy(**(policy or {"method": "teacache", "speed": 0.0})),
                              site=core.Site(kind=site, probe_blocks=probe if site != "model" else 0))
    handle = integration.CacheHandle()
    return integration.install(model, config, handle), handle


def _weight_in_a_cached_block(family_name, model):
    """A parameter name inside the blocks the cache would skip (the deep branch for a U-Net)."""
    prefix = {"Wan 2.1 T2V": "diffusion_model.blocks.1.", "Lumina 2": "diffusion_model.layers.1.",
              "SD1.5 U-Net": "diffusion_model.middle_block."}[family_name]
    return next(k for k in model.model.state_dict() if k.startswith(prefix) and k.endswith("weight")
                and model.model.state_dict()[k].ndim >= 2)


@pytest.mark.parametrize("name", ["Wan 2.1 T2V", "Lumina 2", "SD1.5 U-Net"])  # replace hook, routed forward, DeepCache
def test_caching_off_on_a_lora_model_equals_the_lora_model_and_names_never_change(name, api):
    family = coverage.FAMILIES[name]
    model = coverage.build(family)
    key = _weight_in_a_cached_block(name, model)
    weight = model.model.state_dict()[key]
    lora = model.clone()
    delta = 0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) / weight.shape[-1] ** 0.5
    assert lora.add_patches({key: (delta,)}, 1.0) == [key]  # a weight patch by parameter name, as LoRA loads
    plain, with_lora = coverage.sample(model, family), coverage.sample(lora, family)
    assert not torch.equal(plain, with_lora)

    names_seen = []
    block = model.model.diffusion_model.get_submodule(key[len("diffusion_model."):].rsplit(".", 1)[0])
    handle = block.register_forward_pre_hook(
        lambda *_: names_seen.append(list(dict(model.model.diffusion_model.named_parameters()))))
    try:
        cached_lora, _ = _install(api, lora)
        assert torch.equal(coverage.sample(cached_lora, family), with_lora)
        lora_of_cached = _install(api, model)[0].clone()
        lora_of_cached.add_patches({key: (delta,)}, 1.0)
        assert torch.equal(coverage.sample(lora_of_cached, family), with_lora)
    finally:
        handle.remove()
    assert names_seen and all(names == list(dict(model.model.diffusion_model.named_parameters()))
                              for names in names_seen)


class _StepControl:
    """Stands in for a ControlNet: per-block residuals that change with the timestep, built fresh per call
    (the host pops from the lists), through the host's own ControlBase plumbing."""

    def __new__(cls, shapes: dict):
        import comfy.controlnet

        class StepControl(comfy.controlnet.ControlBase):
            def get_control(self, x_noisy, t, cond, batched_number, transformer_options=None):
                g = torch.Generator().manual_seed(int(t.flatten()[0] * 1000))
                batch = x_noisy.shape[0]
                return {kind: [0.1 * torch.randn((batch, *shape), generator=g) for shape in shapes_]
                        for kind, shapes_ in shapes.items()}

            def copy(self):
                c = StepControl()
                self.copy_to(c)
                return c
        return StepControl()


CONTROLS = {  # residual shapes per block the host adds them after (tiny configs of benchmarks.coverage)
    "Flux": {"input": [(16, 64)] * 2, "output": [(16, 64)] * 2},
    "SD3": {"output": [(16, 128)] * 2},
}


@pytest.mark.parametrize("name", list(CONTROLS))
def test_controlnet_on_a_dit_stays_cached_and_speed_zero_is_exact(name, api):
    family = coverage.FAMILIES[name]
    model = coverage.build(family)
    control = {"control": _StepControl(CONTROLS[name])}
    plain = coverage.sample(model, family, extra=control)
    assert not torch.equal(plain, coverage.sample(model, family))  # the control reaches the model
    still, _ = _install(api, model)
    assert torch.equal(coverage.sample(still, family, extra=control), plain)
    fast, handle = _install(api, model, method="fixed", threshold=2.0, warmup_steps=0)
    latent = coverage.sample(fast, family, extra=control)
    report = handle.last
    assert report["evaluations_filled"] > 0 and torch.isfinite(latent).all()
    assert any("ControlNet" in note and "caching stays on" in note for note in report["notes"])


def test_controlnet_on_a_unet_computes_the_deep_branch_and_the_trace_says_why(api):
    family = coverage.FAMILIES["SDXL U-Net"]
    model = coverage.build(family)
    control = {"control": _StepControl({"middle": [(128, 8, 8)]})}
    plain = coverage.sample(model, family, extra=control)
    fast, handle = _install(api, model, method="fixed", threshold=2.0, warmup_steps=0)
    assert torch.equal(coverage.sample(fast, family, extra=control), plain)  # every evaluation computed
    evaluations = handle.last["trace"]["evaluations"]
    assert all(e["decision"] == "computed" for e in evaluations)
    assert [e["forced_by"] for e in evaluations[1:]] == ["ControlNet"] * (len(evaluations) - 1)
    coverage.sample(fast, family)
    assert handle.last["evaluations_filled"] > 0  # without control the same model fills


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral"])
def test_samplers_with_several_model_calls_per_step(sampler, api, monkeypatch):
    import comfy.sample
    family = coverage.FAMILIES["Wan 2.1 T2V"]
    model = coverage.build(family)
    run = lambda m: comfy.sample.sample(m, torch.randn(family.latent, generator=torch.Generator().manual_seed(0)),
                                        4, 2.0, sampler, "simple", coverage.conditioning(family, 1),
                                        coverage.conditioning(family, 2), torch.zeros(family.latent), seed=0,
                                        disable_pbar=True)
    plain = run(model)
    still, handle = _install(api, model, site="blocks")
    assert torch.equal(run(still), plain)
    evaluations = handle.last["evaluations"]
    assert evaluations > 4  # several model evaluations per step, each its own trace column
    fast, handle = _install(api, model, method="fixed", threshold=2.0, warmup_steps=0)
    assert torch.isfinite(run(fast)).all()
    assert handle.last["evaluations"] == evaluations and 0 < handle.last["evaluations_filled"] < evaluations


def test_the_hosts_torch_compile_wrapper_keeps_decisions_and_results(api):
    """Compiling costs ~30 s on CPU even for the tiny model, so one family and one compiled run."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    family = coverage.FAMILIES["Wan 2.1 T2V"]
    model = coverage.build(family)
    eager, eager_handle = _install(api, model, method="fixed", threshold=2.0, warmup_steps=0)
    expected = coverage.sample(eager, family)
    compiled = model.clone()
    set_torch_compile_wrapper(compiled, backend="eager")  # what the TorchCompileModel node does
    fast, handle = _install(api, compiled, method="fixed", threshold=2.0, warmup_steps=0)
    latent = coverage.sample(fast, family)
    assert handle.last["trace"] == eager_handle.last["trace"] and handle.last["evaluations_filled"] > 0
    assert torch.allclose(latent, expected, atol=1e-5)


def test_wan22_high_and_low_noise_models_keep_their_own_cache_and_map(api):
    """The Wan 2.2 graph: one KSamplerAdvanced per model over its part of the schedule, an Apply node on each."""
    import comfy.sample
    family = coverage.FAMILIES["Wan 2.1 T2V"]
    high, low = coverage.build(family, seed=0), coverage.build(family, seed=1)
    steps, switch = 8, 4

    def two_stage(first, second):
        noise = torch.randn(family.latent, generator=torch.Generator().manual_seed(0))
        common = dict(positive=coverage.conditioning(family, 1), negative=coverage.conditioning(family, 2),
                      seed=0, disable_pbar=True)
        latent = comfy.sample.sample(first, noise, steps, 2.0, "euler", "simple",
                                     latent_image=torch.zeros(family.latent), start_step=0, last_step=switch,
                                     force_full_denoise=False, **common)
        return comfy.sample.sample(second, noise, steps, 2.0, "euler", "simple", latent_image=latent,
                                   disable_noise=True, start_step=switch, last_step=steps, **common)

    plain = two_stage(high, low)
    high_still, low_still = (_install(api, m)[0] for m in (high, low))
    assert torch.equal(two_stage(high_still, low_still), plain)
    (high_fast, high_handle), (low_fast, low_handle) = (
        _install(api, m, method="fixed", threshold=2.0, warmup_steps=0) for m in (high, low))
    assert torch.isfinite(two_stage(high_fast, low_fast)).all()
    high_sigmas = [e["sigma"] for e in high_handle.last["trace"]["evaluations"]]
    low_sigmas = [e["sigma"] for e in low_handle.last["trace"]["evaluations"]]
    assert len(high_sigmas) == len(low_sigmas) == switch and min(high_sigmas) > max(low_sigmas)
    # each model's first evaluation is computed from its own blocks, never filled from the other's cache
    assert high_handle.last["trace"]["evaluations"][0]["decision"] == "computed"
    assert low_handle.last["trace"]["evaluations"][0]["decision"] == "computed"
    assert high_handle.last["evaluations_filled"] == low_handle.last["evaluations_filled"] == switch // 2
