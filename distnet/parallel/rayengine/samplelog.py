"""``SampleLog``: which samples each step of a Ray worker trained on, for the exact sample
accounting of the elastic tests (the last feature column of their data carries an id).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class SampleLog:
    """Appends the samples of every finished step to ``dir/rank{r}-gen{g}.jsonl`` (for the
    exact sample accounting of the elastic tests: the last feature column carries an id)."""

    def __init__(self, directory: str, rank: int, generation: int) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"rank{rank}-gen{generation}.jsonl"
        self.stage = ""
        self._pending: list[float] = []

    def wrap_loader(self, loader: Any) -> Any:
        """Makes ``loader`` note the ids of each batch it yields (once per loader)."""
        if getattr(loader, "_sample_log", None) is self:
            return loader
        log = self

        class Recording(type(loader)):  # type: ignore[misc]
            def __iter__(self):  # noqa: ANN204
                for xb, yb in super().__iter__():
                    log._pending = [float(v) for v in xb[:, -1]]
                    yield xb, yb

        loader.__class__ = Recording
        loader._sample_log = self
        return loader

    def note_incomplete(self, epoch: int) -> None:
        """The samples of a step this worker computed but that never finished (a peer died
        in it): recorded apart, so a test can count the work done twice."""
        if self._pending:
            with open(self.path, "a") as f:
                record = {"stage": self.stage, "epoch": epoch, "incomplete": self._pending}
                f.write(json.dumps(record) + "\n")
        self._pending = []

    def step_done(self, epoch: int, step: int) -> None:
        with open(self.path, "a") as f:
            record = {"stage": self.stage, "epoch": epoch, "step": step, "ids": self._pending,
                      "time": time.time()}  # fmt: skip
            f.write(json.dumps(record) + "\n")
        self._pending = []
