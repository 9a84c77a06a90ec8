"""Run as 4 ranks on two "nodes" of two (``distnet launch --launcher fork -H nodeA:2,nodeB:2``).

Checks the node layout MPI reports, that the hierarchical allreduce is chosen automatically
and gives the flat allreduce's result (blocking and non-blocking, sum and mean), that it can
be switched off, and which GPU each rank would take (local rank). Prints ``[r] multinode ok``.
"""

import hashlib
import json
import os
import sys

import numpy as np

from distnet import parallel
from distnet.parallel.mpi.hierarchical import PendingHierarchical

comm = parallel.init("mpi")
expect_nodes = int(sys.argv[1]) if len(sys.argv) > 1 else 2
layout = {
    "rank": comm.rank, "local_rank": comm.local_rank, "local_size": comm.local_size,
    "num_nodes": comm.num_nodes, "hierarchical": comm.hierarchical,
    "device": f"cuda:{comm.local_rank}",  # what a GPU job would take: one GPU per local rank
}  # fmt: skip
print("layout " + json.dumps(layout), flush=True)
assert comm.num_nodes == expect_nodes, layout
# "auto": hierarchical on several nodes with several ranks on some node; "0" turns it off.
auto = expect_nodes >= 2 and comm.size > expect_nodes
assert comm.hierarchical == (auto and os.environ.get("DISTNET_HIERARCHICAL") != "0"), layout

rng = np.random.default_rng(comm.rank)
# Small integers: every order of additions gives the exact sum, so results must be equal.
ints = rng.integers(-1000, 1000, size=10_007).astype(np.float32)
expect_ints = sum(
    np.random.default_rng(r).integers(-1000, 1000, size=10_007).astype(np.float32)
    for r in range(comm.size)
)
for use_hierarchical in (True, False):
    comm.set_hierarchical(use_hierarchical)
    assert comm.hierarchical is use_hierarchical
    got = comm.allreduce(ints.copy(), "sum")
    assert np.array_equal(got, expect_ints), f"hierarchical={use_hierarchical}: sum differs"
    pending = comm.iallreduce(ints.copy(), "mean")
    assert isinstance(pending, PendingHierarchical) == use_hierarchical
    while not pending.test():
        pass
    assert np.array_equal(pending.wait(), expect_ints / comm.size)
    for op, fn in (("max", np.maximum), ("min", np.minimum)):
        ref = np.random.default_rng(0).integers(-1000, 1000, size=10_007).astype(np.float32)
        for r in range(1, comm.size):
            ref = fn(ref, np.random.default_rng(r).integers(-1000, 1000, 10_007).astype(np.float32))
        assert np.array_equal(comm.allreduce(ints.copy(), op), ref), op

# Random floats: the same sum up to the order of additions; flat vs hierarchical.
floats = rng.standard_normal(100_003).astype(np.float32)
comm.set_hierarchical(True)
hier = comm.allreduce(floats.copy(), "sum")
comm.set_hierarchical(False)
flat = comm.allreduce(floats.copy(), "sum")
np.testing.assert_allclose(hier, flat, rtol=1e-5, atol=1e-5)
# Every rank holds the very same bytes (the broadcast step), so replicas cannot drift.
digest = hashlib.sha256(hier.tobytes()).hexdigest()
assert comm.allgather(digest) == [digest] * comm.size
# float16 (fp16 compression's wire format) through the hierarchical steps
halves = ints[:1000].astype(np.float16) / np.float16(8)
comm.set_hierarchical(True)
h16 = comm.allreduce(halves.copy(), "sum")
comm.set_hierarchical(False)
assert np.array_equal(h16, comm.allreduce(halves.copy(), "sum"))

# DistributedOptimizer(hierarchical=...) sets it; both give the same step, with overlap too
from distnet import backend, nn, optim  # noqa: E402
from distnet import functional as F  # noqa: E402
from distnet.parallel import DistributedOptimizer  # noqa: E402

params = {}
for hierarchical in (True, False):
    backend.seed(0)
    model = nn.Sequential(nn.Dense(20, 16, "relu"), nn.Dense(16, 3))
    opt = DistributedOptimizer(
        optim.SGD(model, lr=0.1), comm, bucket_mb=0.001, hierarchical=hierarchical, overlap=True
    )
    assert comm.hierarchical is hierarchical
    x = np.random.default_rng(100 + comm.rank).standard_normal((8, 20)).astype(np.float32)
    y = np.random.default_rng(comm.rank).integers(0, 3, 8)
    opt.zero_grad()
    opt.backward(F.cross_entropy(model(x), y))
    opt.step()
    params[hierarchical] = opt.flat_params.copy()
np.testing.assert_allclose(params[True], params[False], rtol=1e-6, atol=1e-7)
comm.set_hierarchical("auto")
comm.barrier()
comm.log("multinode ok")
