"""Rank ``argv[1]`` raises after a first allreduce; the others go on to a second one."""

import sys

import numpy as np

from distnet.parallel import init

comm = init("mpi")
buf = np.ones(100, dtype=np.float32)
comm.allreduce(buf, "sum")
if comm.rank == int(sys.argv[1]):
    raise RuntimeError(f"injected failure on local rank {comm.local_rank}")
comm.allreduce(buf, "sum")
comm.print0("done")
