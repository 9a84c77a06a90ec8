"""Run under mpiexec: rank 1 fails in the way argv[1] names, while the others allreduce.

Modes: ok, raise, kill (SIGKILL to itself), exit (sys.exit(3)), stall (sleeps in step 3),
segv (a segmentation fault in a function of its own, as a crash in a C extension would be).
"""

import os
import signal
import sys
import time

import numpy as np

from distnet.parallel import init
from distnet.parallel.stall import StallDetector, set_report_dir

mode = sys.argv[1]
comm = init("mpi")
set_report_dir(os.environ.get("STALL_REPORT_DIR"))  # None: the log only
stall = StallDetector(comm, warn_after_s=float(os.environ.get("STALL_S", "1")), poll_s=0.05)
buf = np.ones(1000, dtype=np.float32)


def crash_in_step_3() -> None:
    """Where the crashed rank was: the launcher's output must show this frame."""
    import ctypes  # noqa: PLC0415

    ctypes.string_at(0)  # reads address 0: SIGSEGV


def sleep_instead_of_step_3() -> None:
    """Where the stalled rank is: the stall report must show this frame."""
    time.sleep(float(os.environ.get("STALL_SLEEP", "3")))


for step in range(1, 6):
    if comm.rank == 1 and step == 3:
        if mode == "raise":
            raise RuntimeError("injected failure")
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "exit":
            sys.exit(3)
        if mode == "segv":
            crash_in_step_3()
        if mode == "stall":
            sleep_instead_of_step_3()
    stall.enter(f"allreduce {step}")
    comm.allreduce(buf, "sum")
    comm.print0(f"step {step} ok")
stall.close()
comm.print0(f"done; stall reports: {len(stall.reports) if comm.rank == 0 else 0}")
