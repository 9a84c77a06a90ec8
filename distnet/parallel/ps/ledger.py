"""The ledger: which pushes each shard applied, checked against what the workers were told.

Every shard appends one row ``(worker, incarnation, clock, kind)`` per push it takes into its
state, in the order it takes them (``kind`` 1: a gradient applied; 0: a step the worker
skipped, its clock advanced with nothing applied). A sync round notes its pushes in worker
order when it is applied. A retried push (its clock taken already) is not noted again. The
ledger is part of a shard's snapshot, so a shard restored from one keeps the rows up to it
(and has lost those after it, as it lost their updates).

Every worker notes ``(incarnation, clock, kind)`` for each push every shard acknowledged
(``ParameterServerOptimizer.acknowledged``). ``check_ledgers`` compares the two: each
acknowledged push must be in every shard's ledger exactly once, keyed by (worker, clock)
(a stand-in goes on with the dead worker's numbering under a new incarnation: a step the dead
one pushed to some shards only is taken as a retry there, so the incarnation may differ). A
dead worker's acknowledgements die with it; they are implied: a worker pushes clock c only
after every shard acknowledged its clock c - 1, so every clock of that incarnation below the
highest any shard holds was acknowledged by all.

    report = check_ledgers([shard_ledger_0, shard_ledger_1], {0: acks_0, 1: acks_1})
    report["missing"], report["doubled"]  # 0 and 0 when nothing was lost or applied twice
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

EXAMPLES = 10  # rows of each kind of problem named in a report


class Ledger:
    """A shard's (or a worker's) rows of int64, appended in order; ``rows()`` is shape
    ``(n, width)``."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._data = array("q")

    def note(self, *row: int) -> None:
        self._data.extend(int(v) for v in row)

    def rows(self) -> np.ndarray:
        return np.frombuffer(self._data, dtype=np.int64).reshape(-1, self.width).copy()

    def load(self, rows: np.ndarray) -> None:
        """Replaces the rows (a snapshot's), shape ``(n, width)``."""
        self._data = array("q", np.asarray(rows, dtype=np.int64).reshape(-1).tolist())

    def __len__(self) -> int:
        return len(self._data) // self.width


def _implied(ledgers: Sequence[np.ndarray], worker: int, incarnation: int) -> set[int]:
    """Clocks of ``(worker, incarnation)`` every shard acknowledged (see the module)."""
    clocks = [
        int(c)
        for rows in ledgers
        for c in rows[(rows[:, 0] == worker) & (rows[:, 1] == incarnation), 2]
    ]
    if not clocks:
        return set()
    return set(range(min(clocks), max(clocks)))


def check_ledgers(
    ledgers: Sequence[np.ndarray], acks: Mapping[int, np.ndarray | None]
) -> dict[str, Any]:
    """Compares the shards' ledgers (each ``(n, 4)``: worker, incarnation, clock, kind) with
    the workers' acknowledged pushes (worker -> ``(m, 3)``: incarnation, clock, kind; a worker
    whose record died with it is absent or None).

    Returns counts and up to ``EXAMPLES`` examples: ``acknowledged`` (pushes, all workers),
    ``implied`` (of those, the dead incarnations' implied ones), ``applied`` (rows per
    shard), ``missing`` (an acknowledged push a shard does not hold: lost), ``doubled`` (a
    (worker, clock) a shard holds more than once), ``unacknowledged`` (held, never
    acknowledged: a push whose worker died before every shard answered), ``ok`` (nothing
    missing or doubled)."""
    ledgers = [np.asarray(r, dtype=np.int64).reshape(-1, 4) for r in ledgers]
    wanted: dict[int, set[int]] = {}  # worker -> acknowledged clocks
    implied = 0
    seen_incarnations = {(int(w), int(i)) for rows in ledgers for w, i in rows[:, :2]}
    for worker, rows in acks.items():
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
            wanted.setdefault(int(worker), set()).update(int(c) for c in rows[:, 1])
    reported = {
        (int(w), int(i))
        for w, rows in acks.items()
        if rows is not None
        for i in np.asarray(rows, dtype=np.int64).reshape(-1, 3)[:, 0]
    }
    for worker, incarnation in sorted(seen_incarnations - reported):
        clocks = _implied(ledgers, worker, incarnation) - wanted.get(worker, set())
        implied += len(clocks)
        wanted.setdefault(worker, set()).update(clocks)
    missing: list[list[int]] = []
    doubled: list[list[int]] = []
    unacked: list[list[int]] = []
    n_missing = n_doubled = n_unacked = 0
    for s, rows in enumerate(ledgers):
        held = Counter((int(w), int(c)) for w, c in rows[:, [0, 2]])
        for (w, c), n in held.items():
            if n > 1:
                n_doubled += 1
                doubled += [[s, w, c, n]] if len(doubled) < EXAMPLES else []
            if c not in wanted.get(w, ()):
                n_unacked += 1
                unacked += [[s, w, c]] if len(unacked) < EXAMPLES else []
        for w, clocks in wanted.items():
            for c in sorted(clocks):
                if (w, c) not in held:
                    n_missing += 1
                    missing += [[s, w, c]] if len(missing) < EXAMPLES else []
    return {
        "acknowledged": sum(len(c) for c in wanted.values()),
        "implied": implied,
        "applied": [len(rows) for rows in ledgers],
        "missing": n_missing,
        "missing_examples": missing,  # [shard, worker, clock]
        "doubled": n_doubled,
        "doubled_examples": doubled,  # [shard, worker, clock, times]
        "unacknowledged": n_unacked,
        "unacknowledged_examples": unacked,
        "ok": n_missing == 0 and n_doubled == 0,
    }
