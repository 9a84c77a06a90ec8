"""``conv2d`` on CPU float32 arrays through oneDNN (``distnet.kernels.onednn``, the
``[onednn]`` extra).

The activations' memory is NHWC, as in ``distnet.core.channels_last``: the result is an
(N, O, OH, OW) array with channels-last strides, which that module's max pooling and the next
convolution read without a copy. oneDNN computes the convolution, its bias and a ReLU in one
primitive; tanh and sigmoid run after it in distnet's fused kernel. Backward: one pass of
``distnet.kernels.activation_backward`` gives dL/dz and the bias gradient, then oneDNN's
backward-weights primitive writes the weight gradient into the flat gradient buffer (through
a reorder from its blocked layout) and its backward-data primitive the input gradient.

Where oneDNN is not used (``conv2d`` returns None and the caller takes the im2col path):
float64, shapes whose bottom/right padding would be negative (a stride that skips the last
rows), input gradients of layers with fewer than ``MIN_CHANNELS_FOR_INPUT_GRAD`` channels, and
any geometry oneDNN reports as unimplemented.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import kernels
from distnet.core.channels_last import as_nhwc
from distnet.core.tensor import WRITTEN, Tensor, make_result
from distnet.kernels.onednn import UNIMPLEMENTED, OneDnnError

MIN_CHANNELS_FOR_INPUT_GRAD = 8
"""oneDNN 3.2's backward-data primitive for a one-channel input (``brgconv`` on AVX-512) took
342 ms for the LeNet step's first layer, against 2 ms through col2im; a first layer rarely
needs its input's gradient, and when it does the im2col path computes it."""


def _far_padding(size: int, kernel: int, stride: int, dilation: int, near: int, out: int) -> int:
    """Padding on the bottom (right) side that gives ``out`` outputs: PyTorch's formula floors,
    so the far side may need less than ``near`` (or a negative amount: rows never read)."""
    return (out - 1) * stride + (kernel - 1) * dilation + 1 - size - near


def conv2d(
    dnnl: Any,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    activation: str | None,
    out_size: tuple[int, int],
) -> Tensor | None:
    """``distnet.core.conv.conv2d`` after its checks. Shapes: x (N, C, H, W) float32, weight
    (O, C, KH, KW), bias (O,) -> (N, O, OH, OW) with NHWC memory; None when oneDNN does not
    take this case (see the module docstring)."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh, ow = out_size
    bottom = _far_padding(h, kh, stride[0], dilation[0], padding[0], oh)
    right = _far_padding(w, kw, stride[1], dilation[1], padding[1], ow)
    if bottom < 0 or right < 0 or (x.requires_grad and c < MIN_CHANNELS_FOR_INPUT_GRAD):
        return None
    xd = as_nhwc(x.data)
    wd = np.ascontiguousarray(weight.data)
    bd = None if bias is None else np.ascontiguousarray(bias.data)
    try:
        plan = dnnl.conv_plan((n, c, h, w, o, kh, kw, stride, dilation,
                               (*padding, bottom, right), out_size, activation == "relu",
                               bias is not None, x.requires_grad))  # fmt: skip
    except OneDnnError as e:
        if e.status == UNIMPLEMENTED:  # no oneDNN kernel for this geometry: im2col has one
            return None
        raise
    y = np.empty((n, oh, ow, o), dtype=np.float32)
    plan.run_forward(xd, wd, bd, y)
    if activation not in (None, "relu"):
        kernels.bias_activation_(y, None, activation)

    def backward(g: Any) -> tuple[Any, ...]:
        gz = as_nhwc(np.asarray(g, dtype=np.float32)).reshape(-1, o)
        need_gb = bias is not None and bias.requires_grad
        gb = np.empty(o, dtype=np.float32) if need_gb else None
        if activation is None:
            dz = gz
            if gb is not None:
                gz.sum(axis=0, out=gb)
        else:
            dz = kernels.activation_backward(activation, y.reshape(-1, o), gz, gb)
        dz = dz.reshape(n, oh, ow, o)
        gw = None
        if weight.requires_grad:
            target = weight.grad_target()
            if target is not None and target.flags.c_contiguous and target.dtype == np.float32:
                plan.run_backward_weights(xd, dz, target)
                gw = WRITTEN
            else:
                gw = np.empty(weight.shape, dtype=np.float32)
                plan.run_backward_weights(xd, dz, gw)
        if gb is not None:
            target = bias.grad_target()
            if target is not None:
                target[...] = gb
                gb = WRITTEN
        gx = None
        if x.requires_grad:
            gx_nhwc = np.empty((n, h, w, c), dtype=np.float32)
            plan.run_backward_data(dz, wd, gx_nhwc)
            gx = gx_nhwc.transpose(0, 3, 1, 2)
        return (gx, gw, gb) if bias is not None else (gx, gw)

    parents = (x, weight) if bias is None else (x, weight, bias)
    return make_result(y.transpose(0, 3, 1, 2), parents, backward, "conv2d")
