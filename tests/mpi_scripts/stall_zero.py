"""Run under 2 ranks: ZeRO-1 (``ShardedOptimizer``) training in which rank 1 sleeps instead
of step 3. Nothing here calls the stall check: the communicator's own (``DISTNET_STALL_CHECK_S``,
``DISTNET_STALL_ABORT_S``) must report where both ranks are and end the job.

argv[1]: the run directory for stall.json.
"""

import os
import sys
import time

import numpy as np

from distnet import backend, nn, optim
from distnet import functional as F
from distnet import parallel as dist
from distnet.parallel.stall import set_report_dir
from distnet.parallel.zero import ShardedOptimizer


def sleep_instead_of_step_3() -> None:
    """Where the stalled rank is: the stall report must show this frame."""
    time.sleep(float(os.environ.get("STALL_SLEEP", "120")))


comm = dist.init("mpi")
set_report_dir(sys.argv[1])
backend.seed(0)
model = nn.Sequential(nn.Dense(4, 7, "tanh"), nn.Dense(7, 3))
opt = ShardedOptimizer(optim.Adam(model, lr=0.01), comm)
rng = np.random.default_rng(comm.rank)
for step in range(1, 6):
    if comm.rank == 1 and step == 3:
        sleep_instead_of_step_3()
    x, y = rng.random((8, 4), dtype=np.float32), rng.integers(0, 3, 8)
    opt.zero_grad()
    opt.backward(F.cross_entropy(model(x), y))
    opt.step()
    comm.print0(f"step {step} ok")
comm.print0("done")
