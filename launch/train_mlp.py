"""A data-parallel training script written by hand, Horovod-style (no job file).

    distnet data convert digits data/digits
    distnet launch -np 2 -- python launch/train_mlp.py data/digits
    launch/mpiexec_example.sh 2 python launch/train_mlp.py data/digits

Every rank streams its own shard of each global batch; DistributedOptimizer broadcasts rank
0's parameters once and averages gradients in buckets of the flat gradient buffer.
"""

from __future__ import annotations

import argparse

import distnet.parallel as dist
from distnet import backend, nn, optim
from distnet import functional as F
from distnet.data import StreamLoader
from distnet.train.jobs.job import read_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="directory with the train and test stores")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--batch-size", type=int, default=64, help="global batch size (summed over ranks)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: one GPU per rank")
    args = parser.parse_args()

    comm = dist.init()  # MPI when started by an MPI launcher, else one local process
    # GPU local_rank modulo the GPUs this rank sees (SLURM --gpus-per-task works too)
    device = backend.use_device(backend.device_for_rank(comm.local_rank, args.device))
    backend.seed(0)
    model = nn.Sequential(nn.Dense(64, 128, "relu"), nn.Dense(128, 10)).to(device)
    opt = dist.DistributedOptimizer(optim.Adam(model, lr=3e-3), comm)
    loader = StreamLoader(f"{args.data}/train", global_batch_size=args.batch_size,
                          rank=comm.rank, world_size=comm.size, seed=0, device=device)  # fmt: skip
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            opt.backward(F.cross_entropy(model(x), y), batch_share=loader.batch_share)
            opt.step()
    loader.close()
    x_test, y_test = read_store(f"{args.data}/test")
    accuracy = float((model.predict(x_test).argmax(axis=1) == y_test).mean())  # host arrays
    comm.print0(f"{comm.size} ranks, test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
