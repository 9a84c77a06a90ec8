"""How an MPI rank waits for its peers: MPI's own busy wait, or testing with short sleeps.

MPICH (Open MPI too) waits inside a collective by polling its progress engine: the rank that
arrives first spins at 100% of a core until the last one comes. With a core for each rank
that costs nothing. On a node with more ranks (times their threads) than cores, or one that
other jobs share, the spinning rank takes the core from the very rank it waits for: on one
core, a rank's 0.8 s of work took 1.6 s beside a peer spinning in ``MPI_Allreduce``, and
none of MPICH 5.0's yield settings (``MPIR_CVAR_POLLS_BEFORE_YIELD``,
``MPIR_CVAR_POSIX_POLL_FREQUENCY``, ``MPIR_CVAR_CH4_PROGRESS_THROTTLE``) changed that.

``DISTNET_MPI_WAIT``:

- ``spin``: MPI's own blocking calls (the HPC default, right for a rank with its own cores);
- ``poll``: before each collective every rank *arrives* at a non-blocking barrier that it
  tests back to back for 50 us, then between sleeps that double from 10 us to 1 ms (the
  last one to arrive waits at most one test); the collective itself then finds every rank
  there. A long wait costs ~1,000 tests a second instead of a core;
- ``auto`` (the default): ``poll`` where this node's ranks times their threads
  (``OMP_NUM_THREADS``, else 1) exceed the cores a rank may use, unless the launcher bound
  each rank to cores of its own; else ``spin``.

The ranks decide together (any rank's ``poll`` makes every rank poll): a rank that arrives
at a barrier its peers never call would wait forever.
"""

from __future__ import annotations

import os
import time
from typing import Any

POLICIES = ("auto", "spin", "poll")
SPIN_S = 50e-6
"""Tests back to back for this long before the first sleep (a peer that is nearly there)."""
FIRST_NAP_S = 10e-6
LONGEST_NAP_S = 1e-3


def policy_from_env() -> str:
    """``DISTNET_MPI_WAIT`` (default ``auto``); anything else is refused naming the variable."""
    value = os.environ.get("DISTNET_MPI_WAIT", "auto").strip().lower() or "auto"
    if value not in POLICIES:
        raise ValueError(f"DISTNET_MPI_WAIT={value!r}: expected one of {', '.join(POLICIES)}")
    return value


def _threads() -> int:
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else 1


def wants_poll(policy: str, local_size: int, threads: int | None = None,
               cores: int | None = None) -> bool:  # fmt: skip
    """Whether this rank asks to poll: ``policy`` as ``policy_from_env`` gives it;
    ``local_size``: the ranks on this node; ``threads``/``cores``: this rank's threads and the
    cores its affinity mask allows (read from the process when None)."""
    if policy != "auto":
        return policy == "poll"
    threads = _threads() if threads is None else threads
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS: no affinity masks
            cores = os.cpu_count() or 1
    if cores <= threads:  # bound to cores of its own (``distnet launch`` binds when ranks fit)
        return False
    return local_size * threads > cores


def poll(request: Any) -> None:
    """Completes an MPI ``request`` by testing it (``SPIN_S`` back to back, then between
    sleeps from ``FIRST_NAP_S`` doubling to ``LONGEST_NAP_S``). The sleeps release the GIL."""
    if request.Test():
        return
    start = time.perf_counter()
    nap = FIRST_NAP_S
    while not request.Test():
        if time.perf_counter() - start < SPIN_S:
            continue
        time.sleep(nap)
        nap = min(2 * nap, LONGEST_NAP_S)
