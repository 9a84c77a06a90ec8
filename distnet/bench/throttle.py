"""A process made k times slower, as if it ran on a slower machine (benchmarks, tests).

``DutyCycleThrottle`` stops and continues processes on a duty cycle from a thread of the
calling process: in every period (50 ms) a process slowed by k runs for ``period / k`` and
is stopped (SIGSTOP) for the rest, then continued (SIGCONT). Everything it does (compute,
memory traffic, its answers to peers) takes about k times the wall time, as on a machine
with 1/k of the CPU. A factor can change while the throttle runs (a worker that slows down
mid-run). On a loaded machine the slow-down is less than k: a continued process gets the
CPU ahead of those that ran meanwhile (a 3x duty cycle measured 1.5-2.7x on a busy loop at
load 9 on 2 cores); benchmarks report the rates they measured, not k. A cgroup's
``cpu.max`` (v1: ``cpu.cfs_quota_us``) limits CPU time in the kernel instead, but needs a
writable cgroup hierarchy (root, or a delegated one) and caps CPU per period, not relative
to what the process would otherwise get; ``cgroup_cpu_writable`` says whether one is
writable, and the duty cycle, which needs neither, is what distnet uses.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

PERIOD_S = 0.01

METHOD = f"SIGSTOP/SIGCONT duty cycle ({PERIOD_S * 1000:.0f} ms period)"


def cgroup_cpu_writable(root: str = "/sys/fs/cgroup") -> bool:
    """True when this process may create a cgroup with a CPU limit under ``root`` (v2
    ``cpu.max`` or v1 ``cpu/cpu.cfs_quota_us``)."""
    for where in (Path(root), Path(root) / "cpu"):
        if where.is_dir() and os.access(where, os.W_OK):
            return True
    return False


class DutyCycleThrottle:
    """Slows processes by factors >= 1 (see the module docstring); a context manager.

    Args:
        period_s: the length of one run-and-stop cycle.
    """

    def __init__(self, period_s: float = PERIOD_S) -> None:
        self.period_s = period_s
        self._factors: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_factor(self, pid: int, factor: float) -> None:
        """From the next period on, ``pid`` runs ``1 / factor`` of the time (1: full speed)."""
        if not factor >= 1.0:
            raise ValueError(f"slow-down factor for pid {pid} must be >= 1, got {factor}")
        with self._lock:
            self._factors[int(pid)] = float(factor)

    def factors(self) -> dict[int, float]:
        """The factors in force, by pid."""
        with self._lock:
            return dict(self._factors)

    def start(self) -> DutyCycleThrottle:
        self._thread = threading.Thread(target=self._loop, name="duty-cycle", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends the cycle; every throttled process is left running."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for pid in self.factors():
            _signal(pid, signal.SIGCONT)

    def __enter__(self) -> DutyCycleThrottle:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            slowed = sorted(
                (self.period_s / k, pid) for pid, k in self.factors().items() if k > 1.0
            )
            if not slowed:
                self._stop.wait(self.period_s)
                continue
            try:
                for run_s, pid in slowed:  # each runs its share, then is stopped
                    self._stop.wait(max(0.0, start + run_s - time.perf_counter()))
                    _signal(pid, signal.SIGSTOP)
                self._stop.wait(max(0.0, start + self.period_s - time.perf_counter()))
            finally:
                for _, pid in slowed:
                    _signal(pid, signal.SIGCONT)


def _signal(pid: int, sig: signal.Signals) -> None:
    """Sends ``sig``; a process that has ended is no error (a worker may finish first)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
