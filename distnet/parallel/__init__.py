"""Distribution: communicators, bucketed gradient allreduce, the data-parallel optimiser.

    import distnet.parallel as dist
    comm = dist.init()                       # MPI under `distnet launch`, local otherwise
    opt = dist.DistributedOptimizer(SGD(model, lr=0.1), comm, bucket_mb=25)

Nothing here imports mpi4py or cupy until a communicator that needs them is created.
"""

from distnet.parallel.buckets import Bucket, BucketReducer, bucketed_allreduce, plan_buckets
from distnet.parallel.comm import (
    Communicator,
    LocalCommunicator,
    PendingAllreduce,
    init,
    launched_by_mpi,
)
from distnet.parallel.mpi.communicator import MPICommunicator  # mpi4py is imported when made
from distnet.parallel.optimizer import DistributedOptimizer
from distnet.parallel.stall import StallDetector

__all__ = [
    "Bucket",
    "BucketReducer",
    "Communicator",
    "DistributedOptimizer",
    "LocalCommunicator",
    "MPICommunicator",
    "PendingAllreduce",
    "StallDetector",
    "bucketed_allreduce",
    "init",
    "launched_by_mpi",
    "plan_buckets",
]
