"""Under mpiexec with DISTNET_TRACE=DIR: fit with overlapped bucket allreduce (small buckets),
so that each rank's trace shows buckets starting inside backward."""

import numpy as np

import distnet.parallel as dist
from distnet import nn, optim
from distnet.train import fit

comm = dist.init()
rng = np.random.default_rng(comm.rank)
x = rng.normal(size=(64, 32)).astype(np.float32)
y = rng.integers(0, 4, 64)
model = nn.Sequential(nn.Dense(32, 64, "relu"), nn.Dense(64, 64, "relu"), nn.Dense(64, 4))
opt = dist.DistributedOptimizer(optim.SGD(model, lr=0.1), comm, bucket_mb=0.005, overlap=True)
fit(model, x, y, batch_size=16, epochs=1, optimizer=opt, seed=0)
opt.close()
comm.barrier()
