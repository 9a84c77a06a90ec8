"""Run under 2 ranks: after a first allreduce, rank 0 is away from the collectives for
``STALL_SLEEP`` seconds while rank 1 waits in the second allreduce.

argv[1]: "declared": rank 0 declares the time as work (``stall.working``, as rank 0 does
around a checkpoint or the report): no stall, the job ends normally; "stuck": the same time
undeclared, a real stall (rank 1 in a collective, rank 0 stuck elsewhere), reported.
argv[2]: the run directory for stall.json.
"""

import os
import sys
import time

import numpy as np

from distnet import parallel as dist
from distnet.parallel import stall


def away_from_the_collectives() -> None:
    """Where rank 0 is: a stall report must show this frame."""
    time.sleep(float(os.environ.get("STALL_SLEEP", "6")))


comm = dist.init("mpi")
stall.set_report_dir(sys.argv[2])
buf = np.ones(16, dtype=np.float32)
comm.allreduce(buf)
if comm.rank == 0:
    if sys.argv[1] == "declared":
        with stall.working("writing a checkpoint"):
            away_from_the_collectives()
    else:
        away_from_the_collectives()
comm.allreduce(buf)
comm.print0(f"done {buf[0]:.0f}")
