"""Fills on the host's real Flux and Wan blocks are numerically right.

If a model is evaluated twice on the same input and timestep, the cached residual of the first
evaluation is exactly what the blocks would add again, so a reused second evaluation must equal a
computed one. This catches residuals lost to blocks that update their input in place (Flux).
"""
import pytest
import torch
from safetensors.torch import load_file


def _inputs(family, labels_path, shape):
    labels = load_file(labels_path)
    context = labels["labels"][0:2].float()
    x = torch.randn((2,) + shape[1:], generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.6)
    extra = {"y": labels["pooled"][0:2].float(), "guidance": torch.full((2,), 3.5)} if family == "flux" else {}
    return x, t, context, extra


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("site, probe, corrector", [("span", 1, 0), ("span", 0, 1), ("blocks", 1, 1)])
def test_a_reused_evaluation_on_identical_input_equals_the_computed_one(family, site, probe, corrector, models,
                                                                       product):
    integration, core = product("nodes.integration"), product("cache_core")
    base, labels_path, shape = models[family]
    config = core.CacheConfig(policy=core.FixedInterval(interval=2, warmup_steps=0), site=core.Site(site, probe, corrector))
    patched = integration.install(base, config, integration.CacheHandle())
    setup = patched.model_options["transformer_options"][integration.SETUP_KEY]
    dm = base.model.diffusion_model
    run = core.CacheRun(config, setup.rows, [1.0, 0.5, 0.0])
    context = integration._RunContext(run, setup, dm, patched.model_options["transformer_options"])
    x, t, cond, extra = _inputs(family, labels_path, shape)
    outputs = []
    for sigma in (1.0, 0.5):  # two evaluations, identical model input; the second one is filled
        options = {**patched.model_options["transformer_options"], integration.RUN_KEY: context,
                   "uuids": ["cond", "uncond"], "sigmas": torch.tensor([sigma])}
        with torch.no_grad():
            outputs.append(dm(x.clone(), t, cond, transformer_options=options, **extra))
    assert [ev.decision for ev in run.trace.evaluations] == ["computed", "reused"]
    assert torch.allclose(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)
