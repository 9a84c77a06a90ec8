"""Modules, layers, losses, initialisers, autoencoders."""

from distnet.nn import init
from distnet.nn.layers import (
    Dense,
    LeakyReLU,
    ReLU,
    Sequential,
    Sigmoid,
    Softmax,
    Tanh,
    get_activation,
)
from distnet.nn.module import Module, Parameter, flat_buffers

__all__ = [
    "Module",
    "Parameter",
    "flat_buffers",
    "Dense",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "ReLU",
    "LeakyReLU",
    "Softmax",
    "get_activation",
    "init",
]
