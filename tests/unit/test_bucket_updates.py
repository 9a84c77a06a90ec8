"""The update as each bucket's reduction completes (``distnet.parallel.bucket_updates``) on
one process: the groups it updates, and bit-equality with the update after the reduction.
Two ranks under mpiexec: tests/distributed_mpi/test_in_backward_mpi.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from distnet import backend, functional, nn, optim
from distnet import parallel as dist
from distnet.optim import in_backward
from distnet.parallel.bucket_updates import plan_groups
from distnet.parallel.buckets import plan_buckets

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("bucket_floats", [0, 1000, 50_000, 10**7])
def test_groups_cover_the_buffer_in_contiguous_ranges_of_at_least_the_kernel_size(bucket_floats):
    sizes = [784 * 300, 300, 300 * 300, 300, 300 * 10, 10]
    buckets = plan_buckets(sizes, bucket_floats * 4)
    groups = plan_groups(buckets, 65_536)
    assert [b for g in groups for b in g] == list(range(len(buckets)))  # launch order, once
    covered = []
    for members in groups:
        lo = min(buckets[b].start for b in members)
        hi = max(buckets[b].stop for b in members)
        assert sum(buckets[b].size for b in members) == hi - lo  # contiguous
        assert hi - lo >= 65_536
        covered.append((lo, hi))
    assert sorted(covered)[0][0] == 0 and max(hi for _, hi in covered) == sum(sizes)


def _model() -> nn.Sequential:
    backend.seed(0)
    return nn.Sequential(nn.Dense(100, 400, "relu"), nn.Dense(400, 400, "tanh"),
                         nn.Dense(400, 10))  # fmt: skip


@pytest.mark.parametrize("name", ["sgdm", "adam"])
def test_one_rank_updates_each_group_in_synchronize_bit_for_bit(name, caplog):
    comm = dist.init("local")
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((32, 100), dtype=np.float32), rng.integers(0, 10, 32))
            for _ in range(3)]  # fmt: skip
    flats = []
    for ib in (False, True):
        model = _model()
        inner = (optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=1e-3, update_in_backward=ib)
                 if name == "sgdm" else
                 optim.Adam(model, lr=1e-3, weight_decay=1e-3, update_in_backward=ib))  # fmt: skip
        opt = dist.DistributedOptimizer(inner, comm, bucket_mb=0.25)
        assert opt.update_in_backward == ib and inner._in_backward is None
        for x, y in data:
            opt.zero_grad()
            opt.backward(functional.cross_entropy(model(x), y))
            before = model.flat_params().copy()
            opt.synchronize()
            assert np.array_equal(before, model.flat_params()) != ib  # updated by then
            opt.step()
        assert opt.steps == 3
        flats.append((model.flat_params().copy(), [s.copy() for s in opt.state_buffers()]))
        opt.close()
    assert np.array_equal(flats[0][0], flats[1][0])
    for a, b in zip(flats[0][1], flats[1][1], strict=True):
        assert np.array_equal(a, b)


def test_a_held_reason_falls_back_and_is_logged_once_at_debug_level(caplog):
    comm = dist.init("local")
    model = _model()
    opt = dist.DistributedOptimizer(optim.SGD(model, lr=0.1, update_in_backward=True), comm)
    in_backward._LOGGED.discard(("SGD", "a test's clipping"))
    with caplog.at_level(logging.DEBUG, logger=in_backward.__name__):
        for _ in range(2):
            opt.require_whole_gradient("a test's clipping")
    said = [r for r in caplog.records if "a test's clipping" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.DEBUG
    assert not opt.update_in_backward
    x = np.ones((4, 100), np.float32)
    opt.zero_grad()
    opt.backward(functional.cross_entropy(model(x), np.zeros(4, np.int64)))
    before = model.flat_params().copy()
    opt.synchronize()
    assert np.array_equal(before, model.flat_params())  # nothing moved before step()
    opt.step()
    assert not np.array_equal(before, model.flat_params()) and opt.steps == 1
    opt.close()


@pytest.mark.parametrize("check", [True, False])
def test_fit_passes_its_finite_check_through_a_wrapper_to_the_optimiser_inside(check):
    # local SGD keeps the update inside backward (its step is the local gradient's): fit's
    # non-finite check must reach the optimiser inside, or a skipped step would have moved it
    from distnet.parallel.localsgd import LocalSGD
    from distnet.train import fit

    model = _model()
    inner = optim.SGD(model, lr=0.05, momentum=0.9, update_in_backward=True)
    wrapped = LocalSGD(inner, dist.init("local"), sync_every=2)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 100), dtype=np.float32), rng.integers(0, 10, 32)
    fit(model, x, y, optimizer=wrapped, epochs=1, batch_size=16, check_finite=check)
    assert inner.update_in_backward == (not check)
    assert ("check_finite" in inner.whole_gradient_reasons) == check
    assert inner.steps == 2
