"""After sampling, the model the node received is exactly as it was: nothing patched, nothing left behind."""
import copy

import pytest
import torch
from safetensors.torch import load_file



def _snapshot(patcher):
    dm = patcher.model.diffusion_model
    return {
        "modules": [(n, type(m)) for n, m in patcher.model.named_modules()],
        "params": {k: v.detach().clone() for k, v in patcher.model.state_dict().items()},
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in patcher.model.named_modules()],
        "instance_attrs": {n: sorted(vars(m).keys()) for n, m in patcher.model.named_modules()},
        "forward": dm.forward.__func__,
        "model_options": repr(patcher.model_options),
        "object_patches": dict(patcher.object_patches),
        "patches": dict(patcher.patches),
    }


def _assert_same(before, after):
    assert after["modules"] == before["modules"]
    assert after["params"].keys() == before["params"].keys()
    for k, v in before["params"].items():
        assert torch.equal(after["params"][k], v), k
    for key in ("hooks", "instance_attrs", "forward", "model_options", "object_patches", "patches"):
        assert after[key] == before[key], key


def _sample(patcher, labels_path, shape):
    import comfy.sample
    labels = load_file(labels_path)
    cond = lambda i: [[labels["labels"][i:i + 1].float(),
                       {"guidance": 3.5, **({"pooled_output": labels["pooled"][i:i + 1].float()}
                                            if "pooled" in labels else {})}]]
    latent = torch.zeros(shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    return comfy.sample.sample(patcher, noise, 5, 2.0, "euler", "simple", cond(0), cond(1), latent,
                               disable_pbar=True, seed=3)


@pytest.mark.parametrize("family", ["wan", "flux"])
@pytest.mark.parametrize("site", ["model", "span", "blocks"])
def test_model_is_restored_after_sampling_and_plain_sampling_is_unchanged(family, site, models, product):
    integration = product("nodes.integration")
    core = product("cache_core")
    base, labels, shape = models[family]
    plain_before = _sample(base, labels, shape)
    before = _snapshot(base)
    config = core.CacheConfig(policy=core.FixedInterval(interval=2, warmup_steps=0),
                              forecaster=core.ForecasterConfig("taylor", 1), site=core.Site(site))
    handle = integration.CacheHandle()
    cached = integration.install(base, config, handle)
    cached_out = _sample(cached, labels, shape)
    assert handle.last["evaluations_filled"] > 0
    assert not torch.equal(cached_out, plain_before)
    _assert_same(before, _snapshot(base))
    # sampling the node's input model again is as if the node had never been there
    assert torch.equal(_sample(base, labels, shape), plain_before)
    # the cached clone keeps working and does not carry per-run state between runs
    assert torch.equal(_sample(cached, labels, shape), cached_out)


def test_the_patched_clone_is_independent_of_its_source(models, product):
    integration = product("nodes.integration")
    core = product("cache_core")
    base, _, _ = models["wan"]
    options_before = repr(base.model_options)
    cached = integration.install(base, core.CacheConfig(site=core.Site("span")), integration.CacheHandle())
    assert repr(base.model_options) == options_before
    assert cached.model_options["transformer_options"]["patches_replace"]["dit"]
    assert "patches_replace" not in base.model_options["transformer_options"]
    # deep copies (ModelPatcher.clone) keep one report handle
    assert copy.deepcopy(cached.model_options)["transformer_options"][integration.SETUP_KEY].handle is \
        cached.model_options["transformer_options"][integration.SETUP_KEY].handle
