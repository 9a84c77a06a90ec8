"""The compiled CPU path of ``conv2d`` and ``max_pool2d``: channels last inside, NCHW outside.

Tensors keep their NCHW shape and meaning; only the memory order of the activations between
layers changes. ``conv2d`` here returns ``z.reshape(N, OH, OW, O).transpose(0, 3, 1, 2)``:
an (N, O, OH, OW) array whose memory is the GEMM's (N OH OW, O) output, as PyTorch's
``channels_last`` format is. A following max pool sees such an input, pools along contiguous
channel vectors and returns the same kind of array; the next convolution reads it as NHWC
without a copy. Anything else (a flatten, a numpy op, the user) reads it like any strided
numpy array, and an NCHW input is converted once. Why NHWC: see ``distnet.kernels.numba_conv_nhwc``.

The GEMMs (``distnet.kernels.gemm.matmul``: oneMKL when installed), per layer and batch:
forward ``cols (N OH OW, KH KW C) @ W^T``, weight gradient ``dZ^T @ cols``, input gradient
``dZ @ W`` then col2im; W is the weight as (O, KH KW C), a small copy per step.
Only CPU numpy arrays come here (``distnet.kernels.selection.channels_last_kernels`` decides); cupy
and the pure numpy path keep ``distnet.core.conv``'s NCHW formulas.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from distnet import kernels
from distnet.core.tensor import WRITTEN, Tensor, make_result
from distnet.kernels import block_threads, gemm, selection


def is_channels_last(a: Any) -> bool:
    """Whether ``a`` (N, C, H, W) has NHWC memory (C-contiguous once transposed to NHWC)."""
    return a.ndim == 4 and a.transpose(0, 2, 3, 1).flags.c_contiguous


def as_nhwc(a: np.ndarray) -> np.ndarray:
    """``a`` (N, C, H, W) as a C-contiguous (N, H, W, C) array: a view when ``a`` is channels
    last (or C = 1), else one copy."""
    view = a.transpose(0, 2, 3, 1)
    return view if view.flags.c_contiguous else np.ascontiguousarray(view)


BLOCK_BYTES = 1 << 20
"""Column-matrix bytes per block of samples: small enough to stay in a core's L2 cache from
im2col to the GEMM that reads it (and from the GEMM to col2im in backward). Measured, CPU
time of the benchmark's step on one thread: 21.9 ms with 1 MiB blocks, 23.0 ms with 4 MiB,
31.3 ms with the whole batch at once (20 MB of columns for its second layer)."""


def sample_blocks(n: int, bytes_per_sample: int) -> list[tuple[int, int]]:
    """[(start, stop)) ranges of samples, each with about ``BLOCK_BYTES`` of columns."""
    step = max(1, min(n, BLOCK_BYTES // max(1, bytes_per_sample)))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _plan(compiled: ModuleType) -> tuple[bool, int]:
    """(parallel kernels?, threads): serial kernels on ``block_threads``' threads when
    GEMMs go through oneMKL or oneDNN (their threads can be set per thread), else numba's parallel
    kernels over the whole batch on this thread (see ``distnet.kernels.block_threads``).
    Also the latter when oneDNN runs the convolutions: its OpenMP threads, the same team as
    numba's ``omp`` layer, are still spinning when the pooling after a convolution starts,
    and kept ``block_threads``' thread off its core (LeNet step 9.5-10.4 ms, 8.0 parallel)."""
    if selection.blas() != "numpy" and selection.conv_library() != "onednn":
        return False, compiled.parallel_slots()
    return True, 1


def conv2d(
    compiled: ModuleType,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    activation: str | None,
    out_size: tuple[int, int],
) -> Tensor:
    """``distnet.core.conv.conv2d`` after its checks, on NHWC memory. Shapes as there:
    x (N, C, H, W), weight (O, C, KH, KW), bias (O,) -> (N, O, OH, OW), channels last.

    Blocks of samples: each block's columns are made, multiplied and dropped while in cache;
    backward makes them again (cheaper than keeping N OH OW KH KW C numbers in memory: 20 MB
    for the benchmark's second layer)."""
    xd = as_nhwc(x.data)
    n, h, w, c = xd.shape
    o, _, kh, kw = weight.shape
    (oh, ow), (ph, pw) = out_size, padding
    dtype = xd.dtype
    if ph or pw:
        xpad = np.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=dtype)
        xpad[:, ph : ph + h, pw : pw + w] = xd
    else:
        xpad = xd
    p, k = oh * ow, kh * kw * c  # pixels per sample, column length
    parallel, threads = _plan(compiled)
    blocks = sample_blocks(n, p * k * xd.itemsize) if not parallel else [(0, n)]
    geometry = (kh, kw, *stride, *dilation, compiled.constant_channels(c), parallel)
    im2col = compiled.im2col(*geometry)
    wmat = np.ascontiguousarray(weight.data.transpose(0, 2, 3, 1)).reshape(o, k)
    z = np.empty((n * p, o), dtype=dtype)  # (N OH OW, O): the NHWC output
    fused = activation in (None, "relu")  # here; tanh/sigmoid by distnet.kernels after
    kind = kernels.ACTIVATIONS.index("relu") if activation == "relu" else -1
    b = bias.data if bias is not None else np.zeros(o, dtype=dtype)

    largest = max(s1 - s0 for s0, s1 in blocks) * p  # rows of the largest block

    def columns(cols: np.ndarray, s0: int, s1: int) -> np.ndarray:
        cols = cols[: (s1 - s0) * p]
        im2col(xpad[s0:s1], cols.reshape(s1 - s0, oh, ow, kh, kw, c))
        return cols

    def forward_worker() -> Any:
        cols, bias_relu = np.empty((largest, k), dtype=dtype), compiled.bias_relu(parallel)

        def forward_block(block: tuple[int, int]) -> None:
            s0, s1 = block
            zb = z[s0 * p : s1 * p]
            gemm.matmul(columns(cols, s0, s1), wmat.T, out=zb)
            if fused and (bias is not None or activation is not None):
                bias_relu(zb, b, kind)

        return forward_block

    block_threads.run(forward_worker, blocks, threads)
    if not fused:
        kernels.bias_activation_(z, None if bias is None else b, activation)

    def backward(g: Any) -> tuple[Any, ...]:
        gz = as_nhwc(g).reshape(z.shape)
        need_gb = bias is not None and bias.requires_grad
        gb = np.empty(o, dtype=dtype) if need_gb else None
        dz = None if fused else kernels.activation_backward(activation, z, gz, gb)
        gpad = np.empty((n, h + 2 * ph, w + 2 * pw, c), dtype=dtype) if x.requires_grad else None
        col2im = compiled.col2im(*geometry)
        slots = compiled.parallel_slots() if parallel else 1

        def backward_worker() -> Any:
            cols = np.empty((largest, k), dtype=dtype)
            gcols = np.empty((largest, k), dtype=dtype) if gpad is not None else None
            d = np.empty((largest, o), dtype=dtype) if fused else None
            partial = np.empty((slots, o), dtype=dtype)
            relu_grad = compiled.relu_grad_bias_sum(parallel)

            def backward_block(block: tuple[int, int]) -> tuple[Any, Any]:
                s0, s1 = block
                rows = slice(s0 * p, s1 * p)
                gb_block = None
                if fused:  # d act / dz and the bias sum in one pass, in cache
                    db = d[: (s1 - s0) * p]
                    relu_grad(z[rows], gz[rows], db, partial, kind)
                    gb_block = partial.sum(axis=0)
                else:
                    db = dz[rows]
                gw_block = None
                if weight.requires_grad:
                    gw_block = gemm.matmul(db.T, columns(cols, s0, s1))
                if gcols is not None:
                    gcb = gcols[: (s1 - s0) * p]
                    gemm.matmul(db, wmat, out=gcb)
                    col2im(gcb.reshape(s1 - s0, oh, ow, kh, kw, c), gpad[s0:s1])
                return gw_block, gb_block

            return backward_block

        parts = block_threads.run(backward_worker, blocks, threads)
        gw = None
        if weight.requires_grad:
            gw_sum = sum(part[0] for part in parts[1:]) + parts[0][0]  # in block order
            gw_oihw = gw_sum.reshape(o, kh, kw, c).transpose(0, 3, 1, 2)
            target = weight.grad_target()
            if target is None:
                gw = np.ascontiguousarray(gw_oihw)
            else:
                target[...] = gw_oihw
                gw = WRITTEN
        if gb is not None:
            if fused:
                gb = sum(part[1] for part in parts[1:]) + parts[0][1]
            target = bias.grad_target()
            if target is not None:
                target[...] = gb
                gb = WRITTEN
        gx = None if gpad is None else gpad[:, ph : ph + h, pw : pw + w].transpose(0, 3, 1, 2)
        return (gx, gw, gb) if bias is not None else (gx, gw)

    out = z.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)
    parents = (x, weight) if bias is None else (x, weight, bias)
    return make_result(out, parents, backward, "conv2d")


def max_pool2d(
    compiled: ModuleType,
    x: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    out_size: tuple[int, int],
) -> Tensor:
    """``distnet.core.conv.max_pool2d`` without padding on a channels-last x (N, C, H, W):
    the same values and gradients (ties share, NaN wins), output channels last."""
    xd = as_nhwc(x.data)
    n, _, _, c = xd.shape
    oh, ow = out_size
    out = np.empty((n, oh, ow, c), dtype=xd.dtype)
    parallel, threads = _plan(compiled)
    chunk = max(1, -(-n // (4 * threads))) if not parallel else n  # 4 chunks per thread
    samples = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    pool = compiled.max_pool(*kernel, *stride, parallel)

    def forward_worker() -> Any:
        return lambda block: pool(xd[block[0] : block[1]], out[block[0] : block[1]])

    block_threads.run(forward_worker, samples, threads)

    def backward(g: Any) -> tuple[Any]:
        gd = as_nhwc(np.asarray(g, dtype=out.dtype))
        gx = np.empty_like(xd)
        pool_grad = compiled.max_pool_grad(*kernel, *stride, parallel)
        slots = compiled.parallel_slots() if parallel else 1

        def backward_worker() -> Any:
            count = compiled.scratch_counts(slots, ow, c, out.dtype)

            def backward_block(block: tuple[int, int]) -> None:
                s0, s1 = block
                pool_grad(xd[s0:s1], out[s0:s1], gd[s0:s1], gx[s0:s1], count)

            return backward_block

        block_threads.run(backward_worker, samples, threads)
        return (gx.transpose(0, 3, 1, 2),)

    return make_result(out.transpose(0, 3, 1, 2), (x,), backward, "max_pool2d")
