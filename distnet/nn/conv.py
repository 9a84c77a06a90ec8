"""Convolutional layers: ``Conv2d``, ``MaxPool2d``, ``AvgPool2d`` and ``Flatten`` (NCHW)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from distnet.core import conv
from distnet.core.functional import FUSED_ACTIVATIONS
from distnet.core.tensor import Tensor
from distnet.nn import init as initialisers
from distnet.nn.layers import as_input, get_activation
from distnet.nn.module import Module
from distnet.nn.parameter import Parameter


class Conv2d(Module):
    """2-D convolution (cross-correlation), groups = 1: activation(conv(x, W) + b).

    Shapes: x (N, in_channels, H, W) -> (N, out_channels, OH, OW); W (out, in, KH, KW);
    b (out,). The initialiser sees the weight as a (in * KH * KW, out) matrix (fan in,
    fan out), so Glorot and He scale as for the equivalent dense layer on each window.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: conv.Pair,
        stride: conv.Pair = 1,
        padding: conv.Pair = 0,
        dilation: conv.Pair = 1,
        activation: str | Callable[[Tensor], Tensor] | None = None,
        bias: bool = True,
        init: str | Callable[..., np.ndarray] = "glorot_uniform",
        dtype: Any = np.float32,
    ):
        super().__init__()
        kh, kw = conv.pair(kernel_size, "kernel_size", "Conv2d", 1)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride = conv.pair(stride, "stride", "Conv2d", 1)
        self.padding = conv.pair(padding, "padding", "Conv2d", 0)
        self.dilation = conv.pair(dilation, "dilation", "Conv2d", 1)
        self.activation_name = (
            activation
            if isinstance(activation, str) or activation is None
            else getattr(activation, "__name__", "custom")
        )
        self.activation = get_activation(activation)
        self._fused = activation if activation in FUSED_ACTIVATIONS else None
        matrix = initialisers.get(init)((in_channels * kh * kw, out_channels), dtype)
        self.weight = Parameter(
            np.ascontiguousarray(matrix.T).reshape(out_channels, in_channels, kh, kw)
        )
        self.bias = Parameter(np.zeros(out_channels, dtype=dtype)) if bias else None

    def forward(self, x: Any) -> Tensor:
        x = as_input(x, self.weight.dtype)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Conv2d({self.in_channels}, {self.out_channels}): input of shape {x.shape}, "
                f"expected (N, {self.in_channels}, H, W)"
            )
        out = conv.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                          activation=self._fused)  # fmt: skip
        return out if self._fused else self.activation(out)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"activation={self.activation_name!r}"
        )


class _Pool2d(Module):
    op: Callable[..., Tensor]

    def __init__(self, kernel_size: conv.Pair, stride: conv.Pair | None = None,
                 padding: conv.Pair = 0):  # fmt: skip
        super().__init__()
        name = type(self).__name__
        self.kernel_size = conv.pair(kernel_size, "kernel_size", name, 1)
        self.stride = self.kernel_size if stride is None else conv.pair(stride, "stride", name, 1)
        self.padding = conv.pair(padding, "padding", name, 0)

    def forward(self, x: Any) -> Tensor:
        x = as_input(x, np.float32)
        return type(self).op(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Maximum over windows: (N, C, H, W) -> (N, C, OH, OW); stride defaults to the kernel."""

    op = staticmethod(conv.max_pool2d)


class AvgPool2d(_Pool2d):
    """Mean over windows (zero padding counted): (N, C, H, W) -> (N, C, OH, OW)."""

    op = staticmethod(conv.avg_pool2d)


class Flatten(Module):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...): from feature maps to a dense layer."""

    def forward(self, x: Any) -> Tensor:
        x = as_input(x, np.float32)
        return x.reshape(x.shape[0], -1)


def output_shape(layers: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape (without N) that ``layers`` turn an input of ``shape`` (C, H, W) into,
    computed without running them (to size the first dense layer after convolutions)."""
    for layer in layers:
        if isinstance(layer, Conv2d):
            c, h, w = shape
            shape = (layer.out_channels,) + tuple(
                conv.output_size(size, k, s, p, d)
                for size, k, s, p, d in zip(
                    (h, w), layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                    strict=True,
                )
            )  # fmt: skip
        elif isinstance(layer, _Pool2d):
            c, h, w = shape
            shape = (c,) + tuple(
                conv.output_size(size, k, s, p, 1)
                for size, k, s, p in zip((h, w), layer.kernel_size, layer.stride, layer.padding,
                                         strict=True)
            )  # fmt: skip
        elif isinstance(layer, Flatten):
            shape = (int(np.prod(shape)),)
        elif hasattr(layer, "out_features"):
            shape = (layer.out_features,)
    return shape
