"""The channels-last CPU path of conv2d and max_pool2d (``distnet.core.channels_last``,
``distnet.kernels.numba_conv_nhwc``, ``distnet.kernels.block_threads``) against the definition and
the
numpy NCHW path: values, float64 finite differences with stride, padding and dilation, ties
and NaN in pooling, float32 passes, in both of its modes (serial kernels on a thread pool
over blocks of samples, and numba's parallel kernels over the whole batch)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.conv import CONV_CASES, leaf, reference_conv
from helpers.gradcheck import check_grad

from distnet import kernels
from distnet.core import channels_last, conv
from distnet.core.tensor import Tensor
from distnet.kernels import block_threads, gemm, selection

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(selection.implementation() != "numba", reason="numba is not importable"),
]

# (parallel kernels?, threads, block bytes): the pool of 2 threads over one-sample blocks,
# one thread over the same blocks, and numba's parallel kernels over the whole batch
MODES = {
    "pool-2-threads": (False, 2, 1),
    "serial": (False, 1, 1),
    "parallel-kernels": (True, 1, 1 << 30),
}


def off_onednn(monkeypatch):
    """These tests are of the im2col path: float32 convolutions stay off oneDNN here (its own
    tests are in test_conv_onednn.py)."""
    monkeypatch.setattr(selection, "onednn_conv", lambda x, weight: None)


@pytest.fixture(autouse=True)
def im2col_route(monkeypatch):
    off_onednn(monkeypatch)


@pytest.fixture(params=list(MODES))
def mode(request, monkeypatch):
    """Every array goes through the channels-last kernels, however small, in one mode."""
    parallel, threads, block_bytes = MODES[request.param]
    monkeypatch.setattr(selection, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(channels_last, "_plan", lambda compiled: (parallel, threads))
    monkeypatch.setattr(channels_last, "BLOCK_BYTES", block_bytes)
    return request.param


@pytest.fixture
def numpy_only(monkeypatch):
    monkeypatch.setattr(selection, "conv_kernels", lambda *arrays: None)


@pytest.mark.parametrize("xs,ws,stride,padding,dilation", CONV_CASES)
def test_conv2d_matches_definition_and_gradients(mode, xs, ws, stride, padding, dilation):
    rng = np.random.default_rng(0)
    x, b = leaf(rng, *xs), leaf(rng, ws[0])
    w = leaf(rng, ws[0], xs[1], ws[1], ws[2])
    assert selection.channels_last_kernels(x.data) is not None  # the path under test
    out = conv.conv2d(x, w, b, stride, padding, dilation)
    assert channels_last.is_channels_last(out.data)
    expected = reference_conv(x.data, w.data, b.data, stride, padding, dilation)
    np.testing.assert_allclose(out.data, expected, rtol=1e-12, atol=1e-12)
    check_grad(lambda: conv.conv2d(x, w, b, stride, padding, dilation), [x, w, b])


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", None])
def test_fused_activations_and_a_channels_last_input(mode, activation):
    """Every fused activation; the input itself channels last (what a previous layer gives);
    no bias; padding (the padded copy) and stride 2."""
    rng = np.random.default_rng(3)
    x = leaf(rng, 3, 4, 6, 7)
    w = leaf(rng, 5, 4, 3, 3)

    def run():
        return conv.conv2d(channels_last_copy(x), w, None, 2, 1, activation=activation)

    z = reference_conv(x.data, w.data, np.zeros(5), (2, 2), (1, 1), (1, 1))
    expected = {"relu": np.maximum(z, 0), "tanh": np.tanh(z), None: z,
                "sigmoid": 1 / (1 + np.exp(-z))}[activation]  # fmt: skip
    np.testing.assert_allclose(run().data, expected, rtol=1e-10, atol=1e-12)
    check_grad(run, [x, w])


def test_gradients_accumulate_over_blocks_and_threads(mode):
    """Weight and bias gradients summed over blocks (1 sample each here) and threads, into
    the flat buffer's zeroed gradient or added to an existing one."""
    rng = np.random.default_rng(4)
    x, w, b = leaf(rng, 5, 2, 6, 6), leaf(rng, 3, 2, 3, 3), leaf(rng, 3)
    out = conv.conv2d(x, w, b, activation="relu")
    g = rng.standard_normal(out.shape)
    out.backward(g)
    first = [t.grad.copy() for t in (x, w, b)]
    conv.conv2d(x, w, b, activation="relu").backward(g)  # accumulates: twice the first
    for t, once in zip((x, w, b), first, strict=True):
        np.testing.assert_allclose(t.grad, 2 * once, rtol=1e-12)
    mask = out.data > 0
    np.testing.assert_allclose(first[2], (g * mask).sum(axis=(0, 2, 3)), rtol=1e-12)


def channels_last_copy(x: Tensor) -> Tensor:
    """x through a 1x1 identity convolution: the same values in NHWC memory, what a previous
    layer hands on (and the gradient flows back to x, so x can stay a C-contiguous leaf)."""
    c = x.shape[1]
    out = conv.conv2d(x, Tensor(np.eye(c, dtype=x.dtype).reshape(c, c, 1, 1)))
    assert channels_last.is_channels_last(out.data) and (c == 1 or not out.data.flags.c_contiguous)
    return out


@pytest.mark.parametrize("xs,kernel,stride", [
    ((2, 3, 4, 6), (2, 2), None),  # tiling windows
    ((1, 2, 7, 6), (3, 2), (2, 1)),  # overlapping windows
    ((2, 2, 5, 7), (2, 2), (3, 3)),  # pixels skipped, rows and columns left over
])  # fmt: skip
def test_max_pool_values_and_gradients(mode, xs, kernel, stride):
    x = leaf(np.random.default_rng(2), *xs)
    out = conv.max_pool2d(channels_last_copy(x), kernel, stride)
    assert channels_last.is_channels_last(out.data)
    reference = conv.max_pool2d(Tensor(x.data), kernel, stride)  # NCHW kernels
    np.testing.assert_array_equal(out.data, reference.data)
    check_grad(lambda: conv.max_pool2d(channels_last_copy(x), kernel, stride), [x])


def test_max_pool_ties_and_nan(mode):
    """Ties share the gradient; a NaN anywhere in a window wins it (also after a larger
    value) and gives all of that window's inputs a NaN gradient; inf stays inf."""
    v = np.zeros((1, 2, 4, 4))
    v[0, 0, :2, :2] = [[1.0, 3.0], [3.0, 3.0]]
    v[0, 1, 1, 1], v[0, 1, 0, 2], v[0, 1, 2, 0], v[0, 1, 3, 1] = np.nan, np.inf, 5.0, np.nan
    x = Tensor(np.ascontiguousarray(v.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
               requires_grad=True)  # fmt: skip
    out = conv.max_pool2d(x, 2)
    assert channels_last.is_channels_last(out.data)
    assert np.isnan(out.data[0, 1, 0, 0]) and out.data[0, 1, 0, 1] == np.inf
    assert np.isnan(out.data[0, 1, 1, 0]) and out.data[0, 1, 1, 1] == 0
    out.sum().backward()
    np.testing.assert_allclose(x.grad[0, 0, :2, :2], [[0, 1 / 3], [1 / 3, 1 / 3]])
    assert np.isnan(x.grad[0, 1, :2, :2]).all() and np.isfinite(x.grad[0, 1, :2, 2:]).all()


def lenet_pass(dtype, seed: int = 0):
    """conv 5x5 pad 2 -> relu -> pool -> conv 5x5 -> relu -> pool, with gradients."""
    rng = np.random.default_rng(seed)
    x = Tensor(rng.random((6, 1, 16, 16)).astype(dtype), requires_grad=True)
    w1 = Tensor(rng.standard_normal((4, 1, 5, 5)).astype(dtype) * 0.3, requires_grad=True)
    w2 = Tensor(rng.standard_normal((8, 4, 5, 5)).astype(dtype) * 0.2, requires_grad=True)
    b2 = Tensor(rng.standard_normal(8).astype(dtype) * 0.1, requires_grad=True)
    h = conv.max_pool2d(conv.conv2d(x, w1, padding=2, activation="relu"), 2)
    out = conv.max_pool2d(conv.conv2d(h, w2, b2, activation="relu"), 2)
    out.backward(np.ones(out.shape, dtype))
    return out.data, x.grad, w1.grad, w2.grad, b2.grad


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_a_lenet_pass_equals_the_numpy_path(numpy_only, monkeypatch, request, dtype, tol):
    reference = lenet_pass(dtype)
    monkeypatch.undo()
    off_onednn(monkeypatch)
    for name in MODES:
        parallel, threads, block_bytes = MODES[name]
        monkeypatch.setattr(selection, "MIN_ELEMENTS", 0)
        monkeypatch.setattr(channels_last, "_plan", lambda compiled, p=parallel, t=threads: (p, t))
        monkeypatch.setattr(channels_last, "BLOCK_BYTES", block_bytes)
        for got, want in zip(lenet_pass(dtype), reference, strict=True):
            assert got.dtype == dtype
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name)


def test_the_plan_follows_the_blas(monkeypatch):
    """Threads over blocks only with oneMKL (per-thread GEMM threads) and im2col
    convolutions; else numba's parallel kernels over the whole batch."""
    from distnet.kernels import numba_conv_nhwc

    monkeypatch.setattr(selection, "conv_library", lambda: "im2col")
    monkeypatch.setattr(selection, "blas", lambda: "numpy")
    assert channels_last._plan(numba_conv_nhwc) == (True, 1)
    monkeypatch.setattr(selection, "blas", lambda: "mkl")
    assert channels_last._plan(numba_conv_nhwc) == (False, numba_conv_nhwc.parallel_slots())
    # oneDNN's OpenMP team runs the convolutions: pooling joins that team
    monkeypatch.setattr(selection, "conv_library", lambda: "onednn")
    assert channels_last._plan(numba_conv_nhwc) == (True, 1)


def test_relu_code_and_sample_blocks():
    from distnet.kernels import numba_conv_nhwc

    assert numba_conv_nhwc.RELU == kernels.ACTIVATIONS.index("relu")
    assert channels_last.sample_blocks(5, channels_last.BLOCK_BYTES // 2) == [(0, 2), (2, 4),
                                                                             (4, 5)]  # fmt: skip
    assert channels_last.sample_blocks(3, 10 * channels_last.BLOCK_BYTES) == [(0, 1), (1, 2),
                                                                              (2, 3)]  # fmt: skip


def test_block_threads_results_in_block_order_and_errors():
    import threading

    made = []

    def make_worker():  # per-thread state, made once by each thread that takes blocks
        made.append(threading.get_ident())
        return lambda block: (block * block, threading.get_ident())

    for threads in (1, 2, 3):
        for _ in range(10):
            made.clear()
            results = block_threads.run(make_worker, list(range(17)), threads)
            assert [r[0] for r in results] == [i * i for i in range(17)]
            assert sorted(made) == sorted({r[1] for r in results}) and len(made) <= threads

    def failing_worker():
        def worker(block):
            if block == 9:
                raise ValueError("block 9")
            return block

        return worker

    for threads in (1, 2):
        with pytest.raises(ValueError, match="block 9"):
            block_threads.run(failing_worker, list(range(12)), threads)


@pytest.mark.skipif(selection.blas() == "numpy", reason="neither oneDNN nor oneMKL is installed")
def test_blas_threads_are_set_per_thread():
    previous = gemm.blas_threads_local(1)
    try:
        assert gemm.blas_threads_local(1) == 1  # what this thread had just set
        gemm.blas_threads_local(0)
        a, b = np.ones((64, 64), np.float32), np.ones((64, 128), np.float32)
        # a product too small for threads runs on one, then the setting is back
        assert gemm.MIN_GEMM_FLOPS <= 64 * 64 * 128 < gemm.MIN_THREADED_GEMM_FLOPS
        np.testing.assert_array_equal(gemm.matmul(a, b), np.full((64, 128), 64.0))
        assert gemm.blas_threads_local(0) == 0
    finally:
        gemm.blas_threads_local(previous)
