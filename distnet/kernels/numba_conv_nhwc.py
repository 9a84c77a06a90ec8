"""numba kernels of the channels-last (NHWC) convolution and pooling path (built only through
``distnet.kernels.selection.channels_last_kernels``, lazily, after numba's threading layer is set).

Why channels last: with the channels innermost, a window's row of KW pixels is one
contiguous run of KW * C numbers in the input and in the column matrix, so im2col and col2im
are vectorised block copies (conv 16->32 5x5, batch 128, one thread: im2col 1.0 ms against
1.9-2.3 ms for the NCHW kernel's rows of OW = 10), the GEMM's output (N OH OW, O) already is
the NHWC activation (no scatter back to NCHW), and bias, ReLU and pooling run along
contiguous channel vectors.

Layouts: x (N, Hp, Wp, C), already padded; columns (N, OH, OW, KH, KW, C), one row per
output pixel, in the order of ``weight.transpose(0, 2, 3, 1)`` (O, KH, KW, C). Each kernel is
made for one geometry (kernel, stride, dilation), compile-time constants of a closure, and
cached on disk like ``distnet.kernels.numba_conv``'s. Few channels are a constant too
(``constant_channels``): with C = 1 (a first layer on grey images) a runtime-length inner
loop made im2col 6x slower; with C = 16 a constant made im2col and col2im 20-40% slower.
Every kernel comes serial (``parallel=False``: ``distnet.core.channels_last`` runs it on its
own threads, a group of samples each) or as one parallel pass (``prange``) over blocks that
no two threads write: rows of output pixels, or whole samples where windows overlap.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from numba import get_num_threads, njit, prange

from distnet.kernels.numba_windows import RELU, compiled, tap


def constant_channels(c: int) -> int:
    """The ``channels`` argument of ``im2col``/``col2im`` for C channels."""
    return c if c < 8 else 0


ROWS_PER_BLOCK = 256  # pixels per parallel block of the elementwise passes (x C numbers)


@functools.cache
def im2col(kh: int, kw: int, sh: int, sw: int, dh: int, dw: int, channels: int,
           parallel: bool) -> Callable:  # fmt: skip
    """``channels``: C as a compile-time constant, or 0 to read it from the arrays.
    ``fn(xpad, cols)``: cols (N, OH, OW, KH, KW, C) <- the windows of xpad (N, Hp, Wp, C)."""

    @njit(**compiled(parallel))
    def fn(xpad, cols):  # pragma: no cover  (compiled)
        n, oh, ow = cols.shape[0], cols.shape[1], cols.shape[2]
        c = cols.shape[5] if channels == 0 else channels
        for r in prange(n * oh):
            s = r // oh
            oy = r % oh
            for ox in range(ow):
                for i in range(kh):
                    for j in range(kw):
                        for ci in range(c):
                            cols[s, oy, ox, i, j, ci] = xpad[
                                s, tap(oy, sh, i, dh), tap(ox, sw, j, dw), ci
                            ]

    return fn


@functools.cache
def col2im(kh: int, kw: int, sh: int, sw: int, dh: int, dw: int, channels: int,
           parallel: bool) -> Callable:  # fmt: skip
    """``channels`` as for ``im2col``.
    ``fn(cols, gpad)``: gpad (N, Hp, Wp, C) <- the column gradients (N, OH, OW, KH, KW, C)
    summed at their windows' places (overwritten; zeros where no window reaches). One sample
    per parallel block: windows of one sample overlap, those of two never do."""

    @njit(**compiled(parallel))
    def fn(cols, gpad):  # pragma: no cover
        n, hp, wp = gpad.shape[0], gpad.shape[1], gpad.shape[2]
        oh, ow = cols.shape[1], cols.shape[2]
        c = gpad.shape[3] if channels == 0 else channels
        zero = gpad.dtype.type(0)
        for s in prange(n):
            for y in range(hp):
                for x in range(wp):
                    for ci in range(c):
                        gpad[s, y, x, ci] = zero
            for oy in range(oh):
                for ox in range(ow):
                    for i in range(kh):
                        for j in range(kw):
                            for ci in range(c):
                                gpad[s, tap(oy, sh, i, dh), tap(ox, sw, j, dw), ci] += cols[
                                    s, oy, ox, i, j, ci
                                ]

    return fn


@functools.cache
def bias_relu(parallel: bool) -> Callable:
    """``fn(z, bias, kind)``: z (P, O) <- z + bias (O,), then ReLU when ``kind`` == RELU, in
    place; blocks of ``ROWS_PER_BLOCK`` pixels in parallel (rows of O = 16 are too short)."""

    @njit(**compiled(parallel))
    def fn(z, bias, kind):  # pragma: no cover
        p, o = z.shape
        zero = z.dtype.type(0)
        for blk in prange((p + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK):
            for r in range(blk * ROWS_PER_BLOCK, min(p, (blk + 1) * ROWS_PER_BLOCK)):
                for q in range(o):
                    v = z[r, q] + bias[q]
                    z[r, q] = max(v, zero) if kind == RELU else v

    return fn


@functools.cache
def relu_grad_bias_sum(parallel: bool) -> Callable:
    """``fn(y, g, d, partial, kind)``: d (P, O) <- g through a ReLU (``kind`` == RELU, y its
    output) or none; partial (S, O) <- sums of d over S slices of the pixels (their sum is
    the bias gradient; S = 1 for the serial kernel)."""

    @njit(**compiled(parallel))
    def fn(y, g, d, partial, kind):  # pragma: no cover
        p, o = y.shape
        slots = partial.shape[0]
        zero = d.dtype.type(0)
        for t in prange(slots):
            acc = np.zeros(o, dtype=d.dtype)  # a local sum: 30% faster than into partial
            for r in range(t * p // slots, (t + 1) * p // slots):
                for q in range(o):
                    v = g[r, q] if (kind != RELU or y[r, q] > zero) else zero
                    d[r, q] = v
                    acc[q] += v
            for q in range(o):
                partial[t, q] = acc[q]

    return fn


def parallel_slots() -> int:
    """numba's thread count: the parallel kernels' slots, and the split of sample blocks."""
    return get_num_threads()


@functools.cache
def max_pool(kh: int, kw: int, sh: int, sw: int, parallel: bool) -> Callable:
    """``fn(x, out)``: out (N, OH, OW, C) <- the maximum of each window of x (N, H, W, C), no
    padding; a NaN in a window gives NaN (numpy's ``maximum``). Vectorised along C."""

    @njit(**compiled(parallel, exact=True))
    def fn(x, out):  # pragma: no cover
        n, oh, ow, c = out.shape
        for r in prange(n * oh):
            s = r // oh
            oy = r % oh
            for ox in range(ow):
                for ci in range(c):
                    out[s, oy, ox, ci] = x[s, oy * sh, ox * sw, ci]
                for i in range(kh):
                    for j in range(kw):
                        for ci in range(c):
                            best = out[s, oy, ox, ci]
                            v = x[s, oy * sh + i, ox * sw + j, ci]
                            # keep a NaN best; take v when larger or NaN (branch-free select)
                            out[s, oy, ox, ci] = best if (best != best or best >= v) else v

    return fn


@functools.cache
def max_pool_grad(kh: int, kw: int, sh: int, sw: int, parallel: bool) -> Callable:
    """``fn(x, out, g, gx)``: gx (N, H, W, C) <- each window's gradient g shared equally by
    the inputs equal to its maximum (all NaN for a NaN window), as ``distnet.kernels.numba_conv``'s
    NCHW kernel. ``count`` (T, OW, C): scratch, one block per parallel slot; each slot takes
    a range of whole samples (windows of one sample may overlap, those of two never do)."""

    tiles = kh == sh and kw == sw  # windows tile the input: no window overlaps another

    @njit(inline="always", **compiled(False, exact=True))
    def _tile_grad(x, out, g, gx):  # pragma: no cover  (one sample: (H, W, C) and (OH, OW, C))
        h, w, c = x.shape
        oh, ow = out.shape[0], out.shape[1]
        zero = gx.dtype.type(0)
        for y in range(h):  # only what no window covers: the bottom rows, right columns
            for xx in range(ow * sw if y < oh * sh else 0, w):
                for ci in range(c):
                    gx[y, xx, ci] = zero
        for oy in range(oh):
            for ox in range(ow):
                for ci in range(c):
                    m = out[oy, ox, ci]
                    k = zero
                    for i in range(kh):
                        for j in range(kw):
                            k += x[oy * sh + i, ox * sw + j, ci] == m
                    # the share, or NaN where nothing equals a NaN maximum
                    share = g[oy, ox, ci] / k if k > zero else zero * m + (m - m)
                    for i in range(kh):
                        for j in range(kw):
                            v = x[oy * sh + i, ox * sw + j, ci]
                            gx[oy * sh + i, ox * sw + j, ci] = share if (v == m or m != m) else zero

    @njit(**compiled(parallel, exact=True))
    def fn(x, out, g, gx, count):  # pragma: no cover
        n, h, w, c = x.shape
        oh, ow = out.shape[1], out.shape[2]
        slots = count.shape[0]
        zero = gx.dtype.type(0)
        for t in prange(slots):
            cnt = count[t]
            for s in range(t * n // slots, (t + 1) * n // slots):
                if tiles:  # one pass, every covered input written once (15% faster)
                    _tile_grad(x[s], out[s], g[s], gx[s])
                    continue
                for y in range(h):
                    for xx in range(w):
                        for ci in range(c):
                            gx[s, y, xx, ci] = zero
                for oy in range(oh):
                    for ox in range(ow):
                        for ci in range(c):
                            cnt[ox, ci] = zero
                        for i in range(kh):
                            for j in range(kw):
                                for ci in range(c):
                                    hit = x[s, oy * sh + i, ox * sw + j, ci] == out[s, oy, ox, ci]
                                    cnt[ox, ci] += hit
                    for ox in range(ow):
                        for ci in range(c):  # the share, or NaN where nothing equals a NaN max
                            k = cnt[ox, ci]
                            m = out[s, oy, ox, ci]
                            cnt[ox, ci] = g[s, oy, ox, ci] / k if k > zero else zero * m + (m - m)
                        for i in range(kh):
                            for j in range(kw):
                                for ci in range(c):
                                    m = out[s, oy, ox, ci]
                                    v = x[s, oy * sh + i, ox * sw + j, ci]
                                    if v == m or m != m:
                                        gx[s, oy * sh + i, ox * sw + j, ci] += cnt[ox, ci]

    return fn


def scratch_counts(slots: int, ow: int, c: int, dtype: np.dtype) -> np.ndarray:
    """Scratch for ``max_pool_grad``: one (OW, C) block per slot."""
    return np.empty((slots, ow, c), dtype=dtype)
