"""The autodiff core: ``Tensor``, the reverse-mode engine, primitive and fused ops."""

from distnet.core import conv, functional, ops
from distnet.core.conv import avg_pool2d, conv2d, max_pool2d
from distnet.core.ops import (
    abs,
    clip,
    concatenate,
    exp,
    leaky_relu,
    log,
    matmul,
    relu,
    sigmoid,
    sqrt,
    sum_to,
    tanh,
)
from distnet.core.tensor import Tensor, is_grad_enabled, no_grad

__all__ = [
    "Tensor",
    "no_grad",
    "is_grad_enabled",
    "functional",
    "ops",
    "conv",
    "conv2d",
    "max_pool2d",
    "avg_pool2d",
    "sum_to",
    "concatenate",
    "matmul",
    "exp",
    "log",
    "sqrt",
    "abs",
    "tanh",
    "sigmoid",
    "relu",
    "leaky_relu",
    "clip",
]
