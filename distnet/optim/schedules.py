"""Learning-rate schedules: they set ``opt.lr`` and nothing else.

Call ``step()`` once per epoch (or per step: the unit is yours) after ``opt.step()``, like
torch.optim.lr_scheduler. The epoch-indexed schedules are closed forms of their counter, so
that a schedule restored from ``state_dict()`` continues exactly where it stopped.
``ReduceLROnPlateau.step(metric)`` takes the monitored value instead.
"""

from __future__ import annotations

import math
from typing import Any

from distnet.optim.optimizer import Optimizer


def _check_optimizer(schedule: Any, optimizer: Any) -> None:
    # A DistributedOptimizer is an Optimizer of the wrapped class, so no duck typing is needed.
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"{type(schedule).__name__}: expected a distnet.optim.Optimizer, got "
            f"{type(optimizer).__name__}"
        )


class LRSchedule:
    """Base class: remembers the optimiser's initial lr and counts ``step()`` calls.

    Subclasses implement ``lr_at(epoch)``; ``step()`` sets ``opt.lr = lr_at(epoch + 1)``.
    """

    def __init__(self, optimizer: Optimizer):
        _check_optimizer(self, optimizer)
        self.optimizer = optimizer
        self.base_lr = float(optimizer.lr)
        self.last_epoch = 0

    def lr_at(self, epoch: int) -> float:
        raise NotImplementedError

    def step(self) -> float:
        """Advances one epoch and returns the new learning rate."""
        self.last_epoch += 1
        self.optimizer.lr = float(self.lr_at(self.last_epoch))
        return self.optimizer.lr

    def get_last_lr(self) -> float:
        return self.optimizer.lr

    def state_dict(self) -> dict[str, Any]:
        """Plain Python scalars (JSON-friendly); the optimiser's own lr is saved by it."""
        return {k: v for k, v in vars(self).items() if k != "optimizer"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict()``; missing or unexpected keys raise a KeyError."""
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        for k in expected:
            setattr(self, k, state[k])


class StepLR(LRSchedule):
    """lr = base_lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        super().__init__(optimizer)
        if step_size < 1:
            raise ValueError(f"StepLR: step_size must be >= 1, got {step_size}")
        self.step_size, self.gamma = int(step_size), float(gamma)

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(LRSchedule):
    """lr = base_lr * gamma ** epoch."""

    def __init__(self, optimizer: Optimizer, gamma: float):
        super().__init__(optimizer)
        self.gamma = float(gamma)

    def lr_at(self, epoch: int) -> float:
        return self.base_lr * self.gamma**epoch


class CosineAnnealingLR(LRSchedule):
    """lr = eta_min + (base_lr - eta_min) (1 + cos(pi epoch / T_max)) / 2 (SGDR, no restarts).

    Past ``T_max`` the cosine continues (the lr rises again), as in PyTorch.
    """

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0):  # noqa: N803
        super().__init__(optimizer)
        if T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be >= 1, got {T_max}")
        self.T_max, self.eta_min = int(T_max), float(eta_min)

    def lr_at(self, epoch: int) -> float:
        cos = 1.0 + math.cos(math.pi * epoch / self.T_max)
        return self.eta_min + (self.base_lr - self.eta_min) * cos / 2.0


class ReduceLROnPlateau:
    """Multiplies lr by ``factor`` when a metric has stopped improving.

    A step improves when the metric beats the best so far by more than ``min_delta``
    (absolute; below it in mode "min", above it in mode "max"; NaN never improves). After
    more than ``patience`` consecutive steps without improvement (PyTorch's convention:
    patience=0 reduces on the first bad step) lr becomes max(lr * factor, min_lr), and the
    next ``cooldown`` steps are not counted.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
    ):
        if mode not in ("min", "max"):
            raise ValueError(f"ReduceLROnPlateau: mode must be 'min' or 'max', got {mode!r}")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"ReduceLROnPlateau: factor must be in (0, 1), got {factor}")
        if patience < 0 or cooldown < 0 or min_delta < 0 or min_lr < 0:
            raise ValueError("ReduceLROnPlateau: patience, cooldown, min_delta, min_lr >= 0")
        _check_optimizer(self, optimizer)
        self.optimizer = optimizer
        self.mode, self.factor = mode, float(factor)
        self.patience, self.cooldown = int(patience), int(cooldown)
        self.min_delta, self.min_lr = float(min_delta), float(min_lr)
        self.best: float | None = None
        self.num_bad_steps = 0
        self.cooldown_counter = 0
        self.last_epoch = 0

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return not math.isnan(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, metric: Any) -> float:
        """Records ``metric`` (a float, 0-d array or 1-element Tensor); returns the lr."""
        value = float(metric.item() if hasattr(metric, "item") else metric)
        self.last_epoch += 1
        if self._improves(value):
            self.best = value
            self.num_bad_steps = 0
        else:
            self.num_bad_steps += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_steps = 0
        if self.num_bad_steps > self.patience:
            self.optimizer.lr = max(self.optimizer.lr * self.factor, self.min_lr)
            self.cooldown_counter = self.cooldown
            self.num_bad_steps = 0
        return self.optimizer.lr

    def get_last_lr(self) -> float:
        return self.optimizer.lr

    state_dict = LRSchedule.state_dict
    load_state_dict = LRSchedule.load_state_dict
