"""Fused tensor ops on the forecasters' hot path: torch references that run on every device.

`forecast.combine_all` evaluates the forecasts of every cached tensor of a step with `torch._foreach_*`
ops (one launch per term instead of one per tensor and term); `forecast.newton_update_` updates a
Taylor history table in place, reusing the buffer of the difference that leaves the table.
`triton_forecast` is an optional Triton kernel for the same evaluation (one pass over the terms instead of one
per term), chosen on CUDA only for step shapes where a one-time micro-benchmark finds it faster; without
Triton or a GPU the reference runs.
"""
