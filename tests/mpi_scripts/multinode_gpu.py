"""4 ranks as two nodes of two (fork hosts), one GPU each: NCCL hierarchical == NCCL flat."""

import cupy as cp
import numpy as np

from distnet import parallel
from distnet.parallel.mpi.nccl_hierarchical import NcclHierarchical

comm = parallel.init("mpi")
comm.use_nccl()
assert isinstance(comm._nccl_hierarchical, NcclHierarchical), "hierarchical NCCL not created"
for size in (10_007, 4, 1):  # uneven over 2 local ranks (padding), tiny, one element
    ints = cp.asarray(np.random.default_rng(comm.rank).integers(-99, 99, size), cp.float32)
    expect = sum(
        np.random.default_rng(r).integers(-99, 99, size).astype(np.float32)
        for r in range(comm.size)
    )
    for op, want in (("sum", expect), ("mean", expect / comm.size)):
        comm.set_hierarchical(True)
        hier = comm.allreduce(ints.copy(), op)
        comm.set_hierarchical(False)
        flat = comm.allreduce(ints.copy(), op)
        assert np.array_equal(cp.asnumpy(hier), want), (size, op)
        assert np.array_equal(cp.asnumpy(flat), want), (size, op)
cp.cuda.get_current_stream().synchronize()
comm.barrier()
comm.log(f"multinode gpu ok on device {cp.cuda.Device().id}")
