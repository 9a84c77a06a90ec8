"""Convolution and pooling: float64 finite-difference checks, edge cases and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.conv import CONV_CASES, leaf, reference_conv
from helpers.gradcheck import check_grad

from distnet.core import conv
from distnet.core.tensor import Tensor

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("xs,ws,stride,padding,dilation", CONV_CASES)
def test_conv2d_matches_definition_and_gradients(xs, ws, stride, padding, dilation):
    rng = np.random.default_rng(0)
    x, b = leaf(rng, *xs), leaf(rng, ws[0])
    w = leaf(rng, ws[0], xs[1], ws[1], ws[2])
    out = conv.conv2d(x, w, b, stride, padding, dilation)
    expected = reference_conv(x.data, w.data, b.data, stride, padding, dilation)
    np.testing.assert_allclose(out.data, expected, rtol=1e-12, atol=1e-12)
    check_grad(lambda: conv.conv2d(x, w, b, stride, padding, dilation), [x, w, b])


def test_conv2d_without_bias_and_with_frozen_input():
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((2, 2, 5, 4)))  # data: no gradient asked for
    w = leaf(rng, 3, 2, 2, 3)
    check_grad(lambda: conv.conv2d(x, w, padding=1), [w])


POOL_CASES = [  # (N, C, H, W), kernel, stride, padding
    ((2, 2, 4, 6), (2, 2), None, (0, 0)),  # tiling windows: the reshape path
    ((1, 2, 5, 7), (3, 3), (2, 2), (1, 1)),  # overlap and padding
    ((1, 1, 5, 6), (2, 3), (1, 2), (1, 0)),  # non-square kernel, stride, padding
    ((1, 2, 7, 7), (2, 2), (3, 3), (0, 0)),  # stride > kernel: pixels skipped
    ((1, 1, 5, 5), (2, 2), None, (0, 0)),  # sizes not divisible: last row/column dropped
]


@pytest.mark.parametrize("op", [conv.max_pool2d, conv.avg_pool2d])
@pytest.mark.parametrize("xs,kernel,stride,padding", POOL_CASES)
def test_pooling_gradients(op, xs, kernel, stride, padding):
    x = leaf(np.random.default_rng(2), *xs)
    check_grad(lambda: op(x, kernel, stride, padding), [x])


def test_pooling_values():
    x = Tensor(np.arange(16.0).reshape(1, 1, 4, 4))
    np.testing.assert_array_equal(conv.max_pool2d(x, 2).data[0, 0], [[5, 7], [13, 15]])
    np.testing.assert_array_equal(conv.avg_pool2d(x, 2).data[0, 0], [[2.5, 4.5], [10.5, 12.5]])
    # padding: -inf for max (the border never wins), zeros counted in the mean
    np.testing.assert_array_equal(conv.max_pool2d(-x, 3, 3, 1).data[0, 0], [[0, -2], [-8, -10]])
    np.testing.assert_allclose(
        conv.avg_pool2d(x + 9, 3, 3, 1).data[0, 0, 0, 0], (9 + 10 + 13 + 14) / 9
    )


def test_max_pool_ties_share_the_gradient():
    x = Tensor(np.array([[[[1.0, 3.0], [3.0, 3.0]]]]), requires_grad=True)
    conv.max_pool2d(x, 2).sum().backward()
    np.testing.assert_allclose(x.grad[0, 0], [[0, 1 / 3], [1 / 3, 1 / 3]])
    # central differences agree with the equal split of a pair of ties (a 3-way tie would
    # measure 1/2, not 1/3), also where overlapping windows share a tied element
    y = Tensor(np.array([[[[2.0, 2.0, 1.0], [0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]]]),
               requires_grad=True)  # fmt: skip
    check_grad(lambda: conv.max_pool2d(y, 2, 1), [y], eps=1e-7)


def test_float32_stays_float32():
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((2, 1, 6, 6)).astype(np.float32), requires_grad=True)
    w = Tensor(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), requires_grad=True)
    out = conv.max_pool2d(conv.conv2d(x, w, padding=1), 2)
    out.sum().backward()
    assert out.dtype == x.grad.dtype == w.grad.dtype == np.float32


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x, w: conv.conv2d(x.reshape(1, 36), w), "input must be (N, C, H, W)"),
        (lambda x, w: conv.conv2d(x, w.reshape(2, 9)), "weight must be (O, C, KH, KW)"),
        (lambda x, w: conv.conv2d(x, w, stride=0), "stride must be"),
        (lambda x, w: conv.conv2d(x, w, padding=(1, -1)), "padding must be"),
        (lambda x, w: conv.conv2d(x, Tensor(np.zeros((2, 3, 3, 3)))), "input has 1 channels"),
        (lambda x, w: conv.conv2d(x, w, Tensor(np.zeros(3))), "bias (3,)"),
        (lambda x, w: conv.conv2d(x, Tensor(np.zeros((2, 1, 7, 7)))), "smaller than the kernel"),
        (lambda x, w: conv.max_pool2d(x, 2, padding=2), "at most half the kernel"),
    ],
)
def test_bad_arguments_name_what_is_wrong(call, message):
    x, w = Tensor(np.zeros((1, 1, 6, 6))), Tensor(np.zeros((2, 1, 3, 3)))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(x, w)
