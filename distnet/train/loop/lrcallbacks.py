"""Learning-rate schedules as ``fit`` callbacks, and the one a job's ``[finetune]`` asks for.

``LearningRateScheduler`` (Keras's name) sets ``optimizer.lr = lr_at(epoch)`` at the start of
every epoch. The rate is a closed form of the epoch number, so a resumed run (which starts at
its checkpoint's epoch) continues on the same curve without saving any state, and every rank
computes the same rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distnet.optim.schedules import CosineAnnealingLR, StepLR
from distnet.train.loop.callbacks import Callback, ReduceLROnPlateau


class LearningRateScheduler(Callback):
    """Sets ``optimizer.lr = lr_at(epoch)`` before each epoch (epoch counted from 0)."""

    def __init__(self, lr_at: Callable[[int], float]):
        self.lr_at = lr_at

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any]) -> None:
        self.optimizer.lr = float(self.lr_at(epoch))


def cosine(base_lr: float, epochs: int, lr_min: float = 0.0) -> Callable[[int], float]:
    """Cosine decay from ``base_lr`` at epoch 0 towards ``lr_min`` at epoch ``epochs``."""
    return lambda epoch: CosineAnnealingLR.lr_at(_Fixed(base_lr, epochs, lr_min), epoch)


def step(base_lr: float, every: int, factor: float) -> Callable[[int], float]:
    """``base_lr * factor ** (epoch // every)``."""
    return lambda epoch: StepLR.lr_at(_Fixed(base_lr, every, factor), epoch)


class _Fixed:
    # the optim schedules' closed forms read only these attributes; no optimiser is needed
    def __init__(self, base_lr: float, period: int, value: float):
        self.base_lr, self.T_max, self.step_size = float(base_lr), int(period), int(period)
        self.eta_min, self.gamma = float(value), float(value)


PLATEAU_FLOOR = 1e-3
"""The plateau schedule's floor, as a fraction of the starting rate, when no lr_min is given."""


def floor(ft: dict[str, Any]) -> float:
    """The lowest rate of a job's ``[finetune]`` schedule: ``lr_min``, else 0 (cosine, step)
    or ``lr * PLATEAU_FLOOR`` (plateau)."""
    if ft.get("lr_min") is not None:
        return float(ft["lr_min"])
    return float(ft["lr"]) * PLATEAU_FLOOR if ft.get("schedule", "plateau") == "plateau" else 0.0


def finetune_schedule(ft: dict[str, Any]) -> Callback:
    """The callback for a job's ``[finetune]`` section: ``schedule`` = 'plateau' (lr times
    ``plateau_factor`` after ``plateau_patience`` epochs without a lower training loss),
    'cosine' (over ``epochs``) or 'step' (times ``step_factor`` every ``step_epochs``);
    none goes below ``floor(ft)``."""
    kind = ft.get("schedule", "plateau")
    lr_min = floor(ft)
    if kind == "plateau":
        return ReduceLROnPlateau(
            "loss", factor=ft["plateau_factor"], patience=ft["plateau_patience"], min_lr=lr_min
        )
    if kind == "cosine":
        return LearningRateScheduler(cosine(ft["lr"], ft["epochs"], lr_min))
    if kind == "step":
        cut = step(ft["lr"], ft["step_epochs"], ft["step_factor"])
        return LearningRateScheduler(lambda epoch: max(cut(epoch), lr_min))
    raise ValueError(f"[finetune] schedule: unknown schedule {kind!r}")
