"""Fused tensor ops on the forecasters' hot path: torch references that run on every device.

`forecast.combine_all` evaluates the forecasts of every cached tensor of a step with `torch._foreach_*`
ops (one launch per term instead of one per tensor and term); `forecast.newton_update_` updates a
Taylor history table in place, reusing the buffer of the difference that leaves the table.
No Triton/CUDA variant yet: one would be chosen at runtime only where a GPU measurement shows it faster.
"""
