"""Runs one rank's command under ``distnet launch`` and says how that rank ended.

With ``DISTNET_TAGGED_OUTPUT=1`` it also prefixes every line the rank writes with ``[r] ``.

mpiexec (hydra) reports a dead process by PID only ("BAD TERMINATION ... PID 3062"); this
small parent of each rank knows the rank, so a rank killed by a signal or exiting with an
error is named: ``[rank 1] killed by signal 9 (SIGKILL)``. It also writes a one-line status
file for the launcher, which then exits with the status of the rank that failed first.

It is also the link that makes every rank end with the job (``distnet.parallel.mpi.lifetime``):
an interrupt is passed to the rank, which is killed if it has not ended within the grace; a
dead mpiexec or launcher takes the rank with it. And it sets the variables that torchrun sets
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``), from the MPI launcher's.

Usage (by the launcher): ``python -m distnet.parallel.mpi.rankexec -- COMMAND...``
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from distnet.parallel.mpi import launchclean, lifetime
from distnet.parallel.mpi.rankstatus import report

RANK_ENV = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
SIZE_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS")
LOCAL_RANK_ENV = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")
LOCAL_SIZE_ENV = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def rank_from_env() -> int:
    """This process's rank as the MPI launcher announced it (0 when none did)."""
    for name in RANK_ENV:
        if name in os.environ:
            return int(os.environ[name])
    return 0


def _first(env: dict[str, str], names: tuple[str, ...]) -> str | None:
    return next((env[n] for n in names if n in env), None)


def conventional_env(env: dict[str, str]) -> dict[str, str]:
    """``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (torchrun's names) from
    what the MPI launcher set in ``env``; {} when it set no rank. MPICH's single-host
    process manager (mpiexec.gforker, what ``distnet launch`` uses on one machine) sets no
    local variables: there, local means the whole job."""
    rank, size = _first(env, RANK_ENV), _first(env, SIZE_ENV)
    if rank is None or size is None:
        return {}
    local_rank, local_size = _first(env, LOCAL_RANK_ENV), _first(env, LOCAL_SIZE_ENV)
    if local_rank is None and local_size is None:
        local_rank, local_size = rank, size
    out = {"RANK": rank, "WORLD_SIZE": size}
    out.update({"LOCAL_RANK": local_rank} if local_rank is not None else {})
    out.update({"LOCAL_WORLD_SIZE": local_size} if local_size is not None else {})
    return out


def _die_with_parent() -> None:
    # If this wrapper is killed outright, the rank must not live on stuck in a collective.
    lifetime.die_with_parent(signal.SIGKILL)


class RankStopper:
    """Passes a signal to the rank and kills it if it has not ended ``grace_s`` later (at
    once on a second signal): a rank blocked in a collective whose peers have left never
    sees its KeyboardInterrupt."""

    def __init__(self, child: subprocess.Popen, grace_s: float) -> None:
        self.child, self.grace_s = child, grace_s
        self.signum: int | None = None
        self.killed = False
        self._lock = threading.Lock()

    def stop(self, signum: int, _frame: object = None) -> None:
        """Signal handler (also called by the launcher's watch): forward, then escalate."""
        with self._lock:
            first = self.signum is None
            self.signum = signum if first else self.signum
        if not first:
            self._kill()
            return
        # what the rank holds in /dev/shm, noted before it can go (the launcher removes it)
        launchclean.report_held(self.child.pid, os.environ.get("DISTNET_LAUNCH_STATUS_DIR"))
        try:
            self.child.send_signal(signum)
        except OSError:
            pass
        timer = threading.Timer(self.grace_s, self._kill)
        timer.daemon = True
        timer.start()

    def _kill(self) -> None:
        if self.child.poll() is None:
            self.killed = True
            try:
                self.child.kill()
            except OSError:
                pass


def _tie_to_launcher(stopper: RankStopper) -> None:
    """Under ``distnet launch``: end the rank when mpiexec (this process's parent) or, on the
    launcher's own host, the launcher itself ends without passing anything on (SIGKILL)."""
    pid = os.environ.get(lifetime.LAUNCHER_PID_ENV)
    if not pid:
        return
    lifetime.die_with_parent(signal.SIGTERM)  # our handler forwards it to the rank
    if os.getppid() == 1:  # the parent was gone before the line above took effect
        stopper.stop(signal.SIGTERM)
    status_dir = os.environ.get("DISTNET_LAUNCH_STATUS_DIR")
    if status_dir and os.path.isdir(status_dir):  # the launcher's private dir: same host
        lifetime.watch_pid(int(pid), lambda: stopper.stop(signal.SIGTERM))


def bind_to_cores(local_rank: int, per_rank: str | None) -> list[int] | None:
    """Binds this process (and so the rank it starts) to cores ``[r*T, (r+1)*T)`` of the ones
    it may use, T = ``per_rank`` (``DISTNET_BIND_CORES``, set by ``distnet launch`` when every
    rank is on this machine and they fit): each rank keeps its own cores and caches, and the OS
    does not put two ranks on one core. Returns the cores, or None when not bound."""
    if not per_rank or not hasattr(os, "sched_setaffinity"):
        return None
    t = int(per_rank)
    cores = sorted(os.sched_getaffinity(0))[local_rank * t : (local_rank + 1) * t]
    if len(cores) != t:  # more ranks than cores after all: leave it to the OS
        return None
    os.sched_setaffinity(0, cores)
    return cores


def describe(returncode: int) -> str:
    """'exited with status 3' or 'killed by signal 9 (SIGKILL)' for a Popen returncode."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-returncode} ({name})"
    return f"exited with status {returncode}"


def _say(rank: int, msg: str) -> None:
    # One write per line: with PYTHONUNBUFFERED, print() writes the text and "\n" apart, and
    # lines of different ranks would interleave mid-line.
    sys.stderr.write(
        f"[{rank}] {msg}\n"
        if os.environ.get("DISTNET_TAGGED_OUTPUT") == "1"
        else f"[rank {rank}] {msg}\n"
    )
    sys.stderr.flush()


def _relay(src: Any, dst: Any, prefix: bytes) -> None:
    """Copies ``src`` to ``dst`` line by line, each line prefixed with the rank.

    Done here rather than by mpiexec's -prepend-rank, which tags every chunk it reads: an
    unbuffered ``print("a", 1)`` arrives as four chunks and came out as four tagged pieces.
    """
    for line in iter(src.readline, b""):
        dst.write(prefix + (line if line.endswith(b"\n") else line + b"\n"))
        dst.flush()


def main(argv: list[str] | None = None) -> int:
    """Runs the command, forwards SIGINT/SIGTERM to it, reports a failure; returns its status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -m distnet.parallel.mpi.rankexec -- COMMAND...", file=sys.stderr)
        return 2
    rank = rank_from_env()
    bind_to_cores(rank, os.environ.get("DISTNET_BIND_CORES"))
    # hydra hands each rank its PMI connection as an inherited descriptor: keep it open.
    fds = tuple(int(os.environ[k]) for k in ("PMI_FD",) if k in os.environ)
    tag = os.environ.get("DISTNET_TAGGED_OUTPUT") == "1"
    pipe = subprocess.PIPE if tag else None
    env = {**os.environ, **conventional_env(dict(os.environ))}
    try:
        child = subprocess.Popen(
            argv, pass_fds=fds, preexec_fn=_die_with_parent, stdout=pipe, stderr=pipe, env=env
        )
    except OSError as err:
        _say(rank, f"cannot start {argv[0]!r}: {err.strerror}")
        return 127
    relays = []
    if tag:
        prefix = f"[{rank}] ".encode()
        for src, dst in ((child.stdout, sys.stdout.buffer), (child.stderr, sys.stderr.buffer)):
            relay = threading.Thread(target=_relay, args=(src, dst, prefix), daemon=True)
            relay.start()
            relays.append(relay)

    # what the rank holds in /dev/shm (MPICH's segment), for the launcher to remove after it
    launchclean.follow(child.pid, os.environ.get("DISTNET_LAUNCH_STATUS_DIR"),
                       lambda: child.poll() is None)  # fmt: skip
    stopper = RankStopper(child, lifetime.interrupt_grace_s())
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, stopper.stop) for sig in sigs}
    try:
        _tie_to_launcher(stopper)
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for relay in relays:
        relay.join(timeout=5)
    status = 128 - returncode if returncode < 0 else returncode
    what = describe(returncode) if returncode != 0 else None
    if stopper.killed and stopper.signum is not None:
        # an interrupted rank ends with the interrupt's status, however it had to be ended
        status = 128 + stopper.signum
        name = lifetime.signal_name(stopper.signum)
        what = f"interrupted ({name}); killed after {stopper.grace_s:g} s"
    if what is not None:
        _say(rank, what)
        # A file in the launcher's status dir, or a marked stderr line on another host.
        report({"rank": rank, "status": status, "what": what, "time": time.time()}, f"rank{rank}")
    return status


if __name__ == "__main__":
    sys.exit(main())
