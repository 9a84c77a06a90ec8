"""Run under 2 or 3 ranks: a NaN on ONE rank gets the same decision on every rank (issue 20).

Each case trains a small model with ``fit`` on arrays; at one step one rank's data goes
non-finite (``data``), or only its gradient through a grad-ready hook, the loss staying
finite (``grad``), or only its loss, the gradients staying finite (``loss``). ``stop``:
every rank raises the same NonFiniteError naming the step, the culprit rank (when its own
buffer or loss shows it) and the parameter, within seconds of the others. ``skip``: every
rank skips that step and ends with equal, finite parameters.

A case is ``WRAPPER-POLICY-INJECTION[-empty]``: WRAPPER ``dist`` (DistributedOptimizer),
``zero`` (ShardedOptimizer, ZeRO-1), ``fp16`` (DistributedOptimizer with fp16 compression),
``overlap`` (DistributedOptimizer starting buckets during backward); ``empty``: the NaN is in
the short last global batch, where every rank but rank 0 has no sample (and rank 0 is the
culprit). Prints "[0] nonfinite ranks ok" on success. Usage: nonfinite_ranks.py CASE,...
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np

from distnet import backend, nn, optim
from distnet import functional as F
from distnet import parallel as dist
from distnet.parallel.zero import ShardedOptimizer
from distnet.train import NonFiniteError, fit

BATCH = 12  # global batch; 3 steps an epoch, plus one of a single sample with ``empty``


def small_model() -> nn.Module:
    backend.seed(3)  # the same initial parameters on every rank
    return nn.Sequential(nn.Dense(3, 8, "tanh"), nn.Dense(8, 3))


def wrap(kind: str, model: nn.Module, comm) -> object:
    sgd = optim.SGD(model, lr=0.1, momentum=0.9)
    if kind == "zero":
        return ShardedOptimizer(sgd, comm)
    if kind == "fp16":
        return dist.DistributedOptimizer(sgd, comm, compression="fp16")
    return dist.DistributedOptimizer(sgd, comm, overlap=kind == "overlap", bucket_mb=0)


def run_case(comm, case: str) -> None:
    kind, policy, injection, *rest = case.split("-")
    empty = rest == ["empty"]
    n = 3 * BATCH + (1 if empty else 0)
    rng = np.random.default_rng(0)  # the same data on every rank
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = rng.integers(0, 3, n)
    culprit = 0 if empty else comm.size - 1
    bad_step = 3 if empty else 1
    model = small_model()
    if injection == "data" and comm.rank == culprit:
        # only the culprit's own part of the bad global batch is read by it
        x[bad_step * BATCH : (bad_step + 1) * BATCH, 0] = np.nan
    opt = wrap(kind, model, comm)  # a hook made before the wrapper's runs before its own
    if injection == "grad" and comm.rank == culprit:
        calls = [0]
        last = model.parameters()[-2]  # the output layer's weight

        def poison(param) -> None:
            calls[0] += 1
            if calls[0] == bad_step + 1:  # backward of the bad step (epoch 0)
                param.grad[...] = np.nan

        opt_hooks = list(last._hooks or [])
        last._hooks = [poison, *opt_hooks]  # before an overlap hook starts the bucket
    loss = None  # fit's default: cross entropy
    if injection == "loss":  # a non-finite loss whose gradients stay finite
        seen = [0]

        def loss(out, target):
            seen[0] += 1
            value = F.cross_entropy(out, target)
            if comm.rank == culprit and seen[0] == bad_step + 1:
                value = value + (out * 0.0).sum() + np.float32(np.inf)
            return value

    failure, t_end = None, 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            history = fit(model, x, y, batch_size=BATCH, epochs=1, optimizer=opt, loss=loss,
                          shuffle=False, on_nonfinite=policy)  # fmt: skip
        except NonFiniteError as e:
            failure = str(e)
        t_end = time.time()
    where = f"rank {comm.rank}, case {case}"
    ends = comm.allgather(t_end)
    assert max(ends) - min(ends) < 10.0, f"{where}: ranks ended {ends} apart"
    if policy == "stop":
        assert failure is not None, f"{where}: no NonFiniteError"
        assert f"at step {bad_step} " in failure, f"{where}: {failure}"
        assert "1.weight" in failure or injection == "loss", f"{where}: {failure}"
        if injection in ("data", "loss") or kind == "zero":  # the culprit's own buffer shows it
            assert f"rank(s) [{culprit}]" in failure, f"{where}: {failure}"
        messages = comm.allgather(failure)
        assert len(set(messages)) == 1, f"{where}: the ranks' messages differ: {messages}"
    else:
        assert failure is None, f"{where}: {failure}"
        assert history["skipped_steps"] == [1], f"{where}: {history.history}"
        skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
        assert len(skipped) == 1 and f"at step {bad_step} " in skipped[0], f"{where}: {skipped}"
        params = np.array(model.flat_params(), copy=True)
        assert np.isfinite(params).all(), f"{where}: non-finite parameters"
        everyone = comm.allgather(params)
        assert all(np.array_equal(p, everyone[0]) for p in everyone), f"{where}: ranks differ"
        assert np.isfinite(history["loss"]).all(), f"{where}: {history.history}"
    opt.close()
    comm.barrier()


def main() -> None:
    comm = dist.init("mpi")
    for case in sys.argv[1].split(","):
        run_case(comm, case)
    comm.barrier()
    comm.print0("nonfinite ranks ok")


if __name__ == "__main__":
    main()
