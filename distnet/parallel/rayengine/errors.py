"""How a Ray worker's failure reaches the user: one line naming the rank, the stage and the
error, never Ray's nested traceback with its terminal colour codes.

The worker raises ``RankFailed`` (rank, stage, the error in one line); Ray carries it to the
driver as the ``cause`` of a ``RayTaskError``, whose own text (``ray::WorkerActor.run()``, the
remote traceback, ANSI colours) the driver never shows. A ``CollectiveMismatch`` keeps its
lines (one per rank: which collective each called, where).

When several ranks fail, the driver names the causal one (``causal``): an error that follows
from another rank's (a lost peer or a collective's timeout, a mismatched collective, a
parameter-server round that failed waiting for a peer) ranks below a real one. On the worker,
such an error raised while a real one was being handled (a ``finally`` that enters a
collective) is described by the real one (``describe``). Errors that let the engine run the job
again (``group_may_restart``, a lost parameter-server shard) are not wrapped: the driver must
still recognise them.
"""

from __future__ import annotations

import re
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class RankFailed(RuntimeError):
    """A rank's job failed (not a lost peer): ``rank``, ``stage`` (None: outside any stage)
    and ``error``, the original exception as one line ``Type: message``."""

    def __init__(self, rank: int, stage: str | None, error: str, consequence: bool = False) -> None:
        self.rank, self.stage, self.error = int(rank), stage, error
        self.consequence = bool(consequence)  # the error follows from another rank's
        where = f" in stage {stage}" if stage else ""
        super().__init__(f"rank {self.rank} failed{where}: {error}")

    def __reduce__(self) -> tuple[Any, ...]:  # Ray pickles it to the driver
        return (type(self), (self.rank, self.stage, self.error, self.consequence))


def one_line(error: BaseException) -> str:
    """``error`` as ``Type: first line of its message``, colour codes removed. A Ray error
    that carries the remote exception (``cause``) is described by that exception; one that
    does not (its text is ``ray::...`` then a traceback) by the traceback's last line."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return one_line(cause)
    lines = [s.strip() for s in _ANSI.sub("", str(error)).splitlines() if s.strip()]
    if lines and lines[0].startswith("ray::"):
        return lines[-1]
    name = type(error).__name__
    return f"{name}: {lines[0]}" if lines else name


def _consequences() -> tuple[type[BaseException], ...]:
    from distnet.parallel.consistency import CollectiveMismatch  # noqa: PLC0415
    from distnet.parallel.ps.rounds import RoundFailed  # noqa: PLC0415
    from distnet.parallel.rayengine.mailbox import WorkerLostError  # noqa: PLC0415

    return (CollectiveMismatch, RoundFailed, WorkerLostError)


def is_consequence(error: BaseException) -> bool:
    """Whether ``error`` (or the remote error a Ray error carries) follows from another
    rank's failure: a lost or silent peer, a mismatched collective, a failed ssp wait."""
    if isinstance(error, RankFailed):
        return error.consequence
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return is_consequence(cause)
    return isinstance(error, _consequences())


def root_cause(error: BaseException) -> BaseException:
    """``error``, or when it is a consequence (``is_consequence``) raised while handling a
    real error (its ``__context__`` chain), that real error."""
    seen, e = 0, error
    while is_consequence(e) and seen < 8:
        nxt = e.__cause__ or e.__context__
        if nxt is None:
            return error
        e, seen = nxt, seen + 1
    return error if is_consequence(e) else e


def describe(error: BaseException) -> str:
    """``error``'s root cause as ``one_line``, except a ``CollectiveMismatch``, which keeps
    its per-rank lines."""
    from distnet.parallel.consistency import CollectiveMismatch  # noqa: PLC0415

    root = root_cause(error)
    if isinstance(root, CollectiveMismatch):
        return f"{type(root).__name__}: {_ANSI.sub('', str(root)).rstrip()}"
    return one_line(root)


def causal(failures: list[tuple[int, BaseException]]) -> tuple[int, BaseException]:
    """Of (rank, error) pairs in the order they ended, the one to report: the first that is
    not a consequence of another rank's failure, else the first."""
    return next((f for f in failures if not is_consequence(f[1])), failures[0])


def may_restart(error: BaseException | None) -> bool:
    """Whether ``error`` (or one it was raised from) says that running the job again can go
    on (``group_may_restart``, as a lost parameter-server shard's error does)."""
    seen = 0
    while error is not None and seen < 8:
        if getattr(error, "group_may_restart", False):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def rank_failure(rank: int, error: BaseException) -> str:
    """The line that ends a job whose rank ``rank`` failed with ``error`` (a ``RayTaskError``
    in the driver): the worker's own ``RankFailed`` text, else the rank and ``one_line``."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, RankFailed):
        return str(cause)
    return f"rank {rank} failed: {one_line(error)}"
