"""Run under mpiexec (2+ ranks): how the ranks wait for each other (``DISTNET_MPI_WAIT``).

Rank 1 comes to an allreduce 1 s after rank 0; rank 0 prints the CPU time it spent waiting.
Every rank checks the collectives' results. Rank 0 prints "waits=<policy> cpu=<seconds>".
"""

import time

import numpy as np

from distnet.parallel import init

comm = init("mpi")
r, n = comm.rank, comm.size
buf = np.full(3, float(r))
comm.allreduce(buf)
assert np.all(buf == sum(range(n))), buf
cpu = time.process_time()
if r == 1:
    time.sleep(1.0)
buf = np.full(4, r + 1.0)
comm.allreduce(buf, "mean")
cpu = time.process_time() - cpu
np.testing.assert_allclose(buf, np.full(4, (n + 1) / 2))
pending = comm.iallreduce(np.full(5, float(r)), "max")
np.testing.assert_array_equal(pending.wait(), np.full(5, n - 1.0))
assert comm.allgather(r) == list(range(n))
comm.barrier()
out = np.full(2, float(r))
comm.broadcast(out, root=n - 1)
assert np.all(out == n - 1)
if r == 0:
    print(f"waits={comm.waits} cpu={cpu:.3f}", flush=True)
