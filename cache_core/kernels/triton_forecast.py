"""Optional Triton kernels for the forecasters' hot path, each one pass over the tensors it touches.

`combine_all`: out = sum_j w_j * T_j for every cached tensor of a step; the `_foreach` reference
(forecast.combine_all_foreach) makes one pass over the accumulator per term, the kernel reads every term once
and writes the result once in the target dtype, accumulating in float32 like the reference.
`newton_update_`: the in-place Taylor table update (forecast.newton_update_ makes two or three passes per
difference), same buffers, same float32 arithmetic.
Each is used on CUDA only, and only for shapes where a one-time micro-benchmark (cached per shape and dtypes)
found it faster than the reference; without Triton (or without a GPU) nothing here runs. With
TRITON_INTERPRET=1 set before Triton is imported the kernels also run on CPU tensors (the tests compare them
with the references that way).
"""
from __future__ import annotations

import importlib
import time
from types import ModuleType
from typing import Callable, Optional

import torch

MAX_TERMS = 5  # Taylor order 4 (the highest the nodes offer) has 5 terms
BLOCK = 1024
BENCH_REPEATS = 10
BENCH_ELEMENTS = 2 ** 24  # an update is timed on scratch copies of at most this many elements per tensor
_kernels = None  # the kernels' module once imported; False when Triton is absent


def kernels() -> Optional[ModuleType]:
    """The kernels, imported on first use (CPU-only runs never import Triton); None without Triton."""
    global _kernels
    if _kernels is None:
        try:
            _kernels = importlib.import_module(__package__ + ".triton_kernels")
        except ImportError:  # optional: the torch references run everywhere
            _kernels = False
    return _kernels or None


def _same_size_on(device: torch.device, tensors: list) -> bool:
    """Contiguous tensors of one size (below 2^31 elements: int32 offsets) on `device`."""
    n = tensors[0].numel()
    return 0 < n < 2 ** 31 and all(t.device == device and t.is_contiguous() and t.numel() == n for t in tensors)


def supports(tables: list, device) -> bool:
    """Whether combine_all can evaluate these tables: Triton present, every table at most MAX_TERMS contiguous CUDA
    tensors of one size, all on one device (the output's)."""
    first = tables[0][0] if tables and tables[0] else None
    if first is None or not first.is_cuda or (device is not None and torch.device(device) != first.device):
        return False
    return kernels() is not None and all(0 < len(t) <= MAX_TERMS and _same_size_on(first.device, t) for t in tables)


def combine_all(tables: list, weights: list, dtypes: list) -> list:
    """[sum_j weights[i][j] * tables[i][j] in dtypes[i] for i]: one kernel launch per table."""
    outs = []
    for table, table_weights, dtype in zip(tables, weights, dtypes):
        out = torch.empty(table[0].shape, dtype=dtype, device=table[0].device)
        n = out.numel()
        terms = list(table) + [table[0]] * (MAX_TERMS - len(table))
        w = [float(x) for x in table_weights] + [0.0] * (MAX_TERMS - len(table))
        kernels().weighted_sum[((n + BLOCK - 1) // BLOCK,)](out, *terms, *w, n, TERMS=len(table), BLOCK=BLOCK)
        outs.append(out)
    return outs


def supports_update(diffs: list, value: torch.Tensor) -> bool:
    """Whether newton_update_ can update this table: 2 to MAX_TERMS entries, differences in float32, all contiguous
    CUDA tensors of the value's size on its device."""
    return (value.is_cuda and 2 <= len(diffs) <= MAX_TERMS and all(d.dtype == torch.float32 for d in diffs[1:])
            and _same_size_on(value.device, [value, *diffs]) and kernels() is not None)


def newton_update_(diffs: list, value: torch.Tensor, steps: list) -> list:
    """forecast.newton_update_ in one kernel launch: the same buffers in the same order."""
    n = value.numel()
    pointers = list(diffs) + [diffs[0]] * (MAX_TERMS - len(diffs))
    s = [float(x) for x in steps[:len(diffs) - 1]] + [1.0] * (MAX_TERMS - len(diffs))
    kernels().newton_update[((n + BLOCK - 1) // BLOCK,)](value, *pointers, *s, n, LENGTH=len(diffs), BLOCK=BLOCK)
    return [diffs[0], diffs[-1]] + diffs[1:-1]


_faster: dict = {}  # (operation, shapes and dtypes) -> whether the kernel beat the reference


def _seconds(function: Callable, device) -> float:
    """Median wall time of `function` on `device` (synchronised), after one warm-up call (compiles the kernel)."""
    function()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(BENCH_REPEATS):
        started = time.perf_counter()
        function()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def _measured(key: tuple, kernel: Callable, reference: Callable, device) -> bool:
    if key not in _faster:
        _faster[key] = _seconds(kernel, device) < _seconds(reference, device)
    return _faster[key]


def faster(tables: list, weights: list, dtypes: list, reference: Callable) -> bool:
    """Whether the combine_all kernel beats `reference` on a step of this shape: measured once, cached."""
    key = ("combine",) + tuple((t[0].numel(), tuple(x.dtype for x in t), d, t[0].device)
                               for t, d in zip(tables, dtypes))
    return _measured(key, lambda: combine_all(tables, weights, dtypes), lambda: reference(tables, weights, dtypes),
                     tables[0][0].device)


def faster_update(diffs: list, value: torch.Tensor, steps: list, reference: Callable) -> bool:
    """Whether the update kernel beats `reference` for tables like this one: measured once per shape and dtypes on
    scratch copies (the table itself is never touched), cached."""
    key = ("update", value.numel(), value.dtype, tuple(d.dtype for d in diffs), value.device)
    if key not in _faster:
        m = min(value.numel(), BENCH_ELEMENTS)
        scratch = [d.reshape(-1)[:m].clone() for d in diffs]
        sample = value.reshape(-1)[:m].clone()
        return _measured(key, lambda: newton_update_(list(scratch), sample, steps),
                         lambda: reference(list(scratch), sample, steps), value.device)
    return _faster[key]
