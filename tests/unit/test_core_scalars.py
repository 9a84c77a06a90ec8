"""Every op returns arrays, never numpy scalars: reductions to a scalar feed on into
elementwise ops and their backward (``x.sum().tanh().backward()``), issue 8."""

from __future__ import annotations

import numpy as np
import pytest

from distnet import functional as F
from distnet.core import Tensor

REDUCTIONS = {
    "sum": lambda t: t.sum(),
    "mean": lambda t: t.mean(),
    "max": lambda t: t.max(),
    "sum_axis_all": lambda t: t.sum(axis=(0, 1)),
    "cross_entropy": lambda t: F.cross_entropy(t, np.array([0, 2])),
    "mse": lambda t: F.mse_loss(t, np.zeros((2, 3), np.float32)),
    "bce": lambda t: F.binary_cross_entropy(t, np.zeros((2, 3), np.float32), from_logits=True),
}
UNARY = ["tanh", "sigmoid", "exp", "relu", "abs"]


@pytest.mark.parametrize("unary", UNARY)
@pytest.mark.parametrize("reduction", sorted(REDUCTIONS))
def test_reduction_to_scalar_feeds_elementwise_backward(reduction: str, unary: str) -> None:
    x = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3) / 10, requires_grad=True)
    s = REDUCTIONS[reduction](x)
    assert isinstance(s.data, np.ndarray) and s.data.ndim == 0, type(s.data)
    y = getattr(s, unary)()
    assert isinstance(y.data, np.ndarray)
    y.backward()
    assert x.grad.shape == (2, 3) and np.isfinite(x.grad).all()


def test_scalar_used_twice_accumulates_as_array() -> None:
    # two 0-d gradients added by the engine give a numpy scalar again
    x = Tensor(np.full((2, 2), 0.1, np.float32), requires_grad=True)
    s = x.sum()
    (s * s).tanh().backward()
    expected = (1 - np.tanh(0.16) ** 2) * 2 * 0.4
    np.testing.assert_allclose(x.grad, np.full((2, 2), expected), rtol=1e-5)


def test_scalar_results_are_arrays_in_float16() -> None:
    x = Tensor(np.ones(4, np.float16), requires_grad=True)
    y = x.mean().sigmoid()
    assert isinstance(y.data, np.ndarray) and y.dtype == np.float16
    y.backward()
    assert x.grad.dtype == np.float16
