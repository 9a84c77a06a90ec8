"""Callbacks for ``fit`` (Keras's names and hooks).

A callback sees the running loop as ``self.loop`` (``model``, ``optimizer``, ``epoch``,
``step``, ``stop_training``) and the shortcuts ``self.model`` / ``self.optimizer``; it stops
training with ``self.loop.stop_training = True``. ``logs`` at epoch end hold ``loss``, every
metric, ``val_*`` when there is validation data, and ``lr``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Loop:
    """The state of a running ``fit`` that callbacks may read (and ``stop_training`` set)."""

    model: Any
    optimizer: Any
    epochs: int
    seed: int
    epoch: int = 0
    step: int = 0
    batches_per_epoch: int = -1
    stop_training: bool = False
    callbacks: list[Any] = field(default_factory=list)


class Callback:
    """Base class: override any of the hooks; all default to doing nothing."""

    loop: Loop
    runs_last = False  # checkpointing callbacks: see each epoch after every other callback

    @property
    def model(self) -> Any:
        return self.loop.model

    @property
    def optimizer(self) -> Any:
        return self.loop.optimizer

    def on_train_begin(self, logs: dict[str, Any]) -> None: ...
    def on_train_end(self, logs: dict[str, Any]) -> None: ...
    def on_epoch_begin(self, epoch: int, logs: dict[str, Any]) -> None: ...
    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None: ...
    def on_batch_begin(self, batch: int, logs: dict[str, Any]) -> None: ...
    def on_batch_end(self, batch: int, logs: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly: JSON values or numpy arrays."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict()``; called at the first epoch of a resumed run."""


class CallbackList:
    """Calls each hook on every callback, in order."""

    def __init__(self, callbacks: list[Callback], loop: Loop):
        # a checkpoint must record the epoch as the other callbacks left it (an lr cut by
        # ReduceLROnPlateau, EarlyStopping's counters), whatever order they were passed in
        callbacks = [c for c in callbacks if not c.runs_last] + [
            c for c in callbacks if c.runs_last
        ]
        self.callbacks = callbacks
        loop.callbacks = callbacks
        for c in callbacks:
            c.loop = loop

    def __getattr__(self, hook: str) -> Any:
        def call(*args: Any) -> None:
            for c in self.callbacks:
                getattr(c, hook)(*args)

        return call


class History(Callback):
    """Per-epoch logs: ``history["loss"]`` is a list with one value per epoch."""

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    def __contains__(self, key: str) -> bool:
        return key in self.history

    def __repr__(self) -> str:
        last = {k: round(v[-1], 5) for k, v in self.history.items() if v}
        return f"History(epochs={len(self.epoch)}, last={last})"


class _Monitor(Callback):
    """Tracks the best value of one logged quantity ('min' or 'max'; 'auto' from its name)."""

    def __init__(self, monitor: str, mode: str, min_delta: float):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"{type(self).__name__}: mode must be auto/min/max, got {mode!r}")
        if mode == "auto":
            mode = "max" if ("acc" in monitor or monitor.endswith("auc")) else "min"
        self.monitor, self.mode, self.min_delta = monitor, mode, abs(min_delta)
        self.best = math.inf if mode == "min" else -math.inf

    def _current(self, logs: dict[str, Any]) -> float:
        if self.monitor not in logs:
            raise KeyError(
                f"{type(self).__name__}: {self.monitor!r} is not in the logs "
                f"({sorted(logs)}); pass validation_data for val_* quantities"
            )
        return float(logs[self.monitor])

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(_Monitor):
    """Stops when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    With ``restore_best_weights`` the model gets the parameters (and buffers) of its best
    epoch back when training ends, stopped early or not (as Keras 3 does).
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 0,
        min_delta: float = 0.0,
        mode: str = "auto",
        restore_best_weights: bool = False,
    ):
        super().__init__(monitor, mode, min_delta)
        self.patience, self.restore_best_weights = patience, restore_best_weights
        self.wait, self.stopped_epoch, self.best_epoch = 0, -1, -1
        self.best_weights: dict[str, Any] | None = None

    def on_train_begin(self, logs: dict[str, Any]) -> None:
        self.wait, self.stopped_epoch, self.best_epoch = 0, -1, -1
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_weights = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        value = self._current(logs)
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = self.model.state_dict()
            return
        self.wait += 1
        if self.wait >= self.patience:  # as Keras: patience 0 and 1 both stop at once
            self.stopped_epoch = epoch
            self.loop.stop_training = True

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "wait": self.wait, "best_epoch": self.best_epoch,
                 "stopped_epoch": self.stopped_epoch}  # fmt: skip
        state.update({f"best_weights/{k}": v for k, v in (self.best_weights or {}).items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.wait, self.best_epoch, self.stopped_epoch = (
            int(state[k]) for k in ("wait", "best_epoch", "stopped_epoch")
        )
        weights = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("best_w")}
        self.best_weights = weights or None

    def on_train_end(self, logs: dict[str, Any]) -> None:
        if self.restore_best_weights and self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)


class ModelCheckpoint(_Monitor):
    """Saves a checkpoint directory (model, optimiser, RNG, epoch) after each epoch.

    Args:
        path: directory; may hold ``{epoch}`` and log keys, e.g. ``"ckpt/{epoch:03d}"``.
            ``{epoch}`` counts from 1, as Keras and the manifest's ``epoch`` do: ``ep3`` holds
            the state after three epochs, and resumes with ``initial_epoch=3``.
        save_best_only: write only when ``monitor`` improved.

    It sees each epoch after the other callbacks (``runs_last``). In a distributed run only
    rank 0 writes (replicas are equal; several writers would race
    on the same directory); every rank keeps the same ``best`` and ``saved`` bookkeeping.
    """

    runs_last = True

    def __init__(
        self,
        path: str,
        monitor: str = "val_loss",
        save_best_only: bool = False,
        mode: str = "auto",
        **extra: Any,
    ):
        super().__init__(monitor, mode, 0.0)
        self.path, self.save_best_only, self.extra = str(path), save_best_only, extra
        self.saved: list[str] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        from distnet.train.loop.checkpoint import save_checkpoint  # noqa: PLC0415

        if self.save_best_only:
            value = self._current(logs)
            if not self._improved(value):
                return
            self.best = value
        path = self.path.format(epoch=epoch + 1, **logs)  # epochs done, as in the manifest
        self.saved.append(path)
        if process_rank() != 0:
            return
        save_checkpoint(
            path, self.model, self.optimizer, epoch=epoch + 1, step=self.loop.step,
            seed=self.loop.seed, logs={k: float(v) for k, v in logs.items()}, **self.extra,
        )  # fmt: skip


class ReduceLROnPlateau(_Monitor):
    """Multiplies ``optimizer.lr`` by ``factor`` after ``patience`` epochs without improvement.

    ``cooldown`` epochs follow each reduction before waiting starts again; lr never drops
    below ``min_lr``.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        mode: str = "auto",
    ):
        super().__init__(monitor, mode, min_delta)
        if not 0.0 < factor < 1.0:
            raise ValueError(f"ReduceLROnPlateau: factor must be in (0, 1), got {factor}")
        self.factor, self.patience, self.cooldown, self.min_lr = factor, patience, cooldown, min_lr
        self.wait = self.cooldown_left = 0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "wait": self.wait, "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.wait, self.cooldown_left = int(state["wait"]), int(state["cooldown_left"])

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        value = self._current(logs)
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.wait = 0
        if self._improved(value):
            self.best, self.wait = value, 0
            return
        if self.cooldown_left > 0:
            return
        self.wait += 1
        if self.wait >= self.patience:
            new_lr = max(self.optimizer.lr * self.factor, self.min_lr)
            if new_lr < self.optimizer.lr:
                self.optimizer.lr = new_lr
            self.wait, self.cooldown_left = 0, self.cooldown


class CSVLogger(Callback):
    """One CSV row per epoch (epoch, then the logs' keys in sorted order)."""

    def __init__(self, path: str, append: bool = False):
        self.path, self.append = str(path), append
        self._file: Any = None
        self._writer: Any = None

    def on_train_begin(self, logs: dict[str, Any]) -> None:
        exists = self.append and os.path.exists(self.path) and os.path.getsize(self.path) > 0
        self._file = open(self.path, "a" if self.append else "w", newline="")  # noqa: SIM115
        self._writer, self._has_header = None, exists

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        keys = sorted(logs)
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, ["epoch", *keys], extrasaction="ignore")
            if not self._has_header:
                self._writer.writeheader()
        self._writer.writerow({"epoch": epoch, **logs})
        self._file.flush()

    def on_train_end(self, logs: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class JSONLLogger(Callback):
    """One JSON object per epoch, one per line; ``every_batch`` adds one per batch too."""

    def __init__(self, path: str, append: bool = True, every_batch: bool = False):
        self.path, self.append, self.every_batch = str(path), append, every_batch
        self._file: Any = None

    def on_train_begin(self, logs: dict[str, Any]) -> None:
        self._file = open(self.path, "a" if self.append else "w")  # noqa: SIM115

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_batch_end(self, batch: int, logs: dict[str, Any]) -> None:
        if self.every_batch:
            self._write({"event": "batch", "epoch": self.loop.epoch, "batch": batch, **logs})

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        self._write({"event": "epoch", "epoch": epoch, "step": self.loop.step, **logs})

    def on_train_end(self, logs: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def process_rank() -> int:
    """This process's rank from the launcher's environment (0 when not launched).

    The generic ``RANK`` counts only where a launcher set it: ``distnet launch``
    (``DISTNET_LAUNCHED``) or beside a ``WORLD_SIZE`` above 1 (torchrun's pair). A shell that
    happens to export ``RANK`` must not turn a one-process job into a silent rank."""
    for var in ("DISTNET_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    world = os.environ.get("WORLD_SIZE", "")
    launched = os.environ.get("DISTNET_LAUNCHED") == "1" or (world.isdigit() and int(world) > 1)
    if launched and os.environ.get("RANK", "").isdigit():
        return int(os.environ["RANK"])
    return 0


class ProgressBar(Callback):
    """A tqdm bar per epoch; silent when stderr is not a terminal or on ranks other than 0."""

    def __init__(self, rank: int | None = None, force: bool = False):
        self.rank = process_rank() if rank is None else rank
        self.enabled = force or (self.rank == 0 and sys.stderr.isatty())
        self._bar: Any = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm  # noqa: PLC0415

        total = self.loop.batches_per_epoch if self.loop.batches_per_epoch >= 0 else None
        self._bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{self.loop.epochs}", leave=True)

    def on_batch_end(self, batch: int, logs: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
            self._bar.close()
            self._bar = None
