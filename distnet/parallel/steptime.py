"""A worker's step time as a function of its batch, and the split that equalises step times.

Model, per worker::

    step seconds = fixed_s + per_sample_s * batch

``fixed_s`` is what a step costs whatever its batch (Python per-step work, launching kernels,
the stopped part of a throttled process's duty cycle), ``per_sample_s`` what each sample adds.
A split in proportion to samples/s assumes ``fixed_s = 0``: a worker with a fixed cost then
measures fewer samples/s as its share shrinks, its share shrinks further, and it ends with a
few samples per step. With the model, the split is the one whose predicted step times are
equal (``equal_time_split``), every worker's fixed cost included.

The fit (``StepTimeWindow``): the compute seconds of every step between two rebalances (a
*period*; its batch does not change within it) give one point, the period's batch and the mean
step time over the period's last half (the first steps of a period may still run under the
old conditions: warm-up, a speed change within it). Over the last ``WINDOW`` points,
weighted ``DECAY ** age``, a least-squares line gives the fixed fraction of a step at the
latest batch; the latest point alone gives the level. So a worker that slows down or speeds
up moves the split at the first rebalance after it, and the history only says how the time
grows with the batch. With one batch size seen so far the line is unknown and the fixed part
is taken as 0 (the proportional rule); the fixed fraction is capped at ``MAX_FIXED`` so that
a noisy fit never makes samples look free.

A change of speed would bend that line (old points of the old speed beside a new one): where
the time at one batch size moved by more than ``CHANGE`` (the period's last half against its
first half, or against the previous period at the same batch), the older points are rescaled
by that ratio before the fit, on the assumption that a slower machine scales both parts of a
step alike. A new batch size with a time the model did not predict is not a change of speed:
it is what the line is fitted from.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CHANGE",
    "DECAY",
    "MAX_FIXED",
    "MIN_BATCH",
    "WINDOW",
    "StepTime",
    "StepTimeWindow",
    "equal_time_split",
    "fixed_fraction",
    "step_time",
]

WINDOW = 4  # periods a fit looks back on
DECAY = 0.5  # a period's weight relative to the next more recent one
MAX_FIXED = 0.9  # most of a step (at the latest batch) the fit may call fixed
MIN_BATCH = 1  # least samples per step a worker keeps (the loader needs one)
CHANGE = 0.25  # a time at one batch size that moved by more: a change of speed


@dataclass(frozen=True)
class StepTime:
    """``fixed_s + per_sample_s * batch`` seconds per step (both >= 0, per_sample_s > 0)."""

    fixed_s: float
    per_sample_s: float

    @classmethod
    def proportional(cls, samples_per_s: float) -> StepTime:
        """The model of the proportional rule: no fixed part."""
        return cls(0.0, 1.0 / samples_per_s)

    def predict(self, batch: float) -> float:
        """Seconds of one step with ``batch`` samples."""
        return self.fixed_s + self.per_sample_s * batch

    def samples_per_s(self, batch: float) -> float:
        """The rate at ``batch`` samples per step."""
        return batch / self.predict(batch)


def step_time(sizes: Sequence[int], models: Sequence[StepTime]) -> float:
    """Seconds of one synchronous step under ``sizes``: the slowest worker's predicted time."""
    return max(m.predict(b) for b, m in zip(sizes, models, strict=True))


def fixed_fraction(points: Sequence[tuple[int, float]], decay: float = DECAY) -> float:
    """The fixed part of a step at the latest point's batch, as a fraction of that step, from
    a weighted least-squares line through ``points`` ((batch, seconds), oldest first, weight
    ``decay ** age``); 0 with fewer than two batch sizes, clipped to [0, MAX_FIXED]."""
    if len({b for b, _ in points}) < 2:
        return 0.0
    n = len(points)
    w = [decay ** (n - 1 - i) for i in range(n)]
    sw = sum(w)
    mb = sum(wi * b for wi, (b, _) in zip(w, points, strict=True)) / sw
    mt = sum(wi * t for wi, (_, t) in zip(w, points, strict=True)) / sw
    sbb = sum(wi * (b - mb) ** 2 for wi, (b, _) in zip(w, points, strict=True))
    sbt = sum(wi * (b - mb) * (t - mt) for wi, (b, t) in zip(w, points, strict=True))
    slope = sbt / sbb
    fixed = mt - slope * mb
    latest = fixed + slope * points[-1][0]
    if not latest > 0 or not math.isfinite(latest):
        return 0.0
    return min(MAX_FIXED, max(0.0, fixed / latest))


class StepTimeWindow:
    """One worker's measured steps and its fitted ``StepTime`` (see the module docstring)."""

    def __init__(self, window: int = WINDOW, decay: float = DECAY) -> None:
        self.decay = decay
        self.points: deque[tuple[int, float]] = deque(maxlen=window)
        self._period: list[tuple[int, float]] = []  # (batch, seconds) of this period's steps

    def add_step(self, batch: int, seconds: float) -> None:
        """One step's compute: ``batch`` samples in ``seconds``."""
        self._period.append((int(batch), float(seconds)))

    def close_period(self) -> StepTime | None:
        """Ends the period (a rebalance): its point joins the window; returns the fit, or None
        when the period measured no step."""
        steps, self._period = self._period, []
        if not steps:
            return None
        half = len(steps) // 2
        earlier, recent = steps[:half], steps[half:]  # the last half: all of a one-step period
        batch = recent[-1][0]
        seconds = _mean(recent)
        if not seconds > 0:
            return None
        ratio = seconds / _mean(earlier) if earlier and _mean(earlier) > 0 else 1.0
        if not _changed(ratio) and self.points and self.points[-1][0] == batch:
            ratio = seconds / self.points[-1][1]  # at the batch of the period before
        if _changed(ratio):  # a change of speed: the old points in the new one's terms
            self.points = deque(((b, t * ratio) for b, t in self.points), self.points.maxlen)
        self.points.append((batch, seconds))
        share = fixed_fraction(list(self.points), self.decay)
        return StepTime(share * seconds, (1.0 - share) * seconds / batch)


def _mean(steps: Sequence[tuple[int, float]]) -> float:
    return sum(t for _, t in steps) / len(steps)


def _changed(ratio: float) -> bool:
    return abs(math.log(ratio)) > math.log1p(CHANGE)


def equal_time_split(
    global_batch: int, models: Sequence[StepTime], min_batch: int = MIN_BATCH
) -> list[int]:
    """Per-worker batch sizes summing to ``global_batch`` exactly, each >= ``min_batch``, whose
    predicted step times are as equal as integers allow.

    The real-valued split solves ``fixed_r + per_sample_r * x_r = T`` for all r with
    ``sum x_r = global_batch`` (workers that would get less than ``min_batch`` get it, the rest
    share what is left); then each size is rounded down, and each sample left over goes to the
    worker whose step would be the shortest with it (ties: the lowest rank). Deterministic:
    the same models give the same integers on every rank.
    """
    n = len(models)
    if n < 1 or global_batch < n * min_batch:
        raise ValueError(
            f"a global batch of {global_batch} cannot give each of {n} workers {min_batch}"
        )
    clamped = [False] * n
    while True:
        free = [r for r in range(n) if not clamped[r]]
        left = global_batch - min_batch * (n - len(free))
        inv = sum(1.0 / models[r].per_sample_s for r in free)
        level = (left + sum(models[r].fixed_s / models[r].per_sample_s for r in free)) / inv
        x = [
            float(min_batch) if clamped[r]
            else (level - models[r].fixed_s) / models[r].per_sample_s
            for r in range(n)
        ]  # fmt: skip
        short = [r for r in free if x[r] < min_batch]
        if not short:
            break
        for r in short:
            clamped[r] = True
    sizes = [max(min_batch, math.floor(v + 1e-9)) for v in x]
    while sum(sizes) > global_batch:  # rounding up of a near-integer overshot
        r = max((r for r in range(n) if sizes[r] > min_batch), key=lambda r: sizes[r] - x[r])
        sizes[r] -= 1
    for _ in range(global_batch - sum(sizes)):
        r = min(range(n), key=lambda r: (models[r].predict(sizes[r] + 1), r))
        sizes[r] += 1
    return sizes
