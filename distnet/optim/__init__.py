"""Optimisers over flat buffers, and learning-rate schedules."""

from distnet.optim.optimizer import SGD, Optimizer

__all__ = ["Optimizer", "SGD"]
