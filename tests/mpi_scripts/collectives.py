"""Run under mpiexec (1, 2 or 4 ranks): the Communicator's collectives and bucketed_allreduce.

Asserts on every rank; rank 0 prints "collectives ok" at the end.
"""

import numpy as np

from distnet.parallel import bucketed_allreduce, init

comm = init("mpi")
r, n = comm.rank, comm.size
assert comm.engine == "mpi" and 0 <= r < n
# One machine: every rank shares memory with every other.
assert (comm.local_rank, comm.local_size) == (r, n), (comm.local_rank, comm.local_size)

for dtype in ("float32", "float64"):
    base = np.arange(12, dtype=dtype).reshape(3, 4)
    for op, expect in (
        ("sum", base * n + sum(range(n))),
        ("mean", base + (n - 1) / 2),
        ("max", base + n - 1),
        ("min", base),
    ):
        buf = base + r
        out = comm.allreduce(buf, op)
        assert out is buf, "allreduce must work in place"
        np.testing.assert_allclose(buf, expect, rtol=1e-6)

pending = comm.iallreduce(np.full(5, r + 1.0), "mean")
np.testing.assert_allclose(pending.wait(), np.full(5, (n + 1) / 2))

buf = np.full(7, float(r))
comm.broadcast(buf, root=n - 1)
assert np.all(buf == n - 1)
assert comm.allgather(r * 10) == [i * 10 for i in range(n)]
comm.barrier()

try:
    comm.allreduce(np.zeros((4, 4))[:, 0])
    raise AssertionError("a strided view must be refused")
except ValueError:
    pass

# bucketed_allreduce: any bucket size gives the exact mean / sum.
sizes = [30, 7, 100, 1, 62]
rng = np.random.default_rng(r)
grads = rng.standard_normal(sum(sizes)).astype(np.float32)
every = np.stack([np.random.default_rng(i).standard_normal(sum(sizes)) for i in range(n)])
every = every.astype(np.float32)
for bucket_bytes in (0, 4, 40, 400, 10**6):
    for sizes_arg in (sizes, None):
        flat = grads.copy()
        bucketed_allreduce(flat, comm, bucket_bytes, op="mean", param_sizes=sizes_arg)
        np.testing.assert_allclose(flat, every.mean(axis=0), rtol=1e-5, atol=1e-6)
flat = grads.copy()
bucketed_allreduce(flat, comm, 100, op="sum", param_sizes=sizes)
np.testing.assert_allclose(flat, every.sum(axis=0), rtol=1e-5, atol=1e-6)

# fp16 on the wire: within the documented bound size * 2**-11 * sum_r |g_r| (+ subnormals).
flat = grads.copy()
bucketed_allreduce(flat, comm, 200, compression="fp16", op="mean", param_sizes=sizes)
exact = every.astype(np.float64).mean(axis=0)
bound = n * 2.0**-11 * np.abs(every / n).sum(axis=0) + n * 6e-8
err = np.abs(flat - exact)
assert np.all(err <= bound), float((err / bound).max())

# fp16 overflow: a clear error on every rank, and the buffer is not filled with inf
if n > 1:
    huge = np.full(64, 60000.0, dtype=np.float32)  # the sum of n ranks exceeds 65504
    try:
        bucketed_allreduce(huge, comm, 0, compression="fp16", op="sum")
    except FloatingPointError as e:
        assert "overflowed float16" in str(e), e
        assert np.all(np.isfinite(huge))
    else:
        raise AssertionError("fp16 overflow went unnoticed")

comm.print0("collectives ok")
