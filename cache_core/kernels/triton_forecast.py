"""Optional Triton kernel for the fused forecast evaluation: out = sum_j w_j * T_j in one pass.

The `_foreach` reference (forecast.combine_all) makes one pass over the accumulator per term (copy, then a
read-modify-write per further term); this kernel reads every term once and writes the result once, in the
target dtype, accumulating in float32 like the reference. It is used on CUDA only, and only for step shapes
where a one-time micro-benchmark (cached per shape and dtypes) found it faster than the reference; without
Triton (or without a GPU) nothing here runs and the pack works as before. With TRITON_INTERPRET=1 set before
Triton is imported the kernel also runs on CPU tensors (the tests compare it with the reference that way).
"""
from __future__ import annotations

import importlib
import time
from typing import Callable, Optional

import torch

MAX_TERMS = 5  # Taylor order 4 (the highest the nodes offer) has 5 terms
BLOCK = 1024
BENCH_REPEATS = 10
_kernel = None  # the jitted kernel once imported; False when Triton is absent


def kernel() -> Optional[Callable]:
    """The kernel, imported on first use (CPU-only runs never import Triton); None without Triton."""
    global _kernel
    if _kernel is None:
        try:
            _kernel = importlib.import_module(__package__ + ".weighted_sum_triton").weighted_sum
        except ImportError:  # optional: the torch reference runs everywhere
            _kernel = False
    return _kernel or None


def supports(tables: list, device) -> bool:
    """Whether the kernel can evaluate these tables: Triton present, every term a contiguous CUDA tensor of its
    table's size (below 2^31 elements) on one device (the output's), at most MAX_TERMS terms."""
    first = tables[0][0] if tables and tables[0] else None
    if first is None or not first.is_cuda or (device is not None and torch.device(device) != first.device):
        return False
    if kernel() is None:
        return False
    return all(0 < len(table) <= MAX_TERMS and 0 < table[0].numel() < 2**31  # int32 offsets
               and all(t.is_cuda and t.device == first.device and t.is_contiguous() and t.numel() == table[0].numel()
                       for t in table) for table in tables)


def combine_all(tables: list, weights: list, dtypes: list) -> list:
    """[sum_j weights[i][j] * tables[i][j] in dtypes[i] for i]: one kernel launch per table."""
    outs = []
    for table, table_weights, dtype in zip(tables, weights, dtypes):
        out = torch.empty(table[0].shape, dtype=dtype, device=table[0].device)
        n = out.numel()
        terms = list(table) + [table[0]] * (MAX_TERMS - len(table))
        w = [float(x) for x in table_weights] + [0.0] * (MAX_TERMS - len(table))
        kernel()[((n + BLOCK - 1) // BLOCK,)](out, *terms, *w, n, TERMS=len(table), BLOCK=BLOCK)
        outs.append(out)
    return outs


_faster: dict = {}  # step signature -> whether the kernel beat the reference


def _signature(tables: list, dtypes: list) -> tuple:
    return tuple((table[0].numel(), tuple(t.dtype for t in table), dtype, table[0].device)
                 for table, dtype in zip(tables, dtypes))


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


def faster(tables: list, weights: list, dtypes: list, reference: Callable) -> bool:
    """Whether the kernel beats `reference` on a step of this shape: measured once per shape and dtypes, cached."""
    key = _signature(tables, dtypes)
    if key not in _faster:
        device = tables[0][0].device
        kernel = _seconds(lambda: combine_all(tables, weights, dtypes), device)
        _faster[key] = kernel < _seconds(lambda: reference(tables, weights, dtypes), device)
    return _faster[key]
