"""One run of mpiexec for ``distnet launch``: start it, watch it, end it, say how it ended.

Every way a job can end ends every rank:

- a rank fails: the others get ``failure_grace_s()`` to end by themselves, then the whole
  process group goes (mpiexec does not always do it);
- the launcher is interrupted (SIGINT from a terminal's Ctrl-C, SIGTERM from a scheduler):
  the signal goes to mpiexec, which passes it to every rankexec, which passes it to its rank
  and kills it after ``lifetime.interrupt_grace_s()``; a second signal, or mpiexec still
  still there half a second after that grace, kills the whole process group. The launcher exits with
  128 + the signal (130 for SIGINT), as torchrun and horovodrun do;
- the launcher is killed outright (SIGKILL): the kernel sends mpiexec SIGTERM (its
  parent-death signal) and every rankexec on this host sees the launcher's pid end
  (``lifetime.watch_pid``), so no rank lives on without a parent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distnet.parallel.mpi import launchclean, lifetime
from distnet.parallel.mpi.rankstatus import parse_line as parse_status_line

INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)
"""The statuses of a rank that was interrupted rather than failed."""


def _first_failure(status_dir: str, records: list[dict] | None = None) -> dict | None:
    records = list(records or [])
    for path in Path(status_dir).glob("*rank*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not records:
        return None
    # The earliest record names the rank: what came after it (peers killed by mpiexec after an
    # MPI_Abort, a rank interrupted while its job was being stopped) is a consequence. That
    # rank's own account of why it stopped (a cause) beats its wrapper's bare exit status.
    first = min(records, key=lambda r: r["time"])
    causes = [r for r in records if r.get("cause") and r.get("rank") == first.get("rank")]
    return min(causes, key=lambda r: r["time"]) if causes else first


INIT_FAILURE = re.compile(
    r"Fatal error in \w*Init(?:_thread)?\b"  # MPICH: "Fatal error in internal_Init_thread"
    r"|MPI_INIT has failed|An error occurred in MPI_Init"  # Open MPI
)
"""A line a rank prints when MPI_Init itself failed: the job never began."""


def _relay_stderr(src: Any, records: list[dict], seen: set[str]) -> None:
    """Copies mpiexec's stderr to ours, keeping back (into ``records``) the status lines and
    noting in ``seen`` ("init") a rank's report that MPI_Init failed."""
    out = sys.stderr.buffer
    for raw in iter(src.readline, b""):
        line = raw.decode("utf-8", "replace")
        record = parse_status_line(line)
        if record is not None:
            records.append(record)
            continue
        if INIT_FAILURE.search(line):
            seen.add("init")
        out.write(raw)
        out.flush()


def failure_grace_s() -> float:
    """Seconds the other ranks get to end by themselves after one failed
    (``DISTNET_FAILURE_GRACE_S``, default 3). A rank that fails in Python ends the job with
    MPI_Abort, which mpiexec passes on at once; what the grace covers is a rank gone without
    it (SIGKILL, the OOM killer), whose peers wait for it in a collective and never end by
    themselves: torchrun, too, stops every worker as soon as one has failed. Was 10 s."""
    return float(os.environ.get("DISTNET_FAILURE_GRACE_S", "3"))


def end_group(proc: subprocess.Popen, waits: tuple[float, float] = (5.0, 10.0)) -> int:
    """Ends mpiexec's process group: SIGTERM, then SIGKILL ``waits[0]`` s later; returns
    mpiexec's status."""
    for sig, wait_s in ((signal.SIGTERM, waits[0]), (signal.SIGKILL, waits[1])):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait(timeout=10)


def wait_or_end_after_failure(
    proc: subprocess.Popen,
    first_failure: Callable[[], Any],
    poll_s: float = 0.2,
    interrupted_at: Callable[[], float | None] = lambda: None,
    tick: Callable[[], None] = lambda: None,
) -> int:
    """Waits for mpiexec; once a rank has reported a failure, gives the rest
    ``failure_grace_s()`` to end, then terminates the whole process group (SIGTERM, then
    SIGKILL 5 s later). mpiexec does not always do it: a rank killed before MPI_Init left its
    peers waiting in MPI_Init forever (seen with MPICH 4 hydra), and mpiexec.gforker stays
    after a rank's MPI_Abort. An interrupt (``interrupted_at()``: when, or None), or a rank
    that reports one, gets ``lifetime.interrupt_grace_s()`` + 0.5 s instead; a rank that ended
    before MPI_Init (``peers_wait``) 0.5 s: its peers wait for it there. ``tick()`` is
    called at every poll. Returns mpiexec's status."""
    failed_at: float | None = None
    grace = failure_grace_s()
    while True:
        try:
            return proc.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            pass
        tick()
        now = time.monotonic()
        interrupt = interrupted_at()
        if interrupt is not None and now - interrupt > lifetime.interrupt_grace_s() + 0.5:
            return end_group(proc, (0.5, 10.0))
        if failed_at is None:
            failure = first_failure()
            if failure is not None:
                failed_at = now
                if failure.get("status") in INTERRUPTED:
                    grace = lifetime.interrupt_grace_s() + 0.5
                if failure.get("peers_wait"):  # it ended before MPI_Init: they never will
                    grace = 0.5
        elif now - failed_at > grace:
            return end_group(proc)


class _Interrupt:
    """The launcher's SIGINT/SIGTERM handler: the first signal goes to mpiexec (which passes
    it to every rank), a second one kills the process group at once."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None  # set once started: a signal before that
        self.signum: int | None = None  # is passed on then
        self.at: float | None = None

    def started(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        if self.signum is not None:
            self._send(self.signum)

    def __call__(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
            self._send(signum)
        elif self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def _send(self, signum: int) -> None:
        try:
            if self.proc is not None:
                self.proc.send_signal(signum)
        except OSError:
            pass


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    # its own process group, so that the watchdog can end every process it started; and a
    # parent-death signal, so that a launcher killed outright does not leave mpiexec behind
    return subprocess.Popen(
        cmd, env=env, start_new_session=True, stderr=subprocess.PIPE,
        preexec_fn=lambda: lifetime.die_with_parent(signal.SIGTERM),
    )  # fmt: skip


class _Scans:
    """Calls ``watch.scan()`` often while a job starts (MPI_Init makes the segments), then
    every ``SCAN_EVERY_S``: a /proc walk costs a few milliseconds."""

    def __init__(self, watch: launchclean.ShmWatch) -> None:
        self.watch, self.start, self.last = watch, time.monotonic(), 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.start < 10 or now - self.last >= SCAN_EVERY_S:
            self.watch.scan()
            self.last = now


SCAN_EVERY_S = 2.0


def run_once(cmd: list[str], env: dict[str, str]) -> tuple[int, bool]:
    """Runs the job once. Returns (the first failing rank's status, 128 + the signal when the
    launcher was interrupted, or 0; whether a rank reported that MPI_Init failed). However
    it ends, the launch directory and the MPI shared-memory files of the job's processes on
    this host are removed (``distnet.parallel.mpi.launchclean``)."""
    with tempfile.TemporaryDirectory(prefix="distnet-launch-") as status_dir:
        # ranks on other hosts cannot reach status_dir: they report on stderr (rankstatus)
        child_env = {**os.environ, **env, "DISTNET_LAUNCH_STATUS_DIR": status_dir,
                     lifetime.LAUNCHER_PID_ENV: str(os.getpid())}  # fmt: skip
        interrupt = _Interrupt()
        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
        remote_records: list[dict] = []
        seen: set[str] = set()
        janitor = launchclean.start_janitor(status_dir)
        watch: launchclean.ShmWatch | None = None
        try:
            proc = _start(cmd, child_env)
            interrupt.started(proc)
            watch = launchclean.ShmWatch(proc.pid, status_dir)
            relay = threading.Thread(
                target=_relay_stderr, args=(proc.stderr, remote_records, seen), daemon=True
            )
            relay.start()
            rc = wait_or_end_after_failure(
                proc, lambda: _first_failure(status_dir, remote_records),
                interrupted_at=lambda: interrupt.at, tick=_Scans(watch),
            )  # fmt: skip
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if watch is not None:
                watch.remove()  # the job has ended: no process of it holds them any more
        relay.join(timeout=10)
        failure = _first_failure(status_dir, remote_records)
    if janitor is not None:  # the directory is gone: the janitor has nothing to do
        os.write(janitor[1], launchclean.CLEANED)
        os.close(janitor[1])
        try:
            janitor[0].wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    if interrupt.signum is not None:
        name = lifetime.signal_name(interrupt.signum)
        print(f"distnet launch: interrupted ({name}); every rank was stopped", file=sys.stderr)
        return 128 + interrupt.signum, False
    init_failed = "init" in seen
    if failure is not None:
        print(
            f"distnet launch: rank {failure['rank']} failed first: {failure['what']}; "
            f"the job was stopped (exit status {failure['status']})",
            file=sys.stderr,
        )
        return int(failure["status"]) or 1, init_failed
    if rc != 0:
        print(f"distnet launch: mpiexec exited with status {rc}", file=sys.stderr)
        return (rc if rc > 0 else 128 - rc), init_failed
    return 0, False
