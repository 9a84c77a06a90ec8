"""``staleness = "auto"`` for ssp: a bound that follows the measured spread of worker speeds.

Rule (``AutoStaleness.bound``)::

    s = clamp(ceil(K * (slowest / fastest - 1)), 0, S_MAX)      K = 2, S_MAX = 16

where ``slowest``/``fastest`` are the largest and smallest of the workers' step times, each the
median of its last ``WINDOW`` steps. A step's time is measured on the shard: from the shard's
answer to a worker's push to that worker's next push (its pull, forward, backward and the
network), so the time a worker spent waiting for the bound is not in it (the wait is before
the answer). The bound is re-evaluated every ``EVERY`` clocks of the slowest worker.

Why this shape: with a fast worker and one r times slower, the fast one does about r steps per
slow step. ``r - 1`` steps of lead let it keep computing through one of the slow worker's
steps instead of blocking in the middle of it; ``K = 2`` gives room for the jitter of two slow
steps; beyond that a longer lead only makes gradients staler (a worker that is always slower
throttles the fast one to its pace whatever the bound), hence the cap. Equal speeds give 0:
ssp is then bulk-synchronous, as with the fixed ``staleness = 0``.

Every shard runs the rule on the pushes it receives. All shards receive the same workers'
pushes, so their measurements and bounds agree up to timing noise; they are not exchanged
(each shard enforces its own bound, and its records say which bound was in force).
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["EVERY", "K", "S_MAX", "WINDOW", "AutoStaleness", "auto_bound", "staleness_bound"]

K = 2.0
S_MAX = 16
WINDOW = 20
EVERY = 10


def staleness_bound(value: int | str) -> int | str:
    """``[dist] staleness`` as the shards take it: an integer >= 0, or "auto"."""
    return "auto" if value == "auto" else int(value)


def auto_bound(step_times: list[float], k: float = K, s_max: int = S_MAX) -> int:
    """The rule above for per-worker step times in seconds (all > 0); 0 for fewer than 2."""
    times = [t for t in step_times if t > 0]
    if len(times) < 2:
        return 0
    spread = max(times) / min(times) - 1.0
    return max(0, min(s_max, math.ceil(k * spread - 1e-9)))


class AutoStaleness:
    """One shard's measurements and the bound in force.

    Args:
        num_workers: the workers pushing to the shard.
    """

    def __init__(self, num_workers: int) -> None:
        self.bound = 0
        self._answered: list[float | None] = [None] * num_workers
        self._times: list[deque[float]] = [deque(maxlen=WINDOW) for _ in range(num_workers)]
        self._next_check = EVERY
        self.history: list[tuple[int, int]] = []  # (slowest clock, bound) at each change
        # per worker, the bound in force at each of the shard's "ahead" records
        self.in_force: list[list[int]] = [[] for _ in range(num_workers)]

    def arrived(self, worker: int, now: float) -> None:
        """A push of ``worker`` arrived at ``now`` (monotonic seconds)."""
        last = self._answered[worker]
        if last is not None:
            self._times[worker].append(now - last)

    def answered(self, worker: int, now: float, bound: int, keep: int) -> None:
        """The shard answered ``worker``'s push at ``now`` under ``bound`` (noted beside the
        shard's record of the push, the last ``keep`` of them kept): its next step starts."""
        self._answered[worker] = now
        self.in_force[worker].append(int(bound))
        del self.in_force[worker][:-keep]

    def stats(self) -> dict[str, object]:
        """The bound now, its changes, and the bound in force at each recorded push."""
        return {"bound": self.bound, "history": [list(h) for h in self.history],
                "in_force": [list(b) for b in self.in_force]}  # fmt: skip

    def update(self, slowest_clock: int, live: list[int]) -> int:
        """Re-evaluates the bound every ``EVERY`` clocks of the slowest worker, from the
        ``live`` workers' medians; returns the bound in force."""
        if slowest_clock < self._next_check:
            return self.bound
        self._next_check = slowest_clock + EVERY
        medians = [sorted(self._times[w])[len(self._times[w]) // 2] for w in live if self._times[w]]
        if len(medians) == len(live):
            new = auto_bound(medians)
            if new != self.bound:
                self.bound = new
                self.history.append((slowest_clock, new))
        return self.bound
