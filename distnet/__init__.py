"""distnet: data-parallel neural-network training you can read and own.

Layers (each imports only those above it): backend, core, nn, optim, data, dist, train, cli.
"""

from distnet import functional
from distnet.core import (
    Tensor,
    abs,
    clip,
    concatenate,
    exp,
    leaky_relu,
    log,
    matmul,
    no_grad,
    relu,
    sigmoid,
    sqrt,
    tanh,
)

__version__ = "0.1.0"

__all__ = [
    "Tensor",
    "no_grad",
    "functional",
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
    "__version__",
]
