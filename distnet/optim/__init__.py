"""Optimisers over flat buffers, and learning-rate schedules."""

from distnet.optim.adaptive import AdaGrad, Adam, RMSProp
from distnet.optim.factory import OPTIMIZERS, flat_optimizer, make_optimizer, optimizer_class
from distnet.optim.optimizer import SGD, Optimizer
from distnet.optim.protocol import ForeignOptimizer, LoopProtocol
from distnet.optim.schedules import (
    CosineAnnealingLR,
    ExponentialLR,
    LRSchedule,
    ReduceLROnPlateau,
    StepLR,
)

__all__ = [
    "Optimizer",
    "LoopProtocol",
    "ForeignOptimizer",
    "SGD",
    "Adam",
    "RMSProp",
    "AdaGrad",
    "LRSchedule",
    "StepLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "ReduceLROnPlateau",
    "OPTIMIZERS",
    "flat_optimizer",
    "make_optimizer",
    "optimizer_class",
]
