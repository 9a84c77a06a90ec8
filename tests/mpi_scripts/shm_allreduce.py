"""Run under ``distnet launch`` (2, 3 or 4 ranks): the shared-memory allreduce.

Every result is checked against MPI's own reduction of the same values; rank 0 prints
"shm ok" and, as JSON after "calls:", how many allreduces went through shared memory.
"""

import json
import os
import sys

import numpy as np

from distnet import backend, nn
from distnet.core.tensor import Tensor
from distnet.parallel import bucketed_allreduce, init
from distnet.parallel.consistency import CollectiveMismatch
from distnet.parallel.shm import ARENA, SharedArena, ShmAllreduce

comm = init("mpi")
r, n = comm.rank, comm.size
MPI, world = comm.MPI, comm.comm
if os.environ.get("DISTNET_SHM_ALLREDUCE") == "0":
    assert comm.shm is None
    grads = nn.Dense(300, 200).flat_grads()
    assert ARENA.locate(grads) is None, "switched off: gradients in ordinary memory"
    grads[:] = r + 1
    comm.allreduce(grads, "sum")
    assert np.all(grads == n * (n + 1) / 2)
    if r == 0:
        print("shm off ok", flush=True)
    sys.exit(0)
assert comm.shm is not None, "all ranks on one node: the shared path must be on"


def mpi_reference(values: np.ndarray, op: str) -> np.ndarray:
    out = values.copy()
    world.Allreduce(
        MPI.IN_PLACE, out, op={"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
    )
    return out / n if op == "mean" else out


rng = np.random.default_rng(100 + r)
calls = {}

# 1. A model's flat gradient buffer is made in shared memory, and reduced there.
model = nn.Sequential(nn.Dense(300, 200), nn.ReLU(), nn.Dense(200, 10))
grads = model.flat_grads()
assert ARENA.locate(grads) is not None, "gradient buffers must come from the shared arena"
for dtype in (np.float32, np.float64):
    buf = backend.flat_zeros(np, 70_001, dtype)  # not divisible by the ranks
    for op in ("sum", "mean", "max", "min"):
        buf[:] = rng.standard_normal(buf.size)
        expect = mpi_reference(buf, op)
        before = comm.shm.calls
        comm.allreduce(buf, op)
        assert comm.shm.calls == before + 1, (op, dtype)
        # the same adds in a different order (MPI's tree against rank order): float rounding
        tol = 1e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(buf, expect, rtol=tol, atol=tol)
        if n == 2:  # a + b: one add, the same on any path
            assert np.array_equal(buf, expect), op
        everyone = world.allgather(buf.copy())
        assert all(np.array_equal(everyone[0], other) for other in everyone), "replicas differ"

# 2. Slices of a shared buffer (buckets), the gradients of a real backward, iallreduce.
x = rng.standard_normal((64, 300)).astype(np.float32)
model.zero_grad()
model(Tensor(x)).sum().backward()
assert np.abs(grads).max() > 0, "backward wrote the shared buffer"
expect = mpi_reference(grads, "mean")
before = comm.shm.calls
bucketed_allreduce(grads, comm, bucket_bytes=128 * 1024, op="mean")  # 2 buckets of 124 KB
assert comm.shm.calls == before + 2, "the buckets of a shared buffer go through memory"
np.testing.assert_allclose(grads, expect, rtol=1e-5, atol=1e-5)
half = grads[grads.size // 2 :]
half[:] = r + 1.0
comm.iallreduce(half, "sum").wait()
assert np.all(half == n * (n + 1) / 2)

# 3. What goes through MPI, alike on every rank: small buffers, and a buffer that is shared
#    on some ranks only (no rank may wait in a barrier the others never reach).
before = comm.shm.calls
small = backend.flat_zeros(np, 100, np.float32) + r
comm.allreduce(small, "sum")
assert np.all(small == sum(range(n)))
mixed = backend.flat_zeros(np, 50_000, np.float32) if r % 2 == 0 else np.zeros(50_000, np.float32)
mixed += r
comm.allreduce(mixed, "sum")
assert np.all(mixed == sum(range(n)))
assert comm.shm.calls == before, "these must have gone through MPI"

# 4. A new buffer after the old one is freed (a re-layout): agreed on again, still right.
for round_ in range(3):
    fresh = backend.flat_zeros(np, 40_000 + round_, np.float32)
    fresh += r * (round_ + 1)
    comm.allreduce(fresh, "sum")
    assert np.all(fresh == sum(range(n)) * (round_ + 1)), round_
    del fresh

# 5. A layer's 2-D gradient (a view into the flat buffer) is reduced element by element,
#    and so is an array of an arena whose files start with a header.
weight = model[0].weight.grad
assert weight.ndim == 2 and weight.nbytes > comm.shm.min_bytes
weight[:] = rng.standard_normal(weight.shape)
expect = mpi_reference(weight, "sum")
before = comm.shm.calls
comm.allreduce(weight, "sum")
assert comm.shm.calls == before + 1, "a 2-D view of a shared buffer goes through memory"
np.testing.assert_allclose(weight, expect, rtol=1e-6, atol=1e-6)
headed = SharedArena("distnet-test-headed", header=64)
road = ShmAllreduce(world, MPI, headed)
values = headed.zeros(30_000, np.float32)
values[:] = np.arange(values.size, dtype=np.float32) * (r + 1)
assert road.allreduce(values, "sum") and road.calls == 1
expect = np.arange(values.size, dtype=np.float32) * sum(range(1, n + 1))
assert np.array_equal(values, expect), "the header's bytes were taken for the array's"

# 6. Buffers of different sizes on different ranks: an error on every rank, not a hang (from
#    the consistency check when it is on, else from the shared road's own agreement).
odd = backend.flat_zeros(np, 20_000 + 1000 * r, np.float32)
try:
    comm.allreduce(odd, "sum")
    raise AssertionError("buffers of different sizes were reduced")
except CollectiveMismatch as err:
    assert comm.trace.check and "of 21000 float32" in str(err), err
except ValueError as err:
    assert not comm.trace.check and "different sizes" in str(err), err

if r == 0:
    print("shm ok")
    print("calls:", json.dumps({"shm": comm.shm.calls}))
sys.stdout.flush()
