"""Local SGD against synchronous allreduce SGD, on any communicator (run under N MPI ranks, or
``contest(comm)`` on Ray actors): H = 1 (state averaged) gives allreduce's parameters; H = 8
makes H times fewer collectives (counted by the communicator) and still learns digits.
Rank 0 prints one JSON line (MPI)."""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np


def contest(comm: Any, epochs: int = 6, h: int = 8) -> dict[str, Any]:
    """Trains an MLP on digits three times over ``comm`` with the same start and batches:
    allreduce, local SGD H = 1, local SGD H = ``h``; returns the numbers the tests check."""
    from distnet import backend, nn, optim  # noqa: PLC0415
    from distnet.data import digits_arrays  # noqa: PLC0415
    from distnet.parallel import DistributedOptimizer  # noqa: PLC0415
    from distnet.parallel.localsgd import LocalSGD  # noqa: PLC0415
    from distnet.train.loop.fit import fit  # noqa: PLC0415

    x, y = digits_arrays()
    x = (x / 16.0).astype(np.float32)
    train, test = slice(0, 1400), slice(1400, None)

    def run(wrap: Any) -> tuple[np.ndarray, int, float, Any]:
        backend.seed(0)
        model = nn.Sequential(nn.Dense(64, 32, "tanh"), nn.Dense(32, 10))
        opt = wrap(optim.SGD(model, lr=0.1, momentum=0.9))
        before = comm.trace.seq
        # the finite check is off: the count is the strategy's collectives (and fit's epoch
        # means), not the per-step decision a local step needs when the check is on
        fit(model, x[train], y[train], batch_size=32, epochs=epochs, optimizer=opt, seed=3,
            check_finite=False)  # fmt: skip
        opt.close()
        count = comm.trace.seq - before
        acc = model.evaluate(x[test], y[test])["accuracy"]
        return np.array(model.flat_params(), copy=True), count, float(acc), opt

    ref, n_ref, acc_ref, _ = run(lambda o: DistributedOptimizer(o, comm))
    one, n_one, _, _ = run(lambda o: LocalSGD(o, comm, sync_every=1, average_state=True))
    many, n_many, acc_many, opt = run(lambda o: LocalSGD(o, comm, sync_every=h, average_state=True))
    steps = epochs * -(-1400 // 32)
    same = comm.allgather(np.array_equal(many, comm.allgather(many)[0]))
    return {
        "max_diff_h1": float(np.max(np.abs(one - ref))),
        "steps": steps,
        "collectives_allreduce": n_ref,
        "collectives_h1": n_one,
        "collectives_h": n_many,
        "averages_h": opt.averages,
        "accuracy_allreduce": acc_ref,
        "accuracy_h": acc_many,
        "replicas_equal_h": all(same),
    }


def main() -> int:
    from distnet import parallel as dist  # noqa: PLC0415

    comm = dist.init()
    result = contest(comm)
    if comm.rank == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
