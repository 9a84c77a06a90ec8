"""Run under mpiexec (1, 2 or 4 ranks): data-parallel training equals one worker on the
whole global batch.

For each configuration, every rank trains the same model (same seed) on its slice of every
global batch with ``DistributedOptimizer`` over MPI, and also, alone, on the whole global
batch with a ``LocalCommunicator`` (the one-worker reference). Rank 0 writes a JSON list of
{config, max_abs_diff (vs reference), replica_diff (between ranks), steps (per rank)}.

Non-root ranks start from other random parameters on purpose: the broadcast of rank 0's
parameters at construction is part of what is checked.

Usage: equivalence.py OUT.json [config names...]
"""

from __future__ import annotations

import json
import sys

import numpy as np

from distnet import backend
from distnet.core.functional import cross_entropy
from distnet.nn import Dense, Sequential
from distnet.optim import SGD, Adam
from distnet.parallel import DistributedOptimizer, LocalCommunicator, init

STEPS = 50
IN, HIDDEN, CLASSES = 10, 16, 3

CONFIGS: dict[str, dict] = {
    "f32_one_bucket": {},
    "f32_bucket_per_param": {"bucket_mb": 0},
    "f32_split_params": {"bucket_mb": 40 / 2**20},  # 10 floats: W1 (160) becomes 16 buckets
    "f64": {"dtype": "float64"},
    "adam": {"optimizer": "adam"},
    "fp16": {"compression": "fp16"},
    "hetero_shares": {"split": "hetero"},
    "uneven_data": {"n_data": 99, "epochs": True},
    "overlap": {"overlap": True, "bucket_mb": 200 / 2**20},
    # opt.backward(loss, share): the weight rides on the seed gradient
    "prescaled_hetero": {"split": "hetero", "prescale": True},
    "prescaled_overlap": {"overlap": True, "bucket_mb": 200 / 2**20, "prescale": True},
}


def make_data(n: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    x = rng.normal(size=(n, IN)).astype(dtype)
    w = rng.normal(size=(IN, CLASSES))
    y = np.argmax(x @ w + 0.5 * rng.normal(size=(n, CLASSES)), axis=1).astype(np.int64)
    return x, y


def make_model(dtype: str, seed: int) -> Sequential:
    backend.seed(seed)
    return Sequential(Dense(IN, HIDDEN, "tanh", dtype=dtype), Dense(HIDDEN, CLASSES, dtype=dtype))


def make_optimizer(model: Sequential, name: str):
    if name == "adam":
        return Adam(model, lr=0.01)
    return SGD(model, lr=0.1, momentum=0.9)


def global_batches(cfg: dict) -> list[np.ndarray]:
    """Index arrays of the global batches, the same on every rank."""
    n, batch = cfg.get("n_data", 480), 24 if not cfg.get("epochs") else 16
    order = np.random.default_rng(7).permutation(n)
    if cfg.get("epochs"):
        # Whole epochs: the last batch is short (99 = 6*16 + 3), fewer samples than 4 ranks.
        batches, epoch = [], 0
        while len(batches) < STEPS:
            perm = np.random.default_rng(epoch).permutation(n)
            batches += [perm[i : i + batch] for i in range(0, n, batch)]
            epoch += 1
        return batches[:STEPS]
    return [order[(s * batch) % n : (s * batch) % n + batch] for s in range(STEPS)]


def local_slice(idx: np.ndarray, rank: int, size: int, split: str) -> np.ndarray:
    if split == "hetero" and size > 1:
        # Rank 0 gets twice the share of the others (a faster worker).
        weights = np.array([2.0] + [1.0] * (size - 1))
        cuts = np.round(np.cumsum(weights) / weights.sum() * len(idx)).astype(int)
        return np.split(idx, cuts[:-1])[rank]
    return np.array_split(idx, size)[rank]


def train(cfg: dict, comm, seed: int) -> tuple[np.ndarray, int]:
    dtype = cfg.get("dtype", "float32")
    x, y = make_data(cfg.get("n_data", 480), dtype)
    model = make_model(dtype, seed)
    opt = DistributedOptimizer(
        make_optimizer(model, cfg.get("optimizer", "sgd")),
        comm,
        bucket_mb=cfg.get("bucket_mb", 25),
        compression=cfg.get("compression"),
        overlap=cfg.get("overlap", False),
    )
    steps = 0
    for idx in global_batches(cfg):
        mine = local_slice(idx, comm.rank, comm.size, cfg.get("split", "even"))
        opt.zero_grad()
        share = len(mine) / len(idx)
        if len(mine):  # a rank with no samples in a short last batch contributes nothing
            loss = cross_entropy(model(x[mine]), y[mine])
            if cfg.get("prescale"):
                opt.backward(loss, batch_share=share)
            else:
                loss.backward()
        if cfg.get("overlap"):
            opt.batch_share = share
            opt.step()
        else:
            opt.step(batch_share=share)
        steps += 1
    opt.close()
    return np.array(opt.flat_params, copy=True), steps


def main() -> None:
    out = sys.argv[1]
    names = sys.argv[2:] or list(CONFIGS)
    comm = init("mpi")
    results = []
    for name in names:
        cfg = CONFIGS[name]
        reference, _ = train(cfg, LocalCommunicator(), seed=0)
        params, steps = train(cfg, comm, seed=0 if comm.rank == 0 else 100 + comm.rank)
        diff = float(np.max(np.abs(params.astype(np.float64) - reference)))
        ref_norm = float(np.max(np.abs(reference)))
        # Every replica must hold the same parameters: compare with rank 0's.
        root = comm.broadcast(params.copy(), 0)
        replica = comm.allreduce(np.array([np.max(np.abs(params - root))], "float64"), "max")
        results.append(
            {
                "config": name,
                "size": comm.size,
                "max_abs_diff": diff,
                "max_abs_param": ref_norm,
                "replica_diff": float(replica[0]),
                "steps": comm.allgather(steps),
            }
        )
        comm.print0(f"{name}: max |distributed - reference| = {diff:.3g}")
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
