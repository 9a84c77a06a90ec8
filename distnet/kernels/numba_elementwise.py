"""numba implementations behind ``distnet.kernels`` (imported only through it, lazily).

Each kernel is one parallel pass (``prange``) over its arrays. ``fastmath`` allows
reassociation, contraction and approximate reciprocals/functions, never the no-NaN/no-inf
assumptions: a NaN gradient still shows up as NaN parameters, as in the numpy path. Scalars
arrive in the arrays' dtype, so float32 buffers are updated in float32 arithmetic.
Kernels run on numba's ``workqueue`` threading layer unless ``NUMBA_THREADING_LAYER`` says
otherwise (see ``distnet.kernels.selection._numba``); it does not allow two threads to
launch parallel kernels at once, and only the training thread calls them. ``cache=True``
keeps the compiled code on disk (``distnet.kernels.selection.cache_dir``): the first run on a
machine compiles, later runs load in milliseconds.
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange  # noqa: F401  (get_num_threads: for distnet.kernels)

_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
_opts = {"parallel": True, "cache": True, "fastmath": _FAST, "nogil": True}

TANH, SIGMOID, RELU, LEAKY_RELU = 0, 1, 2, 3  # rows of distnet.kernels.unary.UNARY


# float32 tanh as a rational function (Eigen's and XLA's ``ptanh_float``: odd degree-13 over
# even degree-6, clamped where tanh rounds to +-1 in float32). Without Intel's SVML numba calls
# scalar libm tanh, 10x slower than numpy's SIMD loop; this form vectorises and stays within a
# few ulp of np.tanh (tests/distributed_mpi/test_kernels.py measures it).
_CLAMP = np.float32(7.90531110763549805)
_TINY = np.float32(0.0004)
_A1, _A3 = np.float32(4.89352455891786e-03), np.float32(6.37261928875436e-04)
_A5, _A7 = np.float32(1.48572235717979e-05), np.float32(5.12229709037114e-08)
_A9, _A11 = np.float32(-8.60467152213735e-11), np.float32(2.00018790482477e-13)
_A13 = np.float32(-2.76076847742355e-16)
_B0, _B2 = np.float32(4.89352518554385e-03), np.float32(2.26843463243900e-03)
_B4, _B6 = np.float32(1.18534705686654e-04), np.float32(1.19825839466702e-06)
_HALF, _ONE = np.float32(0.5), np.float32(1.0)


@njit(inline="always", fastmath=_FAST)
def tanh_f32(x):  # pragma: no cover
    xc = min(max(x, -_CLAMP), _CLAMP)
    x2 = xc * xc
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return x if abs(x) < _TINY else xc * p / q


@njit(**_opts)
def bias_activation(z, bias, with_bias, kind, slope):  # pragma: no cover
    """z <- act(z + bias) in place, one pass, rows in parallel; z (N, H), bias (H,).
    tanh and sigmoid only for float32 (the rational tanh); (leaky) relu for any float dtype;
    ``slope`` (z's dtype): leaky ReLU's, ignored by the others."""
    n, h = z.shape
    zero = z.dtype.type(0)
    for i in prange(n):
        row = z[i]
        if with_bias:
            for j in range(h):
                row[j] += bias[j]
        if kind == TANH:
            for j in range(h):
                row[j] = tanh_f32(row[j])
        elif kind == SIGMOID:
            for j in range(h):
                row[j] = _HALF + _HALF * tanh_f32(_HALF * row[j])
        elif kind == RELU:
            for j in range(h):
                row[j] = max(row[j], zero)
        else:
            for j in range(h):
                row[j] = row[j] if row[j] > zero else slope * row[j]


@njit(**_opts)
def activation_backward(y, g, out, bias_grad, kind, chunks, slope):  # pragma: no cover
    """out <- g * act'(from y); bias_grad <- column sums of out, in the same pass.

    Shapes: y, g, out (N, H); bias_grad (H,). ``chunks`` blocks of whole rows run in
    parallel, each summing its rows into its own row of partial sums (reduced at the end).
    Per row, the derivative and the sum are two short loops: one fused loop ran 2x slower
    (LLVM did not vectorise a store to ``out`` next to a read-modify-write of the sums).
    """
    n, h = y.shape
    partial = np.empty((chunks, h), dtype=y.dtype)
    for c in prange(chunks):
        acc = np.zeros(h, dtype=y.dtype)  # a thread's own array: stores to it vectorise
        for i in range(c * n // chunks, (c + 1) * n // chunks):
            yr, gr, orow = y[i], g[i], out[i]
            if kind == TANH:
                _tanh_backward_row(yr, gr, orow)
            elif kind == SIGMOID:
                _sigmoid_backward_row(yr, gr, orow)
            elif kind == RELU:
                _relu_backward_row(yr, gr, orow)
            else:
                _leaky_relu_backward_row(yr, gr, orow, slope)
            for j in range(h):
                acc[j] += orow[j]
        partial[c] = acc
    for j in range(h):
        total = partial[0, j]
        for c in range(1, chunks):
            total += partial[c, j]
        bias_grad[j] = total


@njit(inline="always", fastmath=_FAST)
def _tanh_backward_row(y, g, out):  # pragma: no cover
    one = y.dtype.type(1)
    for j in range(y.shape[0]):
        out[j] = g[j] * (one - y[j] * y[j])


@njit(inline="always", fastmath=_FAST)
def _sigmoid_backward_row(y, g, out):  # pragma: no cover
    one = y.dtype.type(1)
    for j in range(y.shape[0]):
        out[j] = g[j] * y[j] * (one - y[j])


@njit(inline="always", fastmath=_FAST)
def _relu_backward_row(y, g, out):  # pragma: no cover
    zero = y.dtype.type(0)
    for j in range(y.shape[0]):
        out[j] = g[j] if y[j] > zero else zero


@njit(inline="always", fastmath=_FAST)
def _leaky_relu_backward_row(y, g, out, slope):  # pragma: no cover
    zero = y.dtype.type(0)
    for j in range(y.shape[0]):
        out[j] = g[j] if y[j] > zero else slope * g[j]


@njit(**_opts)
def activation_grad(y, g, out, kind, slope):  # pragma: no cover
    n = y.size
    one, zero = y.dtype.type(1), y.dtype.type(0)
    if kind == TANH:
        for i in prange(n):
            out[i] = g[i] * (one - y[i] * y[i])
    elif kind == SIGMOID:
        for i in prange(n):
            out[i] = g[i] * y[i] * (one - y[i])
    elif kind == RELU:
        for i in prange(n):
            out[i] = g[i] if y[i] > zero else zero
    else:
        for i in prange(n):
            out[i] = g[i] if y[i] > zero else slope * g[i]


@njit(**_opts)
def exponent_max(bits, mask, chunks):  # pragma: no cover
    """max over i of ``bits[i] & mask`` (the float's exponent field): equal to ``mask`` when
    some element is inf or NaN. Integer max vectorises; a float reduction would not."""
    n = bits.size
    step = (n + chunks - 1) // chunks
    part = np.zeros(chunks, bits.dtype)
    for c in prange(chunks):
        part[c] = _exponent_max_serial(bits[c * step : min(n, (c + 1) * step)], mask)
    return part.max()


@njit(inline="never", cache=True, nogil=True)
def _exponent_max_serial(bits, mask):  # pragma: no cover
    top = mask ^ mask  # zero of the mask's integer type (a literal 0 would widen to int64)
    for i in range(bits.size):
        e = bits[i] & mask
        if e > top:
            top = e
    return top


@njit(**_opts)
def sgd(p, g, lr):  # pragma: no cover
    for i in prange(p.size):
        p[i] -= lr * g[i]


@njit(**_opts)
def sgd_momentum(p, g, v, lr, momentum, nesterov):  # pragma: no cover
    for i in prange(p.size):
        vi = momentum * v[i] + g[i]
        v[i] = vi
        p[i] -= lr * (g[i] + momentum * vi) if nesterov else lr * vi


@njit(**_opts)
def adam(p, g, m, v, beta1, beta2, step_size, inv_root_bias2, eps):  # pragma: no cover
    one = p.dtype.type(1)
    for i in prange(p.size):
        gi = g[i]
        mi = beta1 * m[i] + (one - beta1) * gi
        vi = beta2 * v[i] + (one - beta2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] -= step_size * mi / (np.sqrt(vi) * inv_root_bias2 + eps)


@njit(**_opts)
def rmsprop(
    p, g, sq, grad_avg, buf, lr, alpha, eps, momentum, centered, with_momentum
):  # pragma: no cover  # noqa: E501
    one = p.dtype.type(1)
    for i in prange(p.size):
        gi = g[i]
        si = alpha * sq[i] + (one - alpha) * gi * gi
        sq[i] = si
        if centered:
            ai = grad_avg[i] + (one - alpha) * (gi - grad_avg[i])
            grad_avg[i] = ai
            si = si - ai * ai
        d = gi / (np.sqrt(si) + eps)
        if with_momentum:
            d = momentum * buf[i] + d
            buf[i] = d
        p[i] -= lr * d


@njit(**_opts)
def adagrad(p, g, acc, lr, eps):  # pragma: no cover
    for i in prange(p.size):
        gi = g[i]
        ai = acc[i] + gi * gi
        acc[i] = ai
        p[i] -= lr * gi / (np.sqrt(ai) + eps)


@njit(**_opts)
def copy(dst, src):  # pragma: no cover
    """dst <- src, rows of the buffer in parallel (the copy bandwidth of ``distnet bench``)."""
    for i in prange(src.size):
        dst[i] = src[i]
