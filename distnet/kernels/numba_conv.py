"""numba kernels behind the convolution and pooling ops (built only through
``distnet.kernels.selection.conv_kernels``, lazily, after numba's threading layer is set).

Each kernel is made for one geometry (kernel, stride, dilation): those numbers are
compile-time constants of a closure, so LLVM folds the index arithmetic, unrolls the window
loops and vectorises the rows. Measured on 2 shared cores, one thread, batch 128: a 2x2 max
pool 0.29 ms with constant sizes against 1.45 ms with the same loops over run-time sizes;
col2im of the 16->32 5x5 layer 2.2 ms with multi-dimensional indexing against 10.8 ms with
flat computed offsets (and 5.3-6.4 ms for numpy's 25 strided slice adds). numba (0.68)
caches closures on disk keyed by their frozen values (checked: geometries compiled in any
order each load their own code), so each geometry compiles once per machine. Every kernel is
one parallel pass (``prange``) over independent blocks (rows of the column matrix, or
sample-channel planes), so no two threads write the same element.

Layouts: x (N, C, Hp, Wp), already padded; columns (C, KH, KW, N, OH, OW), kernel-major like
the weight's (C, KH, KW).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from numba import njit, prange

from distnet.kernels.numba_windows import RELU, compiled, tap


@functools.cache
def im2col(kh: int, kw: int, sh: int, sw: int, dh: int, dw: int) -> Callable:
    """``fn(xpad, cols)``: cols (C, KH, KW, N, OH, OW) <- the windows of xpad (N, C, Hp, Wp)."""

    @njit(**compiled(True))
    def fn(xpad, cols):  # pragma: no cover  (compiled)
        c, n, oh, ow = cols.shape[0], cols.shape[3], cols.shape[4], cols.shape[5]
        for r in prange(c * kh * kw):
            ci = r // (kh * kw)
            i = (r // kw) % kh
            j = r % kw
            for s in range(n):
                for oy in range(oh):
                    for ox in range(ow):
                        cols[ci, i, j, s, oy, ox] = xpad[
                            s, ci, tap(oy, sh, i, dh), tap(ox, sw, j, dw)
                        ]

    return fn


@functools.cache
def col2im(kh: int, kw: int, sh: int, sw: int, dh: int, dw: int) -> Callable:
    """``fn(cols, gpad)``: gpad (N, C, Hp, Wp) <- the column gradients (C, KH, KW, N, OH, OW)
    summed at their windows' places (gpad is overwritten, zeros where no window reaches)."""

    @njit(**compiled(True))
    def fn(cols, gpad):  # pragma: no cover
        n, c, hp, wp = gpad.shape
        oh, ow = cols.shape[4], cols.shape[5]
        zero = gpad.dtype.type(0)
        for plane in prange(n * c):
            s = plane // c
            ci = plane % c
            for y in range(hp):
                for x in range(wp):
                    gpad[s, ci, y, x] = zero
            for i in range(kh):
                for j in range(kw):
                    for oy in range(oh):
                        for ox in range(ow):
                            gpad[s, ci, tap(oy, sh, i, dh), tap(ox, sw, j, dw)] += cols[
                                ci, i, j, s, oy, ox
                            ]

    return fn


@functools.cache
def max_pool(kh: int, kw: int, sh: int, sw: int) -> Callable:
    """``fn(x, out)``: out (N, C, OH, OW) <- the maximum of each window of x (no padding;
    a NaN in a window gives NaN, as numpy's ``maximum`` does)."""

    @njit(**compiled(True, exact=True))
    def fn(x, out):  # pragma: no cover
        n, c, oh, ow = out.shape
        for plane in prange(n * c):
            s = plane // c
            ci = plane % c
            for oy in range(oh):
                for ox in range(ow):
                    best = x[s, ci, oy * sh, ox * sw]
                    probe = best - best  # NaN when any input is NaN (or +-inf): checked below
                    for i in range(kh):
                        for j in range(kw):
                            v = x[s, ci, oy * sh + i, ox * sw + j]
                            best = max(best, v)  # branch-free; max() alone may drop a NaN
                            probe += v - v
                    if probe != probe:  # rare: look for a NaN input, which must win
                        for i in range(kh):
                            for j in range(kw):
                                v = x[s, ci, oy * sh + i, ox * sw + j]
                                if v != v:
                                    best = v
                    out[s, ci, oy, ox] = best

    return fn


@functools.cache
def max_pool_grad(kh: int, kw: int, sh: int, sw: int) -> Callable:
    """``fn(x, out, g, gx)``: gx (N, C, H, W) <- each window's gradient g shared equally by
    the inputs equal to its maximum out (NaN over a window that has none: a NaN window).
    Windows that tile the input (stride = kernel) are written, not zero-filled and added."""
    tiles = kh == sh and kw == sw

    @njit(**compiled(True, exact=True))
    def fn(x, out, g, gx):  # pragma: no cover
        n, c, h, w = x.shape
        oh, ow = out.shape[2], out.shape[3]
        zero = gx.dtype.type(0)
        for plane in prange(n * c):
            s = plane // c
            ci = plane % c
            if tiles:  # only what no window covers (the bottom rows, right columns)
                for y in range(h):
                    for xx in range(ow * sw if y < oh * sh else 0, w):
                        gx[s, ci, y, xx] = zero
            else:
                for y in range(h):
                    for xx in range(w):
                        gx[s, ci, y, xx] = zero
            for oy in range(oh):
                for ox in range(ow):
                    best = out[s, ci, oy, ox]
                    count = 0
                    for i in range(kh):
                        for j in range(kw):
                            count += x[s, ci, oy * sh + i, ox * sw + j] == best
                    if count == 0:
                        share = zero * best  # NaN: only a NaN maximum equals nothing
                    else:
                        share = g[s, ci, oy, ox] / gx.dtype.type(count)
                    for i in range(kh):
                        for j in range(kw):
                            hit = count == 0 or x[s, ci, oy * sh + i, ox * sw + j] == best
                            if tiles:
                                gx[s, ci, oy * sh + i, ox * sw + j] = share if hit else zero
                            elif hit:
                                gx[s, ci, oy * sh + i, ox * sw + j] += share

    return fn


@njit(**compiled(True))
def gemm_to_nchw(z, bias, out, kind):  # pragma: no cover
    """out (N, O, P) <- act(z (O, N * P) + bias (O,)): the forward GEMM's output back to
    NCHW, the bias and a ReLU (``kind`` == RELU) in the same pass."""
    n, o, p = out.shape
    zero = out.dtype.type(0)
    for plane in prange(n * o):
        s = plane // o
        q = plane % o
        b = bias[q]
        for t in range(p):
            v = z[q, s * p + t] + b
            out[s, q, t] = max(v, zero) if kind == RELU else v


@njit(**compiled(True))
def nchw_to_gemm_grad(y, g, g2, kind):  # pragma: no cover
    """g2 (O, N * P) <- dL/dz from g = dL/dy (N, O, P), through a ReLU (``kind`` == RELU,
    y its output) or none: the backward GEMMs' operand in one pass."""
    n, o, p = g.shape
    zero = g.dtype.type(0)
    for plane in prange(n * o):
        s = plane // o
        q = plane % o
        for t in range(p):
            d = g[s, q, t]
            if kind == RELU and not y[s, q, t] > zero:
                d = zero
            g2[q, s * p + t] = d
