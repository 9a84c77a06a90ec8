"""Run under N ranks: ShardedOptimizer (ZeRO stage 1) equals the unsharded optimiser, and its
gathered state round-trips through a checkpoint. Exits non-zero on failure."""

from __future__ import annotations

import sys
import tempfile

import numpy as np

from distnet import backend, nn, optim, trace
from distnet import functional as F
from distnet import parallel as dist
from distnet.parallel.zero import ShardedOptimizer
from distnet.train.loop.checkpoint import load_checkpoint, save_checkpoint

MAKERS = {
    "adam": lambda m: optim.Adam(m, lr=0.01, weight_decay=1e-3),
    "sgd": lambda m: optim.SGD(m, lr=0.1, momentum=0.9, nesterov=True),
    "rmsprop": lambda m: optim.RMSProp(m, lr=0.01, momentum=0.5, centered=True),
}


def build():
    backend.seed(0)  # same initial parameters on every rank and for both contenders
    # 4*7+7 + 7*3+3 = 59 parameters: the shards of 2 or 3 ranks do not align with parameters
    return nn.Sequential(nn.Dense(4, 7, "tanh"), nn.Dense(7, 3))


def batches(rank: int, steps: int):
    rng = np.random.default_rng(100 + rank)
    return [(rng.random((8, 4), dtype=np.float32), rng.integers(0, 3, 8)) for _ in range(steps)]


def train(opt, model, data) -> None:
    for x, y in data:
        opt.zero_grad()
        opt.backward(F.cross_entropy(model(x), y))
        opt.step()


def main() -> None:
    comm = dist.init("mpi")
    data = batches(comm.rank, 12)
    for name, make in MAKERS.items():
        ref_model = build()
        ref = dist.DistributedOptimizer(make(ref_model), comm)
        train(ref, ref_model, data)
        model = build()
        sharded = ShardedOptimizer(make(model), comm)
        full = model.flat_params().size
        assert sharded.optimizer._state and all(
            v.size == sharded.hi - sharded.lo for v in sharded.optimizer._state.values()
        ), "state is not sharded"
        assert sum(sharded.counts) == full
        trace.enable_timers()  # its collectives count as communication in the metrics
        train(sharded, model, data)
        comm_seconds = trace.totals().get("allreduce", 0.0)
        trace.disable_timers()
        assert comm.size == 1 or comm_seconds > 0, "reduce-scatter/all-gather not timed"
        np.testing.assert_allclose(model.flat_params(), ref_model.flat_params(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)  # fmt: skip
        replicas = comm.allgather(model.flat_params().copy())
        assert all(np.array_equal(replicas[0], r) for r in replicas), "replicas differ"
        state, ref_state = sharded.state_dict(), ref.state_dict()
        assert sorted(state) == sorted(ref_state), (sorted(state), sorted(ref_state))
        for k, v in ref_state.items():
            if hasattr(v, "shape"):
                np.testing.assert_allclose(state[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
        # checkpoint: rank 0 writes the gathered state; every rank restores its slice
        with tempfile.TemporaryDirectory() as tmp:
            where = comm.allgather(tmp)[0]
            snapshot = sharded.gathered_state()  # collective
            if comm.rank == 0:
                save_checkpoint(where, model, snapshot)
            comm.barrier()
            model2 = build()
            resumed = ShardedOptimizer(make(model2), comm)
            load_checkpoint(where, model2, resumed)
            comm.barrier()
        more = batches(comm.rank + 50, 4)
        train(resumed, model2, more)
        train(ref, ref_model, more)
        np.testing.assert_allclose(model2.flat_params(), ref_model.flat_params(),
                                   rtol=1e-5, atol=1e-6, err_msg=f"{name} resumed")  # fmt: skip
        ref.close()
    shm = comm.shm.calls if comm.shm is not None else 0
    comm.print0(f"zero sharded: ok on {comm.size} ranks, {shm} collectives in shared memory")


if __name__ == "__main__":
    sys.exit(main())
