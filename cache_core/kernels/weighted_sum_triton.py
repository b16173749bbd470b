"""The Triton kernel of triton_forecast (imported only when a CUDA tensor, or the interpreter, needs it)."""
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
