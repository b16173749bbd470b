"""The U-Net skip-branch site (DeepCache) on plain tensors."""
import pytest
import torch

from cache_core import CacheConfig, CacheRun, FixedInterval, Site, COMPUTED, REUSED
from cache_core.skip_branch import SkipBranch

LAYOUT = [("input", 3), ("middle", 1), ("output", 3)]
SIGMAS = [1.0, 0.7, 0.4, 0.1]


def _run():
    config = CacheConfig(policy=FixedInterval(interval=2, warmup_steps=0), site=Site("span", probe_blocks=1))
    return CacheRun(config, config.site.rows(LAYOUT), SIGMAS)


def test_filled_evaluations_reuse_the_branch_output_and_run_only_shallow_blocks():
    run = _run()
    branch = SkipBranch(run, LAYOUT, depth=1)
    h = torch.randn(2, 4, 8, 8)
    deep_out = torch.randn(2, 6, 8, 8)
    assert branch.enter(h, ["c", "u"], 1.0)
    assert torch.equal(branch.computed_exit(deep_out), deep_out)
    assert not branch.enter(h + 0.1, ["c", "u"], 0.7)
    assert branch.placeholder(h).shape == (2, 0, 8, 8)
    assert torch.equal(branch.filled_exit(h[:, :0]), deep_out)
    actions = run.trace.evaluations[1].actions
    assert actions == [COMPUTED, REUSED, REUSED, REUSED, REUSED, REUSED, COMPUTED]
    assert run.report()["compute_fraction"] == pytest.approx((7 + 2) / 14)


def test_a_forced_call_is_computed_and_the_trace_says_why():
    run = _run()
    branch = SkipBranch(run, LAYOUT, depth=2)
    h = torch.randn(1, 4, 8, 8)
    branch.enter(h, ["c"], 1.0)
    branch.computed_exit(torch.randn(1, 6, 8, 8))
    assert branch.enter(h, ["c"], 0.7, forced_by="ControlNet")
    assert run.trace.evaluations[1].forced_by == "ControlNet"
    assert run.trace.to_dict()["evaluations"][1]["forced_by"] == "ControlNet"


@pytest.mark.parametrize("depth", [0, 3])
def test_depth_outside_the_unet_is_refused_with_the_valid_range(depth):
    with pytest.raises(ValueError, match="between 1 and 2"):
        SkipBranch(None, LAYOUT, depth)
