"""Forecast evaluation and history updates: weighted sums of stored terms, Newton differences in place."""
from __future__ import annotations

from typing import Optional

import torch

from . import triton_forecast


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of differences and sums: at least float32 (differences grow like 1/dt^j and overflow fp16)."""
    return torch.promote_types(dtype, torch.float32)


def _start(terms: list, device: Optional[torch.device]) -> torch.Tensor:
    """A fresh accumulator holding terms[0], in work precision when other terms are added to it."""
    dtype = work_dtype(terms[0].dtype) if len(terms) > 1 else terms[0].dtype
    return terms[0].to(device=device or terms[0].device, dtype=dtype, copy=True)


def _groups(tables: list, weights: list, j: int) -> dict:
    """weight -> indices of the tables that have a term j with that weight."""
    groups: dict = {}
    for i, table in enumerate(tables):
        if len(table) > j:
            groups.setdefault(float(weights[i][j]), []).append(i)
    return groups


def combine(terms: list, weights: list, device: Optional[torch.device], dtype: torch.dtype) -> torch.Tensor:
    """sum_j weights[j] * terms[j] on `device` (None: the terms'), accumulated in float32, returned in `dtype`."""
    out = _start(terms, device)
    if weights[0] != 1.0:
        out.mul_(weights[0])
    for weight, term in zip(weights[1:], terms[1:]):
        out.add_(term.to(out.device), alpha=weight)
    return out.to(dtype)


def combine_all(tables: list, weights: list, dtypes: list, device: Optional[torch.device] = None) -> list:
    """[combine(tables[i], weights[i], device, dtypes[i]) for i], fused: the Triton kernel on CUDA where it measured
    faster for this step's shapes (triton_forecast), else the `_foreach` reference."""
    if triton_forecast.supports(tables, device) and triton_forecast.faster(tables, weights, dtypes,
                                                                            combine_all_foreach):
        return triton_forecast.combine_all(tables, weights, dtypes)
    return combine_all_foreach(tables, weights, dtypes, device)


def combine_all_foreach(tables: list, weights: list, dtypes: list, device: Optional[torch.device] = None) -> list:
    """The reference of combine_all: one `_foreach_add_` per term and weight.

    In a step every cached tensor usually has the same history times, hence the same weights: the
    forecasts of all of them then take one launch per term."""
    outs = [_start(table, device) for table in tables]
    for weight, members in _groups(tables, weights, 0).items():
        if weight != 1.0:
            torch._foreach_mul_([outs[i] for i in members], weight)
    for j in range(1, max((len(table) for table in tables), default=0)):
        for weight, members in _groups(tables, weights, j).items():
            torch._foreach_add_([outs[i] for i in members], [tables[i][j].to(outs[i].device) for i in members],
                                alpha=weight)
    return [out.to(dtype) for out, dtype in zip(outs, dtypes)]


def newton_update_(diffs: list, value: torch.Tensor, steps: list) -> list:
    """The divided-difference table after a new newest point, computed in place in a full table: the Triton
    kernel on CUDA where it measured faster for this shape (triton_forecast), else the torch reference."""
    if triton_forecast.supports_update(diffs, value) and triton_forecast.faster_update(diffs, value, steps,
                                                                                        newton_update_torch):
        return triton_forecast.newton_update_(diffs, value, steps)
    return newton_update_torch(diffs, value, steps)


def newton_update_torch(diffs: list, value: torch.Tensor, steps: list) -> list:
    """The reference of newton_update_: the divided-difference table after a new newest point, in place.

    diffs[j] = f[t_0..t_j] (newest first, diffs[0] in the storage dtype, the others in float32),
    steps[j] = t - t_j. Returns [value, (value - diffs[0]) / steps[0], ...] with len(diffs) entries, reusing
    diffs' buffers: the oldest difference leaves the table, its buffer takes the first new difference.
    All tensors on one device."""
    if len(diffs) == 1:
        diffs[0].copy_(value)
        return diffs
    first = diffs[-1].copy_(value).sub_(diffs[0]).div_(steps[0])
    diffs[0].copy_(value)
    current = first
    for j in range(1, len(diffs) - 1):
        current = diffs[j].sub_(current).div_(-steps[j])
    return [diffs[0], first] + diffs[1:-1]
