"""Run under 2 ranks: what ``fit`` and ``DistributedOptimizer`` do across ranks (issue 8).

1. fit(x, y) with arrays: each rank a disjoint part of every global batch, the union is the
   data set, and the result equals one process training on the whole global batches.
2. uneven ``rank_weights`` of the loader become the ranks' shares: the update equals the
   single-process update on the global batch.
3. validation data that differs per rank: every rank logs the same (averaged) val_* numbers,
   and EarlyStopping / ReduceLROnPlateau on them decide the same (no hang).
4. overlap=True with gradient accumulation (backward_passes_per_step=2) equals one pass on
   the concatenated batch; two passes without declaring them are refused clearly.
5. a NaN gradient on one rank stops every rank with NonFiniteError (the check reads the
   reduced gradients), instead of one rank raising while the other waits in the allreduce.
Prints "[0] fit shards ok" on success. Usage: fit_shards.py STORE_DIR [CHECK,...]
"""

from __future__ import annotations

import sys

import numpy as np

from distnet import backend, nn, optim
from distnet import functional as F
from distnet import parallel as dist
from distnet.train import EarlyStopping, NonFiniteError, ReduceLROnPlateau, fit


def small_model(n_in: int, n_out: int) -> nn.Module:
    backend.seed(3)  # the same initial parameters on every rank and in the reference
    return nn.Sequential(nn.Dense(n_in, 8, "tanh"), nn.Dense(8, n_out))


def arrays_are_sharded(comm) -> None:
    n, batch = 49, 8  # 7 global batches; the last holds 1 sample: rank 1 gets none (share 0)
    rng = np.random.default_rng(0)  # the same data on every rank
    x = rng.standard_normal((n, 3)).astype(np.float32)
    ids = np.arange(n, dtype=np.float32)[:, None]
    seen: list[float] = []

    def recording_mse(out, target):  # the target column 1 holds the sample's id
        seen.extend(np.asarray(target)[:, 1].tolist())
        return F.mse_loss(out, np.asarray(target)[:, :1])

    y = np.concatenate([np.sin(x[:, :1]), ids], axis=1)
    model = small_model(3, 1)
    opt = dist.DistributedOptimizer(optim.SGD(model, lr=0.1), comm)
    fit(model, x, y, batch_size=batch, epochs=1, optimizer=opt, loss=recording_mse, seed=7)
    everyone = [s for part in comm.allgather(seen) for s in part]
    assert sorted(everyone) == list(range(n)), f"samples seen over ranks: {sorted(everyone)}"
    counts = comm.allgather(len(seen))
    assert counts == [25, 24], counts
    # one process on the whole global batches makes the same updates
    ref = small_model(3, 1)
    fit(ref, x, y, batch_size=batch, epochs=1, optimizer=optim.SGD(ref, lr=0.1),
        loss=lambda out, t: F.mse_loss(out, np.asarray(t)[:, :1]), seed=7)  # fmt: skip
    np.testing.assert_allclose(model.flat_params(), ref.flat_params(), rtol=1e-5, atol=1e-6)
    opt.close()


def loader_weights_are_the_shares(comm, store: str) -> None:
    from distnet.data import StreamLoader

    loader = StreamLoader(store, 8, rank=comm.rank, world_size=2, seed=1,
                          rank_weights=[3, 1], prefetch_next_epoch=False)  # fmt: skip
    assert loader.batch_sizes == [12, 4] and len(loader) == 1, (loader.batch_sizes, len(loader))
    loader.set_epoch(0)
    (xb, yb), = list(loader)  # fmt: skip
    model = small_model(3, 16)
    opt = dist.DistributedOptimizer(optim.SGD(model, lr=0.5), comm)
    fit(model, loader, epochs=1, optimizer=opt)
    loader.close()
    xs, ys = zip(*comm.allgather((xb, yb)), strict=True)
    ref = small_model(3, 16)
    ref_opt = optim.SGD(ref, lr=0.5)
    ref_opt.zero_grad()
    F.cross_entropy(ref(np.concatenate(xs)), np.concatenate(ys)).backward()
    ref_opt.step()
    np.testing.assert_allclose(model.flat_params(), ref.flat_params(), rtol=1e-5, atol=1e-5)
    opt.close()


def validation_is_averaged(comm) -> None:
    rng = np.random.default_rng(comm.rank + 10)  # each rank its own validation shard
    n_val = 10 if comm.rank == 0 else 30
    xv = rng.standard_normal((n_val, 3)).astype(np.float32) * (1 + 3 * comm.rank)
    yv = rng.integers(0, 3, n_val)
    rng0 = np.random.default_rng(5)
    x = rng0.standard_normal((64, 3)).astype(np.float32)
    y = rng0.integers(0, 3, 64)
    model = small_model(3, 3)
    opt = dist.DistributedOptimizer(optim.SGD(model, lr=0.2), comm)
    stop = EarlyStopping("val_loss", patience=1, min_delta=1e-3)
    plateau = ReduceLROnPlateau("val_loss", patience=0, factor=0.5, min_delta=1e-3)
    history = fit(model, x, y, batch_size=16, epochs=8, optimizer=opt, seed=1,
                  validation_data=(xv, yv), callbacks=[plateau, stop])  # fmt: skip
    logs = comm.allgather(history.history)
    assert logs[0] == logs[1], f"ranks logged differently:\n{logs[0]}\n{logs[1]}"
    # the epoch's val_loss is the sample-weighted mean over both shards
    xs, ys = zip(*comm.allgather((xv, yv)), strict=True)
    whole = model.evaluate(np.concatenate(xs), np.concatenate(ys))["loss"]
    last = model.evaluate(xv, yv)["loss"]
    assert abs(history.history["val_loss"][-1] - whole) < 1e-5, (history.history, whole, last)
    opt.close()


def accumulation_with_overlap(comm) -> None:
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((16, 3)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    acc_model = small_model(3, 3)
    acc = dist.DistributedOptimizer(
        optim.SGD(acc_model, lr=0.3, momentum=0.9),
        comm,
        overlap=True,
        backward_passes_per_step=2,
        bucket_mb=0,
    )
    one_model = small_model(3, 3)
    one = dist.DistributedOptimizer(optim.SGD(one_model, lr=0.3, momentum=0.9), comm,
                                    overlap=True, bucket_mb=0)  # fmt: skip
    for step in range(3):
        acc.zero_grad()
        if step % 2:
            acc.backward(F.cross_entropy(acc_model(x[:8]), y[:8]))
            acc.backward(F.cross_entropy(acc_model(x[8:]), y[8:]))
        else:  # plain loss.backward() works too: the wrapper counts the passes
            F.cross_entropy(acc_model(x[:8]), y[:8]).backward()
            F.cross_entropy(acc_model(x[8:]), y[8:]).backward()
        acc.step()
        one.zero_grad()
        one.backward(F.cross_entropy(one_model(x), y))
        one.step()
    np.testing.assert_allclose(acc_model.flat_params(), one_model.flat_params(), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    # one pass where two are expected: refused too (it would halve the gradient silently)
    acc.zero_grad()
    acc.backward(F.cross_entropy(acc_model(x), y))
    try:
        acc.step()
    except RuntimeError as e:
        assert "after 1 backward pass(es), but backward_passes_per_step=2" in str(e), e
    else:
        raise AssertionError("a step after one of two backward passes was not refused")
    acc.close()
    # two passes while the wrapper expects one: refused, on every rank alike
    one.zero_grad()
    one.backward(F.cross_entropy(one_model(x[:8]), y[:8]))
    try:
        one.backward(F.cross_entropy(one_model(x[8:]), y[8:]))
    except RuntimeError as e:
        assert "backward_passes_per_step=2" in str(e), e
    else:
        raise AssertionError("a second backward pass under overlap was not refused")
    one.reducer.finish()  # the first pass's reductions are on the wire on both ranks
    one.close()


def nan_on_one_rank_stops_all(comm) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3)).astype(np.float32)
    y = rng.integers(0, 3, 32)
    if comm.rank == 1:
        x[20:, 0] = np.nan  # rank 1's part of the second global batch
    model = small_model(3, 3)
    opt = dist.DistributedOptimizer(optim.SGD(model, lr=0.1), comm, overlap=True)
    try:
        fit(model, x, y, batch_size=16, epochs=1, optimizer=opt, shuffle=False)
    except NonFiniteError as e:
        assert "step 1" in str(e) and "from rank(s) [1]" in str(e), e  # whose batch it was
        assert "'0.weight'" in str(e) or "weight" in str(e), e
    else:
        raise AssertionError(f"rank {comm.rank}: no NonFiniteError")
    opt.close()


def nan_on_one_rank_is_skipped_by_all(comm) -> None:
    """on_nonfinite='skip': every rank drops the same step, parameters stay finite, and the
    ranks stay in step (identical parameters after training)."""
    import warnings

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    if comm.rank == 1:
        x[24:28, 0] = np.nan  # in rank 1's part (rows 24..31) of the second global batch
    model = small_model(3, 3)
    opt = dist.DistributedOptimizer(optim.SGD(model, lr=0.1), comm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(model, x, y, batch_size=16, epochs=2, optimizer=opt, shuffle=False,
                      on_nonfinite="skip")  # fmt: skip
    assert history["skipped_steps"] == [1.0, 1.0], history.history  # the same batch each epoch
    assert any("from rank(s) [1]" in str(w.message) for w in caught), [
        str(w.message) for w in caught
    ]
    params = model.flat_params()
    assert np.isfinite(params).all()
    everyone = comm.allgather(params.copy())
    assert all(np.array_equal(p, everyone[0]) for p in everyone)
    assert np.isfinite(history["loss"]).all()
    opt.close()


def main() -> None:
    comm = dist.init("mpi")
    assert comm.size == 2, "run with 2 ranks"
    checks = {
        "arrays": lambda: arrays_are_sharded(comm),
        "loader": lambda: loader_weights_are_the_shares(comm, sys.argv[1]),
        "validation": lambda: validation_is_averaged(comm),
        "accumulation": lambda: accumulation_with_overlap(comm),
        "nan": lambda: nan_on_one_rank_stops_all(comm),
        "nan-skip": lambda: nan_on_one_rank_is_skipped_by_all(comm),
    }
    for name in sys.argv[2].split(",") if len(sys.argv) > 2 else checks:
        checks[name]()
    comm.barrier()
    comm.print0("fit shards ok")


if __name__ == "__main__":
    main()
