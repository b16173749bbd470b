import random

import pytest
import torch

from cache_core import ForecasterConfig, TaylorForecaster
from cache_core.forecasters.history import Storage


def _poly(coeffs, t):
    return sum(c * t ** k for k, c in enumerate(coeffs))


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_taylor_reproduces_polynomials_of_its_degree_on_non_uniform_grids(order):
    rng = random.Random(order)
    # a non-uniform, decreasing sigma grid as samplers produce
    times = sorted((rng.uniform(0.05, 1.0) for _ in range(order + 3)), reverse=True)
    coeffs = [torch.randn(3, 4, dtype=torch.float64) for _ in range(order + 1)]
    f = TaylorForecaster(order)
    for t in times:
        f.update(t, _poly(coeffs, t))
    for target in (0.03, 0.5 * times[-1], times[-1] - 0.2):
        assert torch.allclose(f.predict(target), _poly(coeffs, target), rtol=1e-6, atol=1e-6)


def test_taylor_of_lower_order_is_not_exact_for_higher_degree():
    f = TaylorForecaster(1)
    for t in (1.0, 0.8, 0.5):
        f.update(t, torch.tensor([t ** 2], dtype=torch.float64))
    assert not torch.allclose(f.predict(0.2), torch.tensor([0.04], dtype=torch.float64))


def test_order_zero_is_reuse_and_keeps_dtype():
    f = ForecasterConfig("reuse").new_state()
    f.update(1.0, torch.ones(2, dtype=torch.float16))
    f.update(0.5, torch.full((2,), 3.0, dtype=torch.float16))
    out = f.predict(0.1)
    assert out.dtype == torch.float16 and torch.equal(out, torch.full((2,), 3.0, dtype=torch.float16))


def test_order_is_limited_by_available_history():
    f = TaylorForecaster(3)
    f.update(1.0, torch.tensor([2.0]))
    assert torch.equal(f.predict(0.5), torch.tensor([2.0]))
    f.update(0.5, torch.tensor([1.0]))  # line through (1, 2), (0.5, 1)
    assert torch.allclose(f.predict(0.0), torch.tensor([0.0]))


def test_stored_values_are_copies():
    value = torch.ones(3)
    f = TaylorForecaster(0)
    f.update(1.0, value)
    value.add_(5.0)
    assert torch.equal(f.predict(0.9), torch.ones(3))


@pytest.mark.parametrize("dtype, value_bytes", [(None, 2), (torch.float32, 4), (torch.bfloat16, 2)])
def test_memory_accounting_counts_each_held_difference(dtype, value_bytes):
    f = TaylorForecaster(2, Storage(dtype=dtype))
    for t in (1.0, 0.9, 0.8, 0.7):
        f.update(t, torch.zeros(10, dtype=torch.float16))
    assert f.nbytes == 10 * (value_bytes + 2 * 4)  # the value in the storage dtype, two float32 differences


def test_predict_before_update_is_an_error():
    with pytest.raises(RuntimeError):
        TaylorForecaster(1).predict(0.5)


@pytest.mark.parametrize("kwargs", [dict(kind="taylor", order=5), dict(kind="reuse", order=2), dict(kind="nope")])
def test_bad_forecaster_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ForecasterConfig(**kwargs)
