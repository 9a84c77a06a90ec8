"""Run under N ranks: the update inside backward under allreduce (each bucket updated as soon
as its reduction completes) gives bit for bit the parameters and optimiser state of the same
job updating after backward; and the cases that fall back (fit's non-finite check, a held
reason, fp16 compression, ZeRO-1) fall back, equal too. Exits non-zero on failure."""

from __future__ import annotations

import logging
import sys
import warnings

import numpy as np

from distnet import backend, nn, optim
from distnet import functional as F
from distnet import parallel as dist
from distnet.optim import in_backward
from distnet.parallel.zero import ShardedOptimizer
from distnet.train import fit

STEPS = 4
SHARED = "shared" in sys.argv[1:]  # the buckets' sums go through shared memory
MAKERS = {
    "sgd momentum": lambda m, ib: optim.SGD(
        m, lr=0.05, momentum=0.9, weight_decay=1e-3, update_in_backward=ib
    ),  # fmt: skip
    "adam": lambda m, ib: optim.Adam(m, lr=1e-3, weight_decay=1e-3, update_in_backward=ib),
}


def build() -> nn.Module:
    backend.seed(0)  # same initial parameters on every rank and for both contenders
    # 256*512+512 + 512*512+512 + 512*10+10 = 399,370 floats: 6 groups of 0.25 MiB buckets
    return nn.Sequential(nn.Dense(256, 512, "relu"), nn.Dense(512, 512, "tanh"),
                         nn.Dense(512, 10))  # fmt: skip


def batches(rank: int, steps: int = STEPS):
    rng = np.random.default_rng(100 + rank)
    return [(rng.standard_normal((16, 256), dtype=np.float32), rng.integers(0, 10, 16))
            for _ in range(steps)]  # fmt: skip


class Counting:
    """Counts the group updates the feature made, and those made inside backward."""

    def __init__(self, opt) -> None:
        self.total = self.in_backward = 0
        self.inside = False
        updates = opt._reduced_updates
        plain = updates.update

        def update(g: int) -> None:
            self.total += 1
            self.in_backward += self.inside
            plain(g)

        updates.update = update


def train(opt, model, data, passes: int = 1, counting: Counting | None = None) -> None:
    """``passes`` backward passes per step (the batch split between them)."""
    for x, y in data:
        opt.zero_grad()
        before = model.flat_params().copy()
        for k in range(passes):
            part = slice(k * len(x) // passes, (k + 1) * len(x) // passes)
            if counting is not None:
                counting.inside = True
            opt.backward(F.cross_entropy(model(x[part]), y[part]))
            if counting is not None:
                counting.inside = False
        opt.synchronize()
        if counting is not None:  # the update came with the reduction, before step()
            assert not np.array_equal(before, model.flat_params()), "not updated by then"
        opt.step()


def same(a, b, what: str) -> None:
    assert np.array_equal(a, b), f"{what}: differ, max {np.abs(a - b).max()}"


def compare(name: str, comm, in_backward_expected: bool = True, **kwargs) -> None:
    passes = kwargs.pop("passes", 1)
    make = MAKERS[name]
    data = batches(comm.rank)
    ref_model = build()
    ref = dist.DistributedOptimizer(make(ref_model, False), comm, **kwargs,
                                    backward_passes_per_step=passes)  # fmt: skip
    train(ref, ref_model, data, passes)
    model = build()
    opt = dist.DistributedOptimizer(make(model, True), comm, **kwargs,
                                    backward_passes_per_step=passes)  # fmt: skip
    assert opt.update_in_backward == in_backward_expected, (name, kwargs)
    assert opt.optimizer._in_backward is None, "the local hooks would apply the local gradient"
    counting = Counting(opt) if in_backward_expected else None
    train(opt, model, data, passes, counting)
    label = f"{name} {kwargs} passes={passes}"
    same(model.flat_params(), ref_model.flat_params(), label)
    for a, b in zip(opt.state_buffers(), ref.state_buffers(), strict=True):
        same(a, b, f"{label} state")
    assert opt.steps == ref.steps == STEPS, (opt.steps, ref.steps)
    if counting is not None:
        groups = len(opt._reduced_updates.groups)
        assert counting.total == groups * STEPS, (counting.total, groups)
        inside = counting.in_backward == counting.total
        if SHARED and kwargs.get("overlap"):  # each sum is done when it starts
            assert inside, (label, counting.in_backward, counting.total)
        comm.print0(
            f"{label}: {groups} groups, {counting.in_backward} of {counting.total} "
            f"group updates inside backward{' (all inside backward)' if inside else ''}"
        )
    ref.close()
    opt.close()


def fit_cases(comm, records: list[logging.LogRecord]) -> None:
    """fit: with its non-finite check (the default) the feature falls back, logged once at
    debug level; with check_finite=False it runs. Both equal the run without it, and so does
    a run that skips a non-finite step."""
    rng = np.random.default_rng(7)  # the same data on every rank: fit shards it
    x = rng.standard_normal((64, 256), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    for check in (True, False):
        results = []
        for ib in (False, True):
            model = build()
            opt = dist.DistributedOptimizer(MAKERS["adam"](model, ib), comm, bucket_mb=0.25)
            fit(model, x, y, optimizer=opt, epochs=1, batch_size=16, verbose=False,
                shuffle=False, check_finite=check)  # fmt: skip
            if ib:
                assert opt.update_in_backward == (not check), (check, opt.update_in_backward)
            results.append(model.flat_params().copy())
            opt.close()
        same(results[0], results[1], f"fit check_finite={check}")
    # a non-finite batch on one rank: every rank skips that step, and no parameter moved
    x[20] = np.nan  # rank 1's part of the second global batch
    results = []
    for ib in (False, True):
        model = build()
        opt = dist.DistributedOptimizer(MAKERS["sgd momentum"](model, ib), comm, bucket_mb=0.25)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            fit(model, x, y, optimizer=opt, epochs=1, batch_size=16, verbose=False,
                shuffle=False, on_nonfinite="skip")  # fmt: skip
        assert any("skipped" in str(w.message) for w in said), [str(w.message) for w in said]
        assert opt.steps == 3, opt.steps
        results.append(model.flat_params().copy())
        opt.close()
    same(results[0], results[1], "fit skipping a non-finite step")
    said = [r for r in records if "check_finite" in r.getMessage()]
    # once per optimiser class and reason, however many optimisers and steps fell back
    names = sorted(r.getMessage().split("(")[0] for r in said)
    assert names == ["Adam", "SGD"], [r.getMessage() for r in said]
    assert all(r.levelno == logging.DEBUG for r in said)


def held_reason(comm) -> None:
    """A caller that clips (holds a reason): no update before step(); equal bits."""
    data = batches(comm.rank)
    models, opts = [], []
    for ib in (False, True):
        model = build()
        opt = dist.DistributedOptimizer(MAKERS["sgd momentum"](model, ib), comm, bucket_mb=0.25)
        if ib:
            opt.require_whole_gradient("clip")
            assert not opt.update_in_backward
        for x, y in data:
            opt.zero_grad()
            opt.backward(F.cross_entropy(model(x), y))
            before = model.flat_params().copy()
            opt.synchronize()
            same(before, model.flat_params(), "held reason: updated before step()")
            opt.step()
        models.append(model)
        opts.append(opt)
    same(models[0].flat_params(), models[1].flat_params(), "held reason")
    for opt in opts:
        opt.close()


def zero_case(comm) -> None:
    """ZeRO-1 reduce-scatters the whole gradient after backward: the feature falls back (the
    local hooks removed), and the result equals ZeRO-1 without it."""
    data = batches(comm.rank)
    flats = []
    for ib in (False, True):
        model = build()
        opt = ShardedOptimizer(MAKERS["sgd momentum"](model, ib), comm)
        assert opt.optimizer._in_backward is None
        train(opt, model, data)
        flats.append(model.flat_params().copy())
    same(flats[0], flats[1], "ZeRO-1")


def main() -> None:
    comm = dist.init("mpi")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(in_backward.__name__)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    for name in MAKERS:
        for overlap in (False, True):
            # several groups of buckets; one bucket per parameter (small biases grouped);
            # one bucket for the whole buffer
            for bucket_mb in (0.25, 0.0, 25.0):
                compare(name, comm, overlap=overlap, bucket_mb=bucket_mb)
        compare(name, comm, overlap=True, bucket_mb=0.25, passes=2)
    compare("adam", comm, in_backward_expected=False, bucket_mb=0.25, compression="fp16")
    held_reason(comm)
    zero_case(comm)
    fit_cases(comm, records)
    comm.print0(f"in-backward allreduce: ok on {comm.size} ranks")


if __name__ == "__main__":
    sys.exit(main())
