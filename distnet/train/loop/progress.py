"""Progress of a stage on rank 0: a tqdm bar on a terminal, plain periodic lines in a log.

On a terminal (stdout is a tty) one bar per stage counts its steps and shows epoch, loss,
samples/s and the share of time spent waiting for input; epoch summaries are written above
it. When stdout is a file or a pipe (a log, SLURM, mpiexec's forwarding) there is no bar and
no carriage return: one line every ``every_epochs`` epochs plus one every ``interval_s``
seconds inside long epochs. ``DISTNET_PROGRESS=bar|lines|off`` overrides the choice.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from distnet import trace
from distnet.train.loop.callbacks import Callback


def progress_mode(stream: Any = None) -> str:
    """'bar', 'lines' or 'off': ``DISTNET_PROGRESS`` if set, else 'bar' on a terminal."""
    mode = os.environ.get("DISTNET_PROGRESS", "").strip().lower()
    if mode in ("bar", "lines", "off"):
        return mode
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", lambda: False)
    return "bar" if isatty() else "lines"


class StageProgress(Callback):
    """Shows one stage's progress (see the module docstring).

    Args:
        stage: the stage's name, shown on every line.
        log: prints a line (used in 'lines' mode and for epoch summaries).
        every_epochs: an epoch summary every this many epochs (and the last).
        interval_s: in 'lines' mode, a step line at most this often inside an epoch.
        mode: 'bar', 'lines' or 'off' (None: ``progress_mode()``).
        workers: ranks sharing each global batch equally: samples/s shown are rank 0's
            times this, the job's rate.
    """

    def __init__(
        self,
        stage: str,
        log: Callable[[str], None] = print,
        every_epochs: int = 5,
        interval_s: float = 30.0,
        mode: str | None = None,
        stream: Any = None,
        workers: int = 1,
    ) -> None:
        self.workers = max(1, int(workers))
        self.stage, self.log, self.every = stage, log, max(1, int(every_epochs))
        self.interval_s = interval_s
        self.stream = sys.stdout if stream is None else stream
        self.mode = mode or progress_mode(self.stream)
        self._bar: Any = None

    def on_train_begin(self, logs: dict[str, Any]) -> None:
        trace.enable_timers()  # input-wait share
        self._last_line = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any]) -> None:
        self._t0, self._wait0, self._samples = time.perf_counter(), self._wait(), 0
        self._loss_sum = 0.0
        if self.mode == "bar" and self._bar is None:
            from tqdm.auto import tqdm  # noqa: PLC0415

            per_epoch = self.loop.batches_per_epoch
            total = (self.loop.epochs - epoch) * per_epoch if per_epoch >= 0 else None
            # nrows given: on a terminal of unknown height (stty rows 0) tqdm hides every bar
            self._bar = tqdm(total=total, desc=self.stage, file=self.stream, leave=True,
                             mininterval=0.5, unit="step", nrows=100)  # fmt: skip

    @staticmethod
    def _wait() -> float:
        return trace.totals().get("input_wait", 0.0)

    def _rates(self) -> tuple[float, float]:
        """(the job's samples/s, rank 0's input-wait share) of this epoch so far."""
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        return self.workers * self._samples / elapsed, (self._wait() - self._wait0) / elapsed

    def on_batch_end(self, batch: int, logs: dict[str, Any]) -> None:
        n = int(logs.get("size", 1))
        self._samples += n
        self._loss_sum += float(logs["loss"]) * n
        if self.mode == "bar" and self._bar is not None:
            self._bar.update(1)
            if self._bar.n % 10 == 1:  # set_postfix formats; not every step
                rate, wait = self._rates()
                self._bar.set_postfix_str(
                    f"epoch {self.loop.epoch + 1}/{self.loop.epochs} loss {logs['loss']:.4f} "
                    f"{rate:,.0f} samples/s wait {wait:.0%}",
                    refresh=False,
                )
        elif self.mode == "lines" and time.perf_counter() - self._last_line >= self.interval_s:
            rate, wait = self._rates()
            mean = self._loss_sum / max(self._samples, 1)
            self._say(f"    [{self.stage}] epoch {self.loop.epoch + 1}/{self.loop.epochs} "
                      f"step {self.loop.step}  loss={mean:.4f}  {rate:,.0f} samples/s  "
                      f"input wait {wait:.0%}")  # fmt: skip

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        if self.mode == "off" or ((epoch + 1) % self.every and epoch + 1 != self.loop.epochs):
            return
        rate, wait = self._rates()
        shown = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if k != "lr")
        self._say(f"    epoch {epoch + 1:3d}/{self.loop.epochs}  {shown}  "
                  f"{rate:,.0f} samples/s  input wait {wait:.0%}")  # fmt: skip

    def _say(self, line: str) -> None:
        self._last_line = time.perf_counter()
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.log(line)

    def on_train_end(self, logs: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
