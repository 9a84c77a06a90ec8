"""``distnet.functional``: softmax, losses, dropout and the fused linear op."""

from distnet.core.functional import (
    binary_cross_entropy,
    cross_entropy,
    dropout,
    linear,
    log_softmax,
    mse_loss,
    nll_loss,
    softmax,
)
from distnet.core.ops import clip, leaky_relu, relu, sigmoid, tanh

__all__ = [
    "softmax",
    "log_softmax",
    "cross_entropy",
    "nll_loss",
    "binary_cross_entropy",
    "mse_loss",
    "dropout",
    "linear",
    "relu",
    "leaky_relu",
    "sigmoid",
    "tanh",
    "clip",
]
