"""Run under mpiexec (2 ranks): an fp16 bucket that overflows raises only after every
started bucket's request has completed, and the communicator then works as before."""

import numpy as np

from distnet.parallel import BucketReducer, init, plan_buckets

comm = init("mpi")
r, n = comm.rank, comm.size
assert n > 1
started = []
real_iallreduce = comm.iallreduce


def recording_iallreduce(buf, op="sum"):
    pending = real_iallreduce(buf, op)
    started.append(pending)
    return pending


comm.iallreduce = recording_iallreduce
flat = np.ones(64, dtype=np.float32)
flat[48:] = 60000.0  # the last parameter: its bucket is launched first and overflows
buckets = plan_buckets([16, 16, 16, 16], 0)
assert len(buckets) == 4 and buckets[0].start == 48
reducer = BucketReducer(flat, comm, "fp16")
try:
    reducer.reduce(buckets, 1.0)
except FloatingPointError as e:
    assert "48..64 overflowed float16" in str(e) and "1 of 4 buckets" in str(e), e
else:
    raise AssertionError("fp16 overflow went unnoticed")
assert len(started) == 4
assert all(p.done for p in started), [p.done for p in started]  # no request left in flight
np.testing.assert_array_equal(flat[:48], float(n))  # the finite buckets were reduced
assert np.all(np.isfinite(flat))

# the communicator is clean: the next step's reduction matches rank by rank
comm.iallreduce = real_iallreduce
again = np.full(64, r + 1.0, dtype=np.float32)
BucketReducer(again, comm, "fp16").reduce(buckets, 1.0)
np.testing.assert_array_equal(again, float(n * (n + 1) // 2))
comm.barrier()
comm.print0("fp16 overflow ok")
