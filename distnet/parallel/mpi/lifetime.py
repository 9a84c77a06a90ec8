"""How the processes of ``distnet launch`` end together: one interrupt, or a dead parent.

The chain is launcher -> mpiexec -> rankexec (one per rank) -> the rank's command. An
interrupt (Ctrl-C, ``kill -INT``) travels down it and every link gives the one below a short
grace (``interrupt_grace_s``) before it kills: a rank blocked in a collective whose peer has
already left never gets back to Python to see its KeyboardInterrupt, and MPI_Finalize then
waits for it forever. A link that dies outright (SIGKILL) cannot pass anything on, so the
processes below it watch for it themselves: mpiexec and each rankexec get a parent-death
signal from the kernel (``die_with_parent``), and rankexec also watches the launcher's pid
(``watch_pid``; on the launcher's host), which covers an mpiexec that outlives its parent.
Checkpoints need no care here: they are written under a temporary name and renamed, so a
rank killed mid-write leaves the last complete one as the latest.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1

try:  # looked up here, not in a preexec_fn: dlopen/dlsym after fork may deadlock on a lock
    _PRCTL = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
except OSError:
    _PRCTL = None

LAUNCHER_PID_ENV = "DISTNET_LAUNCHER_PID"
"""Set by ``distnet launch`` in every rank: the pid of the launcher, on the launcher's host."""


def interrupt_grace_s() -> float:
    """Seconds a process gets to end by itself after an interrupt before it is killed
    (``DISTNET_INTERRUPT_GRACE_S``, default 2). A kill cannot tear a checkpoint (written,
    then renamed), so this only has to cover an orderly exit. ValueError names a bad value."""
    text = os.environ.get("DISTNET_INTERRUPT_GRACE_S", "2")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"DISTNET_INTERRUPT_GRACE_S: expected seconds >= 0, got {text!r}")
    return value


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Asks the kernel (Linux) to send ``sig`` to the calling process when its parent ends.

    Safe in a ``preexec_fn`` (it survives exec). Returns False where it is not available
    (macOS), True otherwise."""
    return _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, int(sig)) == 0


def watch_pid(pid: int, on_exit: Callable[[], None]) -> threading.Thread | None:
    """Calls ``on_exit()`` (on a daemon thread) once process ``pid`` has ended.

    A pidfd refers to one process, never to a later one given the same pid. Returns the
    thread, or None when ``pid`` cannot be watched (not on this host, gone already: then
    ``on_exit`` is called at once if it is gone; no pidfd on this system: nothing)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        on_exit()
        return None
    except (AttributeError, OSError):  # no pidfd (old kernel, macOS)
        return None

    def wait() -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll(1000):  # readable once the process has exited
            pass
        os.close(fd)
        on_exit()

    thread = threading.Thread(target=wait, name=f"watch-{pid}", daemon=True)
    thread.start()
    return thread


def signal_name(signum: int) -> str:
    """'SIGINT' for 2."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def abort_interrupted_rank(status: int = 128 + signal.SIGINT) -> None:
    """Ends the whole MPI job from a rank that was interrupted (its KeyboardInterrupt was
    handled), with ``status``; returns at once outside an MPI job of two or more ranks.

    The rank must not leave through MPI_Finalize: that waits for every peer, and a peer that
    was not interrupted (a signal sent to this rank alone), or that is still in a collective
    or in the communicator's set-up, never comes. MPI_Abort ends them all and mpiexec exits;
    the launcher names this rank and exits with ``status``."""
    abort_failed_rank(status, f"interrupted ({signal_name(status - 128)})")


def abort_failed_rank(status: int, what: str) -> None:
    """Ends the whole MPI job from a rank that handled its own error (said ``what``), with
    ``status``; returns at once outside an MPI job of two or more ranks. As for an
    interrupted rank: a rank whose error was caught mid-run must not enter MPI_Finalize while
    its peers wait for it in a collective (a missing chunk met by one rank hung the job).
    A launched rank that ends before MPI_Init (``distnet train``'s checks refused the job on
    rank 0) tells the launcher that its peers wait for it and will not end by themselves."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized():
        _tell_peers_wait(status, what)
        return
    if mpi.Is_finalized():
        return
    world = mpi.COMM_WORLD
    if world.Get_size() < 2:
        return
    from distnet.parallel.mpi.communicator import record_failure  # noqa: PLC0415

    record_failure(world.Get_rank(), what, status)
    sys.stdout.flush()
    sys.stderr.flush()
    world.Abort(status)


def _tell_peers_wait(status: int, what: str) -> None:
    """Records this rank's end for ``distnet launch`` with ``peers_wait``: its peers wait for
    it in MPI_Init or their first collective, so the launcher stops them at once instead of
    giving them ``failure_grace_s`` to end by themselves. Nothing outside a launched job."""
    size, rank = os.environ.get("PMI_SIZE", ""), os.environ.get("PMI_RANK", "")
    if os.environ.get("DISTNET_LAUNCHED") != "1" or not size.isdigit() or int(size) < 2:
        return
    import time  # noqa: PLC0415

    from distnet.parallel.mpi.rankstatus import report  # noqa: PLC0415

    rank_n = int(rank) if rank.isdigit() else 0
    record = {"rank": rank_n, "status": status, "what": what, "time": time.time(),
              "cause": True, "peers_wait": True}  # fmt: skip
    report(record, f"cause-rank{rank_n}")
