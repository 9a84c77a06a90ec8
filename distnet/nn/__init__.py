"""Modules, layers, losses, initialisers, autoencoders."""

from distnet.nn import init
from distnet.nn.autoencoder import AutoEncoder, StackedAutoEncoder, kl_sparsity
from distnet.nn.conv import AvgPool2d, Conv2d, Flatten, MaxPool2d
from distnet.nn.layers import (
    Dense,
    LeakyReLU,
    PReLU,
    ReLU,
    Sequential,
    Sigmoid,
    Softmax,
    Tanh,
    get_activation,
    prelu,
)
from distnet.nn.losses import (
    BCELoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    Loss,
    MSELoss,
    NLLLoss,
    get_loss,
    soft_cross_entropy,
)
from distnet.nn.module import Module
from distnet.nn.normalization import BatchNorm1d, batch_norm_train
from distnet.nn.parameter import Parameter, flat_buffers
from distnet.nn.regularization import Dropout, l1_penalty, l2_penalty, weights_of

__all__ = [
    "Module",
    "Parameter",
    "flat_buffers",
    "Dense",
    "Conv2d",
    "MaxPool2d",
    "AvgPool2d",
    "Flatten",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "ReLU",
    "LeakyReLU",
    "PReLU",
    "prelu",
    "Softmax",
    "get_activation",
    "BatchNorm1d",
    "batch_norm_train",
    "Dropout",
    "l1_penalty",
    "l2_penalty",
    "weights_of",
    "Loss",
    "MSELoss",
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "NLLLoss",
    "get_loss",
    "soft_cross_entropy",
    "init",
    "AutoEncoder",
    "StackedAutoEncoder",
    "kl_sparsity",
]
