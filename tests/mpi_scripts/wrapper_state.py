"""Run under 2 ranks: DistributedOptimizer state and hook hygiene. Exits non-zero on failure."""

from __future__ import annotations

import numpy as np

from distnet import functional as F
from distnet import nn, optim
from distnet import parallel as dist


def model_and_data(rank: int):
    from distnet import backend

    backend.seed(0)
    model = nn.Sequential(nn.Dense(4, 8, "tanh"), nn.Dense(8, 3))
    rng = np.random.default_rng(rank)
    return model, rng.random((16, 4), dtype=np.float32), rng.integers(0, 3, 16)


def main() -> None:
    comm = dist.init("mpi")
    # 1. broadcast_state copies the scalars (lr, step count) too, not only the arrays
    model, x, y = model_and_data(comm.rank)
    inner = optim.Adam(model, lr=0.01 if comm.rank == 0 else 0.1)
    inner.steps = 1000 if comm.rank == 0 else 3
    opt = dist.DistributedOptimizer(inner, comm)
    assert (inner.lr, inner.steps) == (0.01, 1000), (comm.rank, inner.lr, inner.steps)
    for _ in range(3):
        opt.zero_grad()
        opt.backward(F.cross_entropy(model(x), y))
        opt.step()
    gathered = comm.allgather(model.flat_params().copy())
    assert np.array_equal(gathered[0], gathered[1]), "replicas drifted apart"
    opt.close()

    # 2. a closed wrapper's overlap hooks are gone: a second wrapper reduces exactly once
    def reduced_grad(first_closed: bool) -> np.ndarray:
        model, x, y = model_and_data(comm.rank)
        first = dist.DistributedOptimizer(optim.SGD(model, lr=0.1), comm, overlap=True)
        first.zero_grad()
        first.backward(F.cross_entropy(model(x), y))
        first.step()
        if first_closed:
            first.close()
        second = dist.DistributedOptimizer(optim.SGD(model, lr=0.1), comm, overlap=True)
        second.zero_grad()
        second.backward(F.cross_entropy(model(x), y))
        second.synchronize()
        grad = second.flat_grads.copy()
        second._prescaled = False
        second.close()
        if not first_closed:
            first.close()
        return grad

    model, x, y = model_and_data(comm.rank)
    clean = reduced_grad(first_closed=True)
    # the reference: a plain average of the two ranks' gradients on the same parameters
    model2, _, _ = model_and_data(comm.rank)
    ref_opt = dist.DistributedOptimizer(optim.SGD(model2, lr=0.1), comm)
    ref_opt.zero_grad()
    ref_opt.backward(F.cross_entropy(model2(x), y))
    ref_opt.step()
    ref_opt.zero_grad()
    ref_opt.backward(F.cross_entropy(model2(x), y))
    ref_opt.synchronize()
    np.testing.assert_allclose(clean, ref_opt.flat_grads, rtol=1e-5, atol=1e-7)
    comm.print0("wrapper state: ok")


if __name__ == "__main__":
    main()
