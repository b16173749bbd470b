"""The Triton kernels of triton_forecast (imported only when a CUDA tensor, or the interpreter, needs them)."""
import triton
import triton.language as tl


@triton.jit
def weighted_sum(out_ptr, t0, t1, t2, t3, t4, w0, w1, w2, w3, w4, n, TERMS: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum_{j < TERMS} w_j * t_j over n elements, accumulated in float32, stored in out's dtype."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    acc = tl.load(t0 + offsets, mask=mask).to(tl.float32) * w0
    if TERMS > 1:
        acc += tl.load(t1 + offsets, mask=mask).to(tl.float32) * w1
    if TERMS > 2:
        acc += tl.load(t2 + offsets, mask=mask).to(tl.float32) * w2
    if TERMS > 3:
        acc += tl.load(t3 + offsets, mask=mask).to(tl.float32) * w3
    if TERMS > 4:
        acc += tl.load(t4 + offsets, mask=mask).to(tl.float32) * w4
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def newton_update(value, d0, d1, d2, d3, d4, s0, s1, s2, s3, n, LENGTH: tl.constexpr, BLOCK: tl.constexpr):
    """forecast.newton_update_ in one pass: d0 <- value; new differences (in float32) go to the buffers the
    reference reuses: the first to d_{LENGTH-1} (the oldest, which leaves the table), the (j+1)-th to d_j."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    v = tl.load(value + offsets, mask=mask).to(tl.float32)
    first = (v - tl.load(d0 + offsets, mask=mask).to(tl.float32)) / s0
    tl.store(d0 + offsets, v.to(d0.dtype.element_ty), mask=mask)
    current = first
    if LENGTH > 2:
        current = (current - tl.load(d1 + offsets, mask=mask)) / s1
        tl.store(d1 + offsets, current, mask=mask)
    if LENGTH > 3:
        current = (current - tl.load(d2 + offsets, mask=mask)) / s2
        tl.store(d2 + offsets, current, mask=mask)
    if LENGTH > 4:
        current = (current - tl.load(d3 + offsets, mask=mask)) / s3
        tl.store(d3 + offsets, current, mask=mask)
    if LENGTH == 2:
        tl.store(d1 + offsets, first, mask=mask)
    if LENGTH == 3:
        tl.store(d2 + offsets, first, mask=mask)
    if LENGTH == 4:
        tl.store(d3 + offsets, first, mask=mask)
    if LENGTH == 5:
        tl.store(d4 + offsets, first, mask=mask)
