"""The collective consistency check (``distnet.parallel.consistency``) for parameter-server
rounds: with ``DISTNET_COLLECTIVE_CHECK=1`` every push carries a ``PushRecord`` (the worker's
clock, the operation, dtype, size and call site), and a shard compares the pushes of a sync
round before it sums them.

What the shard already refuses without the check (``shardchecks._push_problem``): a payload of the
wrong dtype or size for its range, a bad clock, share or token. Those are checked against the
shard, not against the other workers, and say nothing of where the push came from. What only a
comparison of the round's pushes finds: workers at different clocks in one round (a worker
that skipped or repeated a step alone), which the shard would otherwise pair (after a restart
from a snapshot it must, and does: ``_sync_push``), or a skipped step next to a real one. With
the check on, a mismatched round fails on every worker in it, naming each one's clock,
operation and call site; a push the shard refuses for itself names its call site too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from distnet.parallel.consistency import call_site, check_enabled_from_env


class PushRecord(NamedTuple):
    """What one worker pushed: ``op`` "push" or "skip", ``size`` in elements (-1: none),
    ``site`` as ``file:line in function``."""

    worker: int
    clock: int
    op: str
    dtype: str
    size: int
    site: str

    def agrees(self, other: PushRecord) -> bool:
        """The same round: clock, operation, dtype and size."""
        return self[1:5] == other[1:5]

    def describe(self) -> str:
        """``worker w: clock c push of n float32 at site``."""
        what = self.op if self.size < 0 else f"{self.op} of {self.size} {self.dtype}"
        return f"worker {self.worker}: clock {self.clock} {what} at {self.site}"


def push_site() -> str | None:
    """Where the push was asked for (the caller of the optimiser's step), when the check is
    on (``DISTNET_COLLECTIVE_CHECK``); None otherwise: pushes then carry nothing more."""
    return call_site(2) if check_enabled_from_env() else None


def push_record(worker: int, clock: int, grad: Any, site: str) -> PushRecord:
    """The shard's record of a push: ``grad`` as the shard received it (the array it read,
    from the message or the worker's outbox; None for a skipped step)."""
    if grad is None:
        return PushRecord(worker, clock, "skip", "none", -1, site)
    return PushRecord(worker, clock, "push", str(grad.dtype), int(grad.size), site)


def round_mismatch(
    record: PushRecord | None, pending: dict[int, tuple], compare_clocks: bool = True
) -> str | None:
    """The error text when ``record`` (a ``PushRecord`` joining a sync round, or None)
    disagrees with a push pending in that round (their records are the last item of
    ``pending``'s entries, None without the check); None when they agree.
    ``compare_clocks`` False: after a restart from a snapshot, when rounds of different
    clocks meet by design (``rounds._sync_push``)."""
    if record is None:
        return None
    mine = record
    others = [e[-1] for w, e in sorted(pending.items()) if w != mine.worker and e[-1]]
    bad = [o for o in others if not (o.agrees(mine) if compare_clocks else o[2:5] == mine[2:5])]
    if not bad:
        return None
    lines = "\n".join(f"  {r.describe()}" for r in sorted([*others, mine]))
    return (
        f"push mismatch in a sync round (seen by the push of worker {mine.worker}); "
        f"the workers pushed:\n{lines}"
    )
