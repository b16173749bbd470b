"""The fused reference ops against the unfused per-tensor code they replace."""
import pytest
import torch

from cache_core.forecasters.polynomial import TaylorForecaster
from cache_core.kernels.forecast import combine, combine_all, newton_update_


def _table(g, length, dtype, shape=(3, 5)):
    head = torch.randn(shape, generator=g).to(dtype)
    return [head] + [torch.randn(shape, generator=g) for _ in range(length - 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_all_equals_one_combine_per_tensor(dtype):
    g = torch.Generator().manual_seed(0)
    tables = [_table(g, n, dtype) for n in (1, 2, 3, 3, 4)]
    shared = [1.0, -0.3, 0.07, -0.01]
    weights = [shared, shared, [0.5, 2.0, -1.0], shared, [1.0, 0.2, 0.3, 0.4]]  # shared and own weights
    fused = combine_all(tables, weights, [dtype] * len(tables))
    for table, w, out in zip(tables, weights, fused):
        unfused = table[0].float() * w[0]
        for weight, term in zip(w[1:], table[1:]):
            unfused = unfused + weight * term.float()
        assert out.dtype == dtype
        assert torch.allclose(out.float(), unfused.to(dtype).float(), rtol=1e-6, atol=1e-6)
        assert torch.equal(out, combine(table, w, None, dtype))


def _divided_differences(times, values):
    """f[t_0..t_j] for j = 0..n-1 by the textbook table (times newest first)."""
    column, out = list(values), [values[0]]
    for j in range(1, len(times)):
        column = [(column[i] - column[i + 1]) / (times[i] - times[i + j]) for i in range(len(column) - 1)]
        out.append(column[0])
    return out


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_in_place_newton_update_equals_the_divided_difference_table(order):
    g = torch.Generator().manual_seed(order)
    times = [1.0, 0.83, 0.61, 0.47, 0.3, 0.2][: order + 2]  # newest last below
    values = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in times]
    table = _divided_differences(times[:order + 1][::-1], values[:order + 1][::-1])
    buffers = [d.clone() for d in table]
    steps = [times[order + 1] - s for s in times[:order + 1][::-1]]
    updated = newton_update_(buffers, values[order + 1], steps)
    expected = _divided_differences(times[1:][::-1], values[1:][::-1])
    assert len(updated) == order + 1
    assert {id(b) for b in updated} == {id(b) for b in buffers}  # no new buffer
    for got, want in zip(updated, expected):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_taylor_updated_in_place_forecasts_as_one_built_from_its_last_points(dtype):
    """Updates after the table is full run in place; a forecaster fed only the last order+1 points builds its
    table by copies: both hold the same differences and forecast the same."""
    g = torch.Generator().manual_seed(3)
    times = (1.0, 0.8, 0.65, 0.5, 0.38)
    values = [torch.randn(2, 4, generator=g).to(dtype) for _ in times]
    long, fresh = TaylorForecaster(2), TaylorForecaster(2)
    for t, v in zip(times, values):
        long.update(t, v)
    for t, v in zip(times[-3:], values[-3:]):
        fresh.update(t, v)
    assert [d.dtype for d in long.diffs] == [dtype, torch.float32, torch.float32]
    for a, b in zip(long.diffs, fresh.diffs):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(long.predict(0.3).float(), fresh.predict(0.3).float(), rtol=1e-5, atol=1e-5)


def test_predict_all_equals_each_forecasters_own_predict():
    from cache_core import ForecasterConfig
    from cache_core.forecasters.history import predict_all

    g = torch.Generator().manual_seed(5)
    configs = [ForecasterConfig("taylor", 2), ForecasterConfig("hicache"), ForecasterConfig("ab", 3),
               ForecasterConfig("foca"), ForecasterConfig("spectrum"), ForecasterConfig("reuse")]
    forecasters = [c.new_state() for c in configs]
    for t in (1.0, 0.85, 0.7, 0.55):
        for f in forecasters:
            f.update(t, torch.randn(3, 4, generator=g).to(torch.bfloat16))
    for target in (0.4, 0.55):  # 0.55: a computed point (AB/FoCa return its value)
        together = predict_all(forecasters, [target] * len(forecasters))
        for f, forecast in zip(forecasters, together):
            alone = f.predict(target)
            assert forecast.dtype == alone.dtype and torch.allclose(forecast.float(), alone.float(), atol=1e-6)


@pytest.mark.parametrize("kind", ["reuse", "taylor", "hicache", "ab", "foca", "spectrum", "freqca", "hyca"])
def test_forecasts_come_back_in_the_values_dtype_whatever_the_storage_dtype(kind):
    from cache_core import ForecasterConfig, TokenGrid
    from cache_core.forecasters.history import Storage

    g = torch.Generator().manual_seed(7)
    f = ForecasterConfig(kind).new_state(Storage(dtype=torch.float32), TokenGrid((2, 2)))
    for t in (1.0, 0.85, 0.7, 0.55, 0.4):
        f.update(t, torch.randn(1, 4, 8, generator=g).to(torch.bfloat16))
    for target in (0.3, 0.4):
        assert f.predict(target).dtype == torch.bfloat16 and f.latest().dtype == torch.bfloat16


def _random_step(device, seed=0):
    """A step's tables like the forecasters make: values in half/bfloat/float, differences in float32, 1-5 terms,
    sizes that are not multiples of the kernel's block."""
    g = torch.Generator().manual_seed(seed)
    tables, weights, dtypes = [], [], []
    for terms, dtype, shape in ((1, torch.float32, (3, 7)), (2, torch.float16, (1, 2049)),
                                (3, torch.bfloat16, (2, 33, 17)), (4, torch.float32, (5000,)),
                                (5, torch.float16, (2, 3, 129))):
        head = torch.randn(shape, generator=g).to(dtype)
        tables.append([head.to(device)] + [torch.randn(shape, generator=g).to(device) for _ in range(terms - 1)])
        weights.append([1.0] + (torch.randn(terms - 1, generator=g) * 0.5).tolist())
        dtypes.append(dtype)
    return tables, weights, dtypes


def _assert_same(kernel_outs, reference_outs):
    for out, ref in zip(kernel_outs, reference_outs):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        tolerance = 1e-6 if ref.dtype == torch.float32 else 1e-2  # a half-precision result may round the other way
        assert torch.allclose(out.float(), ref.float(), rtol=tolerance, atol=tolerance), (out - ref).abs().max()


def _random_tables(device, seed=0):
    """Full Taylor tables (2-5 entries, value and head in half/bfloat/float, differences in float32), a new value
    and the time steps to it."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length, dtype, shape in ((2, torch.float32, (3, 7)), (3, torch.float16, (1, 2049)),
                                 (4, torch.bfloat16, (2, 33, 17)), (5, torch.float32, (5000,))):
        diffs = [torch.randn(shape, generator=g).to(dtype).to(device)]
        diffs += [torch.randn(shape, generator=g).to(device) for _ in range(length - 1)]
        value = torch.randn(shape, generator=g).to(dtype).to(device)
        out.append((diffs, value, (torch.rand(length, generator=g) * 0.5 + 0.1).tolist()))
    return out


def _index(buffers: list, tensor) -> int:
    return next(i for i, buffer in enumerate(buffers) if buffer is tensor)


def _check_update(update, device="cpu"):
    """`update` (a kernel) gives the reference's table, in the reference's buffers, on copies of random tables."""
    from cache_core.kernels.forecast import newton_update_torch

    for diffs, value, steps in _random_tables(device):
        mine, theirs = [d.clone() for d in diffs], [d.clone() for d in diffs]
        got, expected = update(mine, value, steps), newton_update_torch(theirs, value, steps)
        assert [_index(mine, t) for t in got] == [_index(theirs, t) for t in expected]  # same buffers, same order
        _assert_same(got, expected)


INTERPRETED = """
import torch
from cache_core.kernels import triton_forecast
from cache_core.kernels.forecast import combine_all_foreach
import test_kernels
for seed in range(3):
    tables, weights, dtypes = test_kernels._random_step("cpu", seed)
    test_kernels._assert_same(triton_forecast.combine_all(tables, weights, dtypes),
                              combine_all_foreach(tables, weights, dtypes))
test_kernels._check_update(triton_forecast.newton_update_)
print("interpreted kernels match")
"""


def test_triton_kernels_match_the_references_in_the_interpreter():
    """Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported: a fresh process) runs the kernel
    on CPU tensors, so the kernel is checked on machines without a GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(here.parent.parent), str(here), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "interpreted kernels match" in done.stdout, done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_triton_kernels_match_the_references_on_the_gpu_and_are_chosen_by_measurement():
    from cache_core.kernels import triton_forecast
    from cache_core.kernels.forecast import combine_all_foreach

    pytest.importorskip("triton")
    tables, weights, dtypes = _random_step("cuda")
    assert triton_forecast.supports(tables, None)
    _assert_same(triton_forecast.combine_all(tables, weights, dtypes), combine_all_foreach(tables, weights, dtypes))
    _assert_same(combine_all(tables, weights, dtypes), combine_all_foreach(tables, weights, dtypes))
    assert any(key[0] == "combine" for key in triton_forecast._faster)  # measured once, then cached
    assert all(triton_forecast.supports_update(diffs, value) for diffs, value, _ in _random_tables("cuda"))
    _check_update(triton_forecast.newton_update_, "cuda")
    _check_update(newton_update_, "cuda")  # whichever the measurement chose


def test_without_triton_the_reference_runs(monkeypatch):
    import sys

    from cache_core.kernels import triton_forecast

    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    monkeypatch.delitem(sys.modules, "cache_core.kernels.triton_kernels", raising=False)
    monkeypatch.setattr(triton_forecast, "_kernels", None)
    assert triton_forecast.kernels() is None
    tables, weights, dtypes = _random_step("cpu")
    assert not triton_forecast.supports(tables, None)
    _assert_same(combine_all(tables, weights, dtypes), [combine(t, w, None, d) for t, w, d in
                                                         zip(tables, weights, dtypes)])
