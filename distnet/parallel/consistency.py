"""Collective consistency checks: every rank's collectives are numbered, and with
``DISTNET_COLLECTIVE_CHECK=1`` compared across ranks before any data moves.

Every communicator (MPI and its shared-memory road, the Ray mailbox) owns one
``CollectiveTrace`` and calls ``trace.enter(op, buf)`` at the top of each collective. The
trace always keeps the number and name of the latest collective (what a stall report says of
each rank). With the check on, ``enter`` also hands this rank's ``CallRecord`` (sequence
number, operation, dtype, size, root, call site) to an exchange the engine provides: an
allgather on a side channel that every rank's k-th collective uses, whatever that collective
is, so the exchange itself always matches. An engine may also offer an allgather of two
integers per rank (the sequence number and a CRC of the rest), the cheap first look: the full
records then travel only when those differ. When any rank's record differs from this rank's,
every rank raises ``CollectiveMismatch`` naming each rank's operation and call site, instead
of hanging in mismatched collectives or mixing their payloads (PyTorch's
``TORCH_DISTRIBUTED_DEBUG=DETAIL`` does this for its process groups). Off, a collective pays
one attribute test and a counter.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

CHECK_ENV = "DISTNET_COLLECTIVE_CHECK"

_HERE = os.path.dirname(os.path.abspath(__file__))
# The modules a collective passes through on its way down: a call site is the first frame
# outside them (the wrapper or the training code that asked for the collective).
_PLUMBING = {
    os.path.join(_HERE, name)
    for name in ("consistency.py", "comm.py", "shm.py", "buckets.py", "hierarchical.py",
                 os.path.join("rayengine", "comm.py"), os.path.join("ps", "worker.py"),
                 os.path.join("ps", "pushcheck.py"))
}  # fmt: skip


def check_enabled_from_env() -> bool:
    """``DISTNET_COLLECTIVE_CHECK`` (default off): 1/on/true/yes turns the check on."""
    return os.environ.get(CHECK_ENV, "0").strip().lower() in ("1", "on", "true", "yes")


class CollectiveMismatch(RuntimeError):
    """Ranks called different collectives (or with another dtype, size or root) at the same
    point of the job; raised on every rank, before the collective moved any data."""

    def __init__(self, rank: int, records: list[CallRecord]) -> None:
        self.rank, self.records = rank, list(records)
        lines = "\n".join(f"  {r.describe()}" for r in self.records)
        super().__init__(
            f"collective mismatch at collective #{records[rank].seq} (seen on rank {rank}); "
            f"the ranks called:\n{lines}"
        )


class CallRecord(NamedTuple):
    """What one rank is about to call: ``size`` in elements (-1 for Python objects), ``root``
    -1 for collectives without one, ``site`` as ``file:line in function``."""

    rank: int
    seq: int
    op: str
    dtype: str
    size: int
    root: int
    site: str

    def agrees(self, other: CallRecord) -> bool:
        """Same collective: sequence number, operation, dtype, size and root."""
        return self[1:6] == other[1:6]

    def describe(self) -> str:
        """``rank r: #seq op of size dtype [from root k] at site``."""
        what = self.op if self.size < 0 else f"{self.op} of {self.size} {self.dtype}"
        if self.root >= 0:
            what += f" from root {self.root}"
        return f"rank {self.rank}: #{self.seq} {what} at {self.site}"


def call_site(skip: int = 2) -> str:
    """Where the collective was asked for: the first frame outside the communicator modules,
    and (after "via") the first outside ``distnet/parallel`` when that is further up."""
    frame: Any = sys._getframe(skip)
    near = far = None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if near is None and path not in _PLUMBING:
            near = frame
        if near is not None and not path.startswith(_HERE + os.sep):
            far = frame
            break
        frame = frame.f_back
    if near is None:
        return "?"
    site = _where(near)
    return site if far is None or far is near else f"{site} via {_where(far)}"


def _where(frame: Any) -> str:
    path = frame.f_code.co_filename
    at = path.rfind(os.sep + "distnet" + os.sep)
    short = path[at + 1 :] if at >= 0 else path
    return f"{short}:{frame.f_lineno} in {frame.f_code.co_name}"


def describe_buffer(buf: Any) -> tuple[str, int]:
    """(dtype name, element count) of an array; ("object", -1) of anything else."""
    dtype = getattr(buf, "dtype", None)
    if dtype is None:
        return "object", -1
    return str(dtype), int(buf.size)


Exchange = Callable[[CallRecord], list[CallRecord]]
"""An allgather of one ``CallRecord`` per rank on a channel no collective's data uses."""
GatherInts = Callable[[np.ndarray], np.ndarray]
"""An allgather of a 1-D int64 array (same length on every rank): shape ``(size, n)``."""


class CollectiveTrace:
    """The collectives of one communicator on this rank.

    ``exchange``: the engine's side-channel allgather (None: nothing to compare with);
    ``check``: compare records (default ``DISTNET_COLLECTIVE_CHECK``); only with ``size > 1``;
    ``gather_ints``: the engine's cheaper allgather of fingerprints on the same channel.
    """

    def __init__(
        self,
        rank: int,
        size: int,
        exchange: Exchange | None = None,
        check: bool | None = None,
        gather_ints: GatherInts | None = None,
    ) -> None:
        self.rank, self.size = rank, size
        self.seq = 0
        self.op = ""
        self.exchange, self.gather_ints = exchange, gather_ints
        self._print = np.zeros(2, dtype=np.int64)
        # called with (seq, op) as each collective starts: the stall check's hook (stall.py)
        self.on_enter: Callable[[int, str], None] | None = None
        # called as each collective starts, after ``on_enter``: returns once every rank has
        # started it (the MPI engine's polled arrival, ``distnet.parallel.mpi.waiting``)
        self.arrive: Callable[[], None] | None = None
        wanted = check_enabled_from_env() if check is None else check
        self.check = bool(wanted) and size > 1 and exchange is not None

    def enter(self, op: str, buf: Any = None, root: int = -1, seq: int | None = None) -> None:
        """Counts the collective ``op`` (over ``buf``, an array or a Python object) and, with
        the check on, compares it with every rank's; raises ``CollectiveMismatch`` on every
        rank when they differ. ``seq``: the engine's own number for it, when it keeps one."""
        self.seq = self.seq + 1 if seq is None else seq
        self.op = op
        if self.on_enter is not None:
            self.on_enter(self.seq, op)
        if self.arrive is not None:
            self.arrive()
        if self.check:
            self._compare(op, buf, root)

    def _compare(self, op: str, buf: Any, root: int) -> None:
        dtype, size = describe_buffer(buf)
        if self.gather_ints is not None:
            # every rank sees the same table, so every rank goes on, or exchanges records
            self._print[0] = self.seq
            self._print[1] = zlib.crc32(f"{op}|{dtype}|{size}|{root}".encode())
            table = self.gather_ints(self._print)
            if (table == self._print).all():
                return
        mine = CallRecord(self.rank, self.seq, op, dtype, size, root, call_site(1))
        records = self.exchange(mine)  # type: ignore[misc]
        if not all(mine.agrees(other) for other in records):
            raise CollectiveMismatch(self.rank, records)

    def last(self) -> tuple[int, str]:
        """(sequence number, operation) of the latest collective entered; (0, "") before any."""
        return self.seq, self.op
