"""Fused tensor ops on the forecasters' hot path: torch references that run on every device.

`forecast.combine_all` evaluates the forecasts of every cached tensor of a step with `torch._foreach_*`
ops (one launch per term instead of one per tensor and term); `forecast.newton_update_` updates a
Taylor history table in place, reusing the buffer of the difference that leaves the table.
`triton_forecast` holds optional Triton kernels for both (one pass over the tensors instead of one or more per
term), each chosen on CUDA only for shapes where a one-time micro-benchmark finds it faster; without Triton or
a GPU the references run.
"""
