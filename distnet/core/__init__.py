"""The autodiff core: ``Tensor``, the reverse-mode engine, primitive and fused ops."""

from distnet.core import functional, ops
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
