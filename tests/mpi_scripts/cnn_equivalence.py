"""Run under mpiexec: a small CNN trained data-parallel equals one worker on the global batch.

Every rank trains the same float64 CNN (conv, max pool, conv, avg pool, dense) with
``DistributedOptimizer`` on its half of every global batch; each rank also trains alone on the
whole global batch (``LocalCommunicator``), the reference. Rank 0 writes a JSON object
{max_abs_diff, replica_diff, steps}.

Usage: cnn_equivalence.py OUT.json
"""

from __future__ import annotations

import json
import sys

import numpy as np

from distnet import backend
from distnet.core.functional import cross_entropy
from distnet.nn import AvgPool2d, Conv2d, Dense, Flatten, MaxPool2d, Sequential
from distnet.optim import SGD
from distnet.parallel import DistributedOptimizer, LocalCommunicator, init

STEPS, BATCH, N = 20, 16, 96


def make_model(seed: int) -> Sequential:
    backend.seed(seed)
    f64 = np.float64
    return Sequential(
        Conv2d(1, 4, 3, padding=1, activation="relu", dtype=f64),
        MaxPool2d(2),
        Conv2d(4, 6, 3, stride=1, dilation=1, activation="tanh", dtype=f64),
        AvgPool2d(2, stride=1),
        Flatten(),
        Dense(6, 3, dtype=f64),
    )


def train(comm, seed: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(N, 1, 8, 8))
    y = (x[:, 0, :4].mean(axis=(1, 2)) > 0).astype(np.int64) + (x[:, 0, 4:, 4:].sum((1, 2)) > 1)
    model = make_model(seed)
    opt = DistributedOptimizer(SGD(model, lr=0.1, momentum=0.9), comm, bucket_mb=0)
    steps = 0
    for s in range(STEPS):
        idx = np.random.default_rng(s).choice(N, BATCH, replace=False)
        mine = np.array_split(idx, comm.size)[comm.rank]
        opt.zero_grad()
        cross_entropy(model(x[mine]), y[mine]).backward()
        opt.step(batch_share=len(mine) / len(idx))
        steps += 1
    opt.close()
    return np.array(opt.flat_params, copy=True), steps


def main() -> None:
    comm = init("mpi")
    reference, _ = train(LocalCommunicator(), seed=0)
    # other ranks start from other parameters: the broadcast at construction is checked too
    params, steps = train(comm, seed=0 if comm.rank == 0 else 50 + comm.rank)
    root = comm.broadcast(params.copy(), 0)
    replica = comm.allreduce(np.array([np.max(np.abs(params - root))]), "max")
    result = {
        "size": comm.size,
        "max_abs_diff": float(np.max(np.abs(params - reference))),
        "max_abs_param": float(np.max(np.abs(reference))),
        "replica_diff": float(replica[0]),
        "steps": comm.allgather(steps),
    }
    comm.print0(f"cnn: max |distributed - reference| = {result['max_abs_diff']:.3g}")
    if comm.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
