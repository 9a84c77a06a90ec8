"""Stall check: which ranks have not joined a collective the others are waiting in.

Horovod's model: a coordinator knows which ranks have submitted which tensor, and warns when
some have and others have not for longer than a limit. Here each rank notes "I am entering
collective number k", and its watcher thread tells rank 0 the latest k with one tiny
non-blocking send every ``poll_s`` when it changed (nothing waits on it, and the training
thread makes no MPI call for it); a thread on rank 0 keeps the latest k of every rank and,
when some rank stays behind the front for ``warn_after_s``, prints the ranks that have not
joined. With ``abort_after_s`` it also ends the job, rather than letting it hang.

The check lives in the communicator, not in an optimiser wrapper: ``watch_stalls(comm)``
(which ``MPICommunicator`` calls when it is made) hooks the detector into the communicator's
``CollectiveTrace``, so every collective of every strategy counts (DistributedOptimizer,
ZeRO-1, the shared-memory road, user code). The Ray engine's driver watches its workers the
same way (``distnet.parallel.rayengine.stallwatch``) and writes the same report.

A stall report also says where every rank is: rank 0 asks each rank, whose own watcher
thread answers with its communicator's last collective (sequence number, operation; see
``distnet.parallel.consistency``), its last parameter-server round (``note_round``) and the
Python stack of its training thread (the thread that made the detector), so a rank sleeping
or stuck outside the collectives shows the frame it is in. Rank 0 logs it and, when a run
directory was named (``set_report_dir``), writes it to ``stall.json`` there for report.html.
A rank that does not answer within ``ASK_S`` is said to.

Long legitimate work outside the collectives (rank 0 writing a checkpoint or the report,
starting the parameter server's shards) is declared with ``working(what)``: while the ranks
the others wait for are all in declared work, the wait is not a stall (the other ranks then
wait in the next collective by design). A stall is some rank waiting in a collective that
another rank has not entered, and that other rank not in declared work, for the limit: a rank
stuck anywhere else (a blocked read, a deadlock, an endless loop) is still reported, and a
report names the declared work of every rank that is in some.

Messages go over a private duplicate of the communicator, so they never match user traffic.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_WARN_S = 60.0
_TAG = 77
_NAMES_KEPT = 256
_CLOSED = -1  # the "step" a rank sends when it stops checking
_ASK, _WHERE = 78, 79  # rank 0's "where are you?" and the answers
ASK_S = 5.0
"""The longest rank 0 waits for the answers of a stall report."""
_STACK_FRAMES = 12
_REPORT_DIR: list[Path] = []
_ROUND: list[Any] = [0, ""]  # this process's last parameter-server round (clock, op)
_WORK: list[tuple[str, float]] = []  # this process's declared work: (what, monotonic start)


def set_report_dir(run_dir: str | os.PathLike | None) -> None:
    """Stall reports of this process go to ``run_dir/stall.json`` too (None: log only)."""
    _REPORT_DIR[:] = [] if run_dir is None else [Path(run_dir)]


def note_round(op: str, clock: int) -> None:
    """Records this worker's latest parameter-server round (a stall report shows it, and a
    worker whose rounds go on is not stalled)."""
    _ROUND[:] = [int(clock), op]


def last_round() -> str:
    """``#clock op`` of this process's last parameter-server round; "" before any."""
    clock, op = _ROUND
    return f"#{clock} {op}" if clock else ""


@contextlib.contextmanager
def working(what: str) -> Iterator[None]:
    """Declares long legitimate work of this rank outside the collectives (``what``: "writing a
    checkpoint"): while every rank the others wait for is in such work, the stall check does
    not count the wait (see the module docstring). Nests; any thread of the process."""
    _WORK.append((what, time.monotonic()))
    try:
        yield
    finally:
        _WORK.pop()


def current_work() -> str:
    """``what (N s)`` of this process's innermost declared work; "" when there is none."""
    if not _WORK:
        return ""
    what, since = _WORK[-1]
    return f"{what} ({time.monotonic() - since:.0f} s)"


def where(comm: Any, thread_id: int | None) -> dict[str, Any]:
    """This rank's place: {rank, seq, op (its last collective), round (its last
    parameter-server round, "" before any), work (its declared work, "" when none), stack
    (text of the thread ``thread_id``'s innermost frames; the main thread's when None)}."""
    seq, op = comm.trace.last()
    ident = thread_id if thread_id is not None else threading.main_thread().ident
    frame = sys._current_frames().get(ident)  # type: ignore[arg-type]
    stack = "".join(traceback.format_stack(frame, limit=_STACK_FRAMES)) if frame else "(gone)"
    return {"rank": comm.rank, "seq": seq, "op": op, "round": last_round(),
            "work": current_work(), "stack": stack.rstrip()}  # fmt: skip


def _seconds_from_env(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected seconds (0 turns it off)") from None
    return value if value > 0 else None


def stall_limit_from_env(default: float | None = DEFAULT_WARN_S) -> float | None:
    """``DISTNET_STALL_CHECK_S`` (seconds; 0 turns the check off), else ``default``."""
    return _seconds_from_env("DISTNET_STALL_CHECK_S", default)


def stall_abort_from_env(default: float | None = None) -> float | None:
    """``DISTNET_STALL_ABORT_S``: end a job stalled this long (seconds; unset or 0: never)."""
    return _seconds_from_env("DISTNET_STALL_ABORT_S", default)


def describe_places(message: str, ranks: list[dict[str, Any]]) -> str:
    """The text of a stall report: ``message``, then per rank its last collective, its last
    parameter-server round (if any) and its stack, indented."""
    lines = [message]
    for place in ranks:
        seq = place["seq"]
        last = "unknown" if seq is None else f"#{seq} {place['op']}" if seq else "none yet"
        round_ = f"; last ps round {place['round']}" if place.get("round") else ""
        work = f"; working: {place['work']}" if place.get("work") else ""
        lines.append(f"stall: rank {place['rank']}: last collective {last}{round_}{work}; stack:")
        lines += [f"  {line}" for line in place["stack"].splitlines()]
    return "\n".join(lines)


def save_report(message: str, waited: float, laggards: list[int], ranks: list[dict]) -> None:
    """Appends a stall report to ``stall.json`` in the run directory, when one was named."""
    record = {"time": time.time(), "message": message, "waited_s": round(waited, 1),
              "laggards": laggards, "ranks": ranks}  # fmt: skip
    for run_dir in _REPORT_DIR:
        _append_report(run_dir / "stall.json", record)


def watch_stalls(
    comm: Any, warn_after_s: float | None = -1.0, abort_after_s: float | None = -1.0
) -> StallDetector | None:
    """The stall check of ``comm`` (an ``MPICommunicator``): made once, hooked into its
    collective trace, so every collective counts; later calls change its limits. -1: the
    environment's (``DISTNET_STALL_CHECK_S``, default 60 s; ``DISTNET_STALL_ABORT_S``).
    Collective when it makes the detector. None when the check is off or ``comm`` has one rank."""
    warn = stall_limit_from_env() if warn_after_s == -1.0 else warn_after_s
    abort = stall_abort_from_env() if abort_after_s == -1.0 else abort_after_s
    detector = getattr(comm, "stall", None)
    if detector is not None:
        if warn is None:
            warn = float("inf")  # off from now on; the thread stays (closing is collective)
        detector.warn_after_s, detector.abort_after_s = float(warn), abort
        return detector
    if comm.size == 1 or warn is None:
        return None
    detector = StallDetector(comm, warn, abort, poll_s=0.1)
    comm.stall = detector
    comm.trace.on_enter = detector.entered
    return detector


class StallDetector:
    """Call ``enter(name)`` on every rank right before each synchronising collective (or let
    ``watch_stalls`` hook it into the communicator).

    ``comm`` is an ``MPICommunicator``; with size 1 the detector does nothing.
    """

    def __init__(
        self,
        comm: Any,
        warn_after_s: float = DEFAULT_WARN_S,
        abort_after_s: float | None = None,
        poll_s: float = 0.05,
    ) -> None:
        self.comm = comm
        self.warn_after_s = float(warn_after_s)
        self.abort_after_s = abort_after_s
        self.poll_s = poll_s
        self.step = 0
        self.reports: list[str] = []  # what rank 0 printed (tests read it)
        self._thread_id = threading.get_ident()  # the training thread: whose stack to show
        # The watcher thread calls MPI beside the main thread: that needs THREAD_MULTIPLE.
        mpi = getattr(comm, "MPI", None)
        threaded = mpi is not None and mpi.Query_thread() >= mpi.THREAD_MULTIPLE
        if comm.size > 1 and not threaded and comm.rank == 0:
            comm.log("stall check off: this MPI does not provide MPI_THREAD_MULTIPLE")
        self._active = comm.size > 1 and threaded
        self._sends: list[tuple[Any, np.ndarray]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        if not self._active:
            return
        self._mpi = comm.MPI
        self._comm = comm.comm.Dup()
        atexit.register(self.close)  # before MPI_Finalize (atexit runs last-registered first)
        if comm.rank == 0:
            self._latest = np.zeros(comm.size, dtype=np.int64)
            self._busy = np.zeros(comm.size, dtype=bool)  # in declared work (``working``)
            self._names: dict[int, str] = {}
        # every rank watches: rank 0 for stalls, the others for rank 0's questions
        target = self._watch if comm.rank == 0 else self._answer
        self._thread = threading.Thread(target=target, name="distnet-stall", daemon=True)
        self._thread.start()

    def enter(self, name: str = "allreduce") -> None:
        """Records that this rank is about to enter its next collective (``name`` for messages)."""
        if self._active:
            self._mark(self.step + 1, name)

    def entered(self, seq: int, op: str) -> None:
        """The communicator's hook: this rank enters its collective number ``seq``, ``op``."""
        if self._active:
            self._mark(seq, f"collective #{seq} {op}")

    def _mark(self, step: int, name: str) -> None:
        # The training thread only notes the number: the watcher thread sends it (below), so a
        # collective pays no MPI call for the check (one per collective cost a small
        # allreduce 2x on a loaded machine)
        self.step = step
        if self.comm.rank == 0:
            self._names[step] = name
            # only recent steps can be reported (the front of a stall): keep the map bounded,
            # or a long run grows it by one entry per step
            self._names.pop(step - _NAMES_KEPT, None)
            self._latest[0] = step

    # --- the other ranks ----------------------------------------------------------------
    def _send_step(self, step: int, busy: bool = False) -> None:
        # Completed sends are dropped; the message array must live until its send is done.
        self._sends = [(r, m) for r, m in self._sends if not r.Test()]
        msg = np.array([step, int(busy)], dtype=np.int64)
        self._sends.append((self._comm.Isend(msg, dest=0, tag=_TAG), msg))

    def _answer(self) -> None:
        sent: tuple[int, bool] = (0, False)
        while not self._stop.wait(self.poll_s):
            now = (self.step, bool(_WORK))  # what rank 0 sees lags by at most poll_s
            if now != sent:
                self._send_step(*now)
                sent = now
            if self._comm.Iprobe(source=0, tag=_ASK):
                self._comm.recv(source=0, tag=_ASK)
                self._comm.send(where(self.comm, self._thread_id), dest=0, tag=_WHERE)

    # --- rank 0 -------------------------------------------------------------------------
    def _ask_everyone(self) -> list[dict[str, Any]]:
        """Every rank's ``where`` (rank 0's own at once), waiting at most ``ASK_S``."""
        asks = [self._comm.isend(None, dest=r, tag=_ASK) for r in range(1, self.comm.size)]
        answers = {0: where(self.comm, self._thread_id)}
        wait_s = min(ASK_S, max(self.warn_after_s, 1.0))
        deadline = time.monotonic() + wait_s
        while len(answers) < self.comm.size and time.monotonic() < deadline:
            self._drain()  # the steps still arrive meanwhile
            status = self._mpi.Status()
            if self._comm.Iprobe(source=self._mpi.ANY_SOURCE, tag=_WHERE, status=status):
                answer = self._comm.recv(source=status.Get_source(), tag=_WHERE)
                answers[int(answer["rank"])] = answer
            else:
                time.sleep(0.01)
        self._asks = asks  # small eager sends: done, or matched by a late answerer
        return [answers.get(r, {"rank": r, "seq": None, "op": None,
                                "stack": f"(no answer within {wait_s:.0f} s)"})
                for r in range(self.comm.size)]  # fmt: skip

    def _drain(self) -> None:
        status = self._mpi.Status()
        buf = np.zeros(2, dtype=np.int64)
        while self._comm.Iprobe(source=self._mpi.ANY_SOURCE, tag=_TAG, status=status):
            src = status.Get_source()
            self._comm.Recv(buf, source=src, tag=_TAG)
            self._latest[src] = buf[0] if buf[0] != _CLOSED else np.iinfo(np.int64).max
            self._busy[src] = bool(buf[1])

    def _watch(self) -> None:
        # A stall is the slowest rank not moving while others are ahead of it: in a healthy
        # job someone is often one collective behind at the moment we look, but never for long.
        closed = np.iinfo(np.int64).max
        slowest, since, warned = -1, time.monotonic(), False
        while not self._stop.wait(self.poll_s):
            self._drain()
            live = self._latest[self._latest != closed]
            if live.size == 0:
                continue
            now = time.monotonic()
            if int(live.min()) != slowest:
                slowest, since, warned = int(live.min()), now, False
            front = int(live.max())
            if front == slowest:
                since = now
                continue
            laggards = [r for r in range(self.comm.size) if self._latest[r] < front]
            self._busy[0] = bool(_WORK)
            if all(self._busy[r] for r in laggards):
                # the ranks waited for are in declared work (a checkpoint, the report): the
                # others wait by design; the clock starts when that work ends
                since, warned = now, False
                continue
            waited = now - since
            if waited >= self.warn_after_s and not warned:
                warned = True
                self._report(front, laggards, waited)
            if self.abort_after_s is not None and waited >= self.abort_after_s:
                self._abort(front, laggards, waited, warned)

    def _message(self, front: int, laggards: list[int], waited: float) -> str:
        waiting = [r for r in range(self.comm.size) if r not in laggards]
        name = self._names.get(front, f"collective #{front}")
        return (
            f"stall: ranks {laggards} have not joined {name} for {waited:.0f} s; "
            f"ranks {waiting} are waiting in it"
        )

    def _report(self, front: int, laggards: list[int], waited: float) -> None:
        msg = self._message(front, laggards, waited)
        ranks = self._ask_everyone()
        self.reports.append(msg)
        self.comm.log(describe_places(msg, ranks))
        save_report(msg, waited, laggards, ranks)

    def _abort(self, front: int, laggards: list[int], waited: float, reported: bool) -> None:
        if not reported:  # an abort limit below the warning's: say where the ranks were first
            self._report(front, laggards, waited)
        name = self._names.get(front, f"collective #{front}")
        what = (
            f"stall: ranks {laggards} did not join {name} within {waited:.0f} s "
            f"(the stall abort limit, DISTNET_STALL_ABORT_S); ending the job"
        )
        from distnet.parallel.mpi.communicator import record_failure  # noqa: PLC0415  (it imports us)

        record_failure(self.comm.rank, what)
        self.comm.log(what)
        self.comm.abort(1)

    def close(self) -> None:
        """Stops the check on this rank (rank 0 stops counting it as behind)."""
        if not self._active:
            return
        self._active = False
        if self._thread is not None:
            self._stop.set()
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=5)
        if self.comm.rank != 0:  # after the thread: no step of it may follow this
            self._send_step(_CLOSED)


def _append_report(path: Path, record: dict[str, Any]) -> None:
    """Adds ``record`` to the list in ``path`` (written atomically); never raises, since a
    report that cannot be written must not end the job it describes."""
    try:
        reports = json.loads(path.read_text()) if path.is_file() else []
        reports.append(record)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(reports, indent=1))
        os.replace(tmp, path)
    except (OSError, ValueError) as err:
        print(f"distnet: stall report not written to {path}: {err}", file=sys.stderr)
