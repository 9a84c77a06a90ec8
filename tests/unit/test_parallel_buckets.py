"""Bucket planning, the local communicator and DistributedOptimizer on one process (no MPI)."""

import numpy as np
import pytest

from distnet.parallel import (
    DistributedOptimizer,
    LocalCommunicator,
    bucketed_allreduce,
    init,
    plan_buckets,
)
from distnet.parallel.buckets import param_offsets

pytestmark = pytest.mark.timeout(60)


def covered(buckets, n):
    seen = np.zeros(n, dtype=int)
    for b in buckets:
        seen[b.start : b.stop] += 1
    return seen


@pytest.mark.parametrize("bucket_bytes", [0, 4, 40, 100, 400, 4000, 10**9])
def test_buckets_cover_every_element_once_in_reverse_order(bucket_bytes):
    sizes = [30, 7, 100, 1, 62, 0, 5]
    n = sum(sizes)
    buckets = plan_buckets(sizes, bucket_bytes, itemsize=4)
    assert np.all(covered(buckets, n) == 1)
    # launch order walks the buffer from its end (last layer first)
    assert all(a.start >= b.stop for a, b in zip(buckets, buckets[1:], strict=False))
    offsets = param_offsets(sizes)
    for b in buckets:
        overlapping = [
            i
            for i in range(len(sizes))
            if sizes[i] and offsets[i] < b.stop and offsets[i + 1] > b.start
        ]
        assert list(b.params) == overlapping


def test_bucket_sizes():
    sizes = [30, 7, 100, 1, 62]
    assert len(plan_buckets(sizes, 10**9)) == 1
    per_param = plan_buckets(sizes, 0)
    assert [b.size for b in per_param] == sizes[::-1]
    split = plan_buckets(sizes, 40)  # 10 floats: the 100-float parameter becomes 10 buckets
    assert max(b.size for b in split) <= 62  # whole small params, big ones cut to <= cap
    assert sum(1 for b in split if b.params == (2,)) == 10
    with pytest.raises(ValueError):
        plan_buckets(sizes, -1)


def test_local_communicator_is_size_one_without_mpi():
    comm = init("local")
    assert isinstance(comm, LocalCommunicator)
    assert (comm.rank, comm.size, comm.local_rank, comm.local_size) == (0, 1, 0, 1)
    buf = np.arange(5.0)
    assert comm.allreduce(buf, "mean") is buf and np.all(buf == np.arange(5.0))
    assert comm.iallreduce(buf).wait() is buf
    assert comm.broadcast(buf, 0) is buf
    assert comm.allgather(3) == [3]
    comm.barrier()
    with pytest.raises(ValueError):
        comm.allreduce(buf, "product")
    with pytest.raises(ValueError):
        init("tcp")


def test_bucketed_allreduce_single_rank_and_errors():
    comm = LocalCommunicator()
    g = np.linspace(-1, 1, 50, dtype=np.float32)
    out = bucketed_allreduce(g.copy(), comm, 16, op="mean")
    np.testing.assert_array_equal(out, g)
    np.testing.assert_allclose(bucketed_allreduce(g.copy(), comm, 16, weight=0.5), g * 0.5)
    with pytest.raises(ValueError):
        bucketed_allreduce(g.copy(), comm, 16, compression="int8")
    with pytest.raises(ValueError):
        bucketed_allreduce(g.copy(), comm, 16, param_sizes=[10, 10])
    with pytest.raises(ValueError):
        bucketed_allreduce(g.copy(), comm, 16, op="max")


def _model_and_optimizer(seed=0):
    from distnet import backend
    from distnet.nn import Dense, Sequential
    from distnet.optim import SGD

    backend.seed(seed)
    model = Sequential(Dense(6, 5, "tanh"), Dense(5, 3))
    return model, SGD(model, lr=0.1, momentum=0.9)


def test_distributed_optimizer_on_one_rank_matches_the_bare_optimizer():
    from distnet.core.functional import cross_entropy

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    model_a, bare = _model_and_optimizer()
    model_b, inner = _model_and_optimizer()
    dist = DistributedOptimizer(inner, LocalCommunicator(), bucket_mb=0)
    for step in range(5):
        for model, opt in ((model_a, bare), (model_b, dist)):
            opt.zero_grad()
            loss = cross_entropy(model(x), y)
            if opt is dist and step % 2:
                dist.backward(loss)  # weight 1 on one rank
            else:
                loss.backward()
            opt.step()
    np.testing.assert_array_equal(bare.flat_params, dist.flat_params)
    assert dist.lr == bare.lr  # attributes of the wrapped optimiser stay reachable
    assert set(dist.state_dict()) == set(bare.state_dict())
    with pytest.raises(ValueError):
        dist.step(batch_share=1.5)


def test_fp16_compression_of_cpu_gradients_warns_that_it_is_slower():
    """MPI sums float16 in software: a CPU job asking for fp16 hears that it will be slower
    (one rank reduces nothing, and says nothing)."""
    import warnings

    from distnet.parallel.buckets import BucketReducer

    class TwoRanks(LocalCommunicator):
        size = 2

    flat = np.zeros(16, np.float32)
    with pytest.warns(RuntimeWarning, match="MPI libraries sum float16 in software"):
        BucketReducer(flat, TwoRanks(), "fp16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BucketReducer(flat, LocalCommunicator(), "fp16")
        BucketReducer(flat, TwoRanks(), None)
