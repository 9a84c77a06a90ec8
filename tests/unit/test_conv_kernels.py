"""The numba kernels behind conv2d and max_pool2d (im2col, col2im, max pooling) against the
numpy formulas and the definition: the same values and gradients, in float64 finite
differences, with stride, padding, dilation, ties and NaN."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.conv import leaf, reference_conv
from helpers.gradcheck import check_grad

from distnet import kernels
from distnet.core import conv
from distnet.core.tensor import Tensor
from distnet.kernels import selection

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(selection.implementation() != "numba", reason="numba is not importable"),
]


@pytest.fixture
def compiled(monkeypatch):
    """Every array goes through the compiled kernels, however small."""
    monkeypatch.setattr(selection, "MIN_ELEMENTS", 0)


@pytest.fixture
def numpy_only(monkeypatch):
    monkeypatch.setattr(selection, "conv_kernels", lambda *arrays: None)


# each geometry compiles its own kernels once per machine (seconds each on a cold cache)
CASES = [  # (N, C, H, W), (O, KH, KW), stride, padding, dilation
    pytest.param((2, 3, 5, 6), (2, 3, 3), (1, 1), (0, 0), (1, 1), marks=pytest.mark.slow),
    ((1, 2, 7, 5), (3, 3, 2), (2, 1), (1, 2), (1, 1)),  # non-square, stride, padding
    ((1, 2, 5, 5), (2, 3, 3), (2, 2), (2, 2), (2, 1)),  # padding wider than the dilated reach
]


@pytest.mark.parametrize("xs,ws,stride,padding,dilation", CASES)
def test_compiled_conv2d_matches_definition_and_gradients(
    compiled, xs, ws, stride, padding, dilation
):
    rng = np.random.default_rng(0)
    x, b = leaf(rng, *xs), leaf(rng, ws[0])
    w = leaf(rng, ws[0], xs[1], ws[1], ws[2])
    assert selection.conv_kernels(x.data) is not None  # the path under test
    out = conv.conv2d(x, w, b, stride, padding, dilation)
    expected = reference_conv(x.data, w.data, b.data, stride, padding, dilation)
    np.testing.assert_allclose(out.data, expected, rtol=1e-12, atol=1e-12)
    check_grad(lambda: conv.conv2d(x, w, b, stride, padding, dilation), [x, w, b])


@pytest.mark.parametrize(
    "xs,kernel,stride",
    [
        ((2, 2, 4, 6), (2, 2), None),  # tiling windows: written, not added
        ((1, 2, 7, 6), (3, 2), (2, 1)),  # overlapping windows
        pytest.param((1, 1, 5, 7), (2, 2), (3, 3), marks=pytest.mark.slow),  # pixels skipped
    ],
)
def test_compiled_max_pool_gradients(compiled, xs, kernel, stride):
    x = leaf(np.random.default_rng(2), *xs)
    check_grad(lambda: conv.max_pool2d(x, kernel, stride), [x])


def test_compiled_max_pool_ties_and_nan(compiled):
    x = Tensor(np.array([[[[1.0, 3.0], [3.0, 3.0]]]]), requires_grad=True)
    conv.max_pool2d(x, 2).sum().backward()
    np.testing.assert_allclose(x.grad[0, 0], [[0, 1 / 3], [1 / 3, 1 / 3]])
    # a NaN anywhere in a window wins it (numpy's maximum), also after a larger value;
    # inf stays inf, and the NaN window's inputs all get a NaN gradient
    v = np.zeros((1, 1, 4, 4))
    v[0, 0, 1, 1], v[0, 0, 0, 2], v[0, 0, 2, 0], v[0, 0, 3, 1] = np.nan, np.inf, 5.0, np.nan
    y = Tensor(v, requires_grad=True)
    out = conv.max_pool2d(y, 2)
    assert np.isnan(out.data[0, 0, 0, 0]) and out.data[0, 0, 0, 1] == np.inf
    assert np.isnan(out.data[0, 0, 1, 0]) and out.data[0, 0, 1, 1] == 0
    out.sum().backward()
    assert np.isnan(y.grad[0, 0, :2, :2]).all() and np.isfinite(y.grad[0, 0, :2, 2:]).all()


def lenet_pieces(seed: int = 0):
    """A float32 conv -> relu -> pool -> conv -> pool pass of benchmark size, with gradients."""
    rng = np.random.default_rng(seed)
    x = Tensor(rng.random((16, 1, 28, 28), dtype=np.float32), requires_grad=True)
    w1 = Tensor(rng.standard_normal((8, 1, 5, 5)).astype(np.float32) * 0.2, requires_grad=True)
    w2 = Tensor(rng.standard_normal((16, 8, 5, 5)).astype(np.float32) * 0.1, requires_grad=True)
    h = conv.max_pool2d(conv.conv2d(x, w1, padding=2, activation="relu"), 2)
    out = conv.max_pool2d(conv.conv2d(h, w2, activation="relu"), 2)
    out.backward(np.ones(out.shape, np.float32))
    return out.data, x.grad, w1.grad, w2.grad


def test_compiled_float32_pass_equals_numpy_pass(numpy_only, monkeypatch):
    reference = lenet_pieces()
    monkeypatch.undo()
    monkeypatch.setattr(selection, "MIN_ELEMENTS", 0)
    result = lenet_pieces()
    for got, want in zip(result, reference, strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_compiled_relu_code_is_the_kernel_tables():
    from distnet.kernels import numba_conv

    assert numba_conv.RELU == kernels.ACTIVATIONS.index("relu")
