"""numba implementations behind ``distnet.kernels`` (imported only through it, lazily).

Each kernel is one parallel pass (``prange``) over its arrays. ``fastmath`` allows
reassociation, contraction and approximate reciprocals/functions, never the no-NaN/no-inf
assumptions: a NaN gradient still shows up as NaN parameters, as in the numpy path. Scalars
arrive in the arrays' dtype, so float32 buffers are updated in float32 arithmetic.
Kernels run on numba's ``workqueue`` threading layer unless ``NUMBA_THREADING_LAYER`` says
otherwise (see ``distnet.kernels._numba``); it does not allow two threads to launch parallel
kernels at once, and only the training thread calls them. ``cache=True`` keeps the compiled
code on disk (``distnet.kernels.cache_dir``): the first run on a machine compiles, later runs
load in milliseconds.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
_opts = {"parallel": True, "cache": True, "fastmath": _FAST, "nogil": True}

TANH, SIGMOID, RELU = 0, 1, 2  # indices into distnet.kernels.ACTIVATIONS


@njit(**_opts)
def bias_relu(z, bias):  # pragma: no cover  (compiled)
    n, h = z.shape
    zero = z.dtype.type(0)
    for i in prange(n):
        row = z[i]
        for j in range(h):
            row[j] = max(row[j] + bias[j], zero)


@njit(**_opts)
def activation_grad(y, g, out, kind):  # pragma: no cover
    n = y.size
    one, zero = y.dtype.type(1), y.dtype.type(0)
    if kind == TANH:
        for i in prange(n):
            out[i] = g[i] * (one - y[i] * y[i])
    elif kind == SIGMOID:
        for i in prange(n):
            out[i] = g[i] * y[i] * (one - y[i])
    else:
        for i in prange(n):
            out[i] = g[i] if y[i] > zero else zero


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
