"""A worker's step time as a function of its batch, and the split that equalises step times.

Model, per worker::

    step seconds = fixed_s + per_sample_s * batch

``fixed_s`` is what a step costs whatever its batch (Python per-step work, launching kernels,
the stopped part of a throttled process's duty cycle), ``per_sample_s`` what each sample adds.
A split in proportion to samples/s assumes ``fixed_s = 0``: a worker with a fixed cost then
measures fewer samples/s the smaller its share, and a worker pushed down to a few samples
gets back only a few more per rebalance (the proportional rule does converge to equal step
times, one epoch end at a time). With the model, the split is the one whose predicted step
times are equal (``equal_time_split``), every worker's fixed cost included.

The fit (``StepTimeWindow``): the compute seconds of every step between two rebalances (a
*period*; its batch does not change within it) give one point, the period's batch and the mean
step time over the period's last half (the first steps of a period may still run under the
old conditions: warm-up, a speed change within it). Over the last ``WINDOW`` points,
weighted ``DECAY ** age``, a least-squares line gives the fixed fraction of a step at the
latest batch; the latest point alone gives the level. So a worker that slows down or speeds
up moves the split at the first rebalance after it, and the history only says how the time
grows with the batch. Until the window's batches span ``MIN_SPREAD`` the line is unknown: the
last fixed fraction fitted stands, 0 at first (the proportional rule). The fixed fraction is
capped at ``MAX_FIXED`` so that a noisy fit never makes samples look free, and a rebalance
shrinks a worker's batch by at most a factor ``MAX_SHRINK`` (``move_limits``: a line is
trusted near the batches it was fitted on; one noisy period never sends a worker to a
single sample). Growing is not limited (what the others give up bounds it), so a worker that
recovers gets its share back at once.

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
    "MAX_SHRINK",
    "MIN_SPREAD",
    "MIN_BATCH",
    "WINDOW",
    "StepTime",
    "StepTimeWindow",
    "equal_time_split",
    "fixed_fraction",
    "move_limits",
    "step_time",
]

WINDOW = 4  # periods a fit looks back on
DECAY = 0.5  # a period's weight relative to the next more recent one
MAX_FIXED = 0.9  # most of a step (at the latest batch) the fit may call fixed
MIN_BATCH = 1  # least samples per step a worker keeps (the loader needs one)
CHANGE = 0.25  # a time at one batch size that moved by more: a change of speed
MIN_SPREAD = 1.25  # a line needs batches at least this far apart (largest / smallest)
MAX_SHRINK = 4.0  # a rebalance divides a worker's batch by at most this factor


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


def fixed_fraction(points: Sequence[tuple[int, float]], decay: float = DECAY) -> float | None:
    """The fixed part of a step at the latest point's batch, as a fraction of that step, from
    a weighted least-squares line through ``points`` ((batch, seconds), oldest first, weight
    ``decay ** age``), clipped to [0, MAX_FIXED]; None unless the batches span ``MIN_SPREAD``
    (nearby batch sizes give a slope that is mostly timing noise)."""
    batches = [b for b, _ in points]
    if max(batches) < MIN_SPREAD * min(batches):
        return None
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
        self.share = 0.0  # the fixed fraction of the last fit that could be made (0: none yet)

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
        ratio = seconds / _mean(earlier) if len(earlier) >= 2 and _mean(earlier) > 0 else 1.0
        if not _changed(ratio) and self.points and self.points[-1][0] == batch:
            ratio = seconds / self.points[-1][1]  # at the batch of the period before
        if _changed(ratio):  # a change of speed: the old points in the new one's terms
            self.points = deque(((b, t * ratio) for b, t in self.points), self.points.maxlen)
        self.points.append((batch, seconds))
        share = fixed_fraction(list(self.points), self.decay)
        if share is not None:
            self.share = share
        return StepTime(self.share * seconds, (1.0 - self.share) * seconds / batch)


def _mean(steps: Sequence[tuple[int, float]]) -> float:
    return sum(t for _, t in steps) / len(steps)


def _changed(ratio: float) -> bool:
    return abs(math.log(ratio)) > math.log1p(CHANGE)


def move_limits(
    current: Sequence[int],
    global_batch: int,
    min_batch: int = MIN_BATCH,
    factor: float = MAX_SHRINK,
) -> tuple[list[int], list[int]]:
    """Per worker, the least and most samples a rebalance may give it: at least its
    ``current`` batch over ``factor`` (and ``min_batch``), at most the global batch; the
    ``current`` limits dropped where they could not hold the global batch."""
    n = len(current)
    lo = [max(min_batch, math.ceil(b / factor)) for b in current]
    if sum(lo) > global_batch:
        lo = [min_batch] * n
    return lo, [global_batch] * n


def equal_time_split(
    global_batch: int,
    models: Sequence[StepTime],
    min_batch: int = MIN_BATCH,
    current: Sequence[int] | None = None,
) -> list[int]:
    """Per-worker batch sizes summing to ``global_batch`` exactly, each >= ``min_batch`` (and,
    given the ``current`` split, within ``move_limits`` of it), whose predicted step times are
    as equal as integers allow.

    The real-valued split is ``x_r = (T - fixed_r) / per_sample_r`` clipped to each worker's
    limits, with the level T where ``sum x_r = global_batch`` (found by bisection: the sum
    grows with T); then each size is rounded down, and each sample left over goes to the
    worker whose step would be the shortest with it (ties: the lowest rank). Deterministic:
    the same models give the same integers on every rank.
    """
    n = len(models)
    if n < 1 or global_batch < n * min_batch:
        raise ValueError(
            f"a global batch of {global_batch} cannot give each of {n} workers {min_batch}"
        )
    if current is None:
        lo, hi = [min_batch] * n, [global_batch] * n
    else:
        lo, hi = move_limits(current, global_batch, min_batch)

    def split(level: float) -> list[float]:
        return [min(hi[r], max(lo[r], (level - m.fixed_s) / m.per_sample_s))
                for r, m in enumerate(models)]  # fmt: skip

    low = min(m.predict(lo[r]) for r, m in enumerate(models))
    high = max(m.predict(hi[r]) for r, m in enumerate(models))
    for _ in range(200):  # to the float's resolution; the same steps on every rank
        mid = 0.5 * (low + high)
        if sum(split(mid)) < global_batch:
            low = mid
        else:
            high = mid
    x = split(high)  # sums to global_batch, or a hair above
    sizes = [min(hi[r], max(lo[r], math.floor(v + 1e-9))) for r, v in enumerate(x)]
    while sum(sizes) > global_batch:  # rounding up of a near-integer overshot
        r = max((r for r in range(n) if sizes[r] > lo[r]), key=lambda r: sizes[r] - x[r])
        sizes[r] -= 1
    for _ in range(global_batch - sum(sizes)):
        room = [r for r in range(n) if sizes[r] < hi[r]]
        r = min(room, key=lambda r: (models[r].predict(sizes[r] + 1), r))
        sizes[r] += 1
    return sizes
