"""Run under N ranks on one node: the engine places a model's flat buffers in shared memory
whether the model was built before or after ``init()``, and the placed model trains (the
allreduce takes the shared-memory road). Prints one JSON line per rank."""

from __future__ import annotations

import json
import sys

import numpy as np


def main() -> int:
    from distnet import backend, nn, optim  # noqa: PLC0415
    from distnet.parallel.engine import ProcessEngine  # noqa: PLC0415
    from distnet.parallel.shm import ARENA  # noqa: PLC0415
    from distnet.train.jobs.jobspec import defaults  # noqa: PLC0415

    backend.seed(0)
    before = nn.Sequential(nn.Dense(8, 16, "tanh"), nn.Dense(16, 3))  # built before init()
    values = np.array(before.flat_params(), copy=True)
    in_shm_before = ARENA.locate(before.flat_params()) is not None
    engine = ProcessEngine()
    engine.start({"dist": {**defaults()["dist"], "engine": "mpi"}}, lambda line: None)
    engine.place(before, "cpu")
    backend.seed(0)
    after = nn.Sequential(nn.Dense(8, 16, "tanh"), nn.Dense(16, 3))  # built after init()
    engine.place(after, "cpu")
    opt = engine.wrap(optim.SGD(before, lr=0.1), None)
    rng = np.random.default_rng(engine.comm.rank)
    x, y = rng.random((4, 8), dtype=np.float32), rng.integers(0, 3, 4)
    opt.zero_grad()
    opt.backward(nn.losses.get_loss("cross_entropy")(before(x), y))
    opt.step()
    params = before.flat_params()
    print(json.dumps({
        "rank": engine.comm.rank,
        "shm": engine.comm.shm is not None,
        "in_shm_before_placing": in_shm_before,
        "placed_before_init": ARENA.locate(params) is not None,
        "placed_after_init": ARENA.locate(after.flat_params()) is not None,
        "values_kept": bool(np.array_equal(after.flat_params(), values)),
        "views_follow": bool(np.shares_memory(before[0].weight.data, params)),
        "optimizer_on_placed": bool(np.shares_memory(opt.flat_params, params)),
        "replicas_equal": bool(all(np.array_equal(p, params)
                                   for p in engine.comm.allgather(np.array(params)))),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
