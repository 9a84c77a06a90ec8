"""distnet.bench.scaling_model: the formulas of docs/scaling.md."""

import pytest

from distnet.bench.scaling_model import (
    FASHION_SAE,
    Job,
    Link,
    Machine,
    comm_s,
    efficiency,
    report,
    ring_s,
    stops_scaling,
)

NET = Link(alpha_s=10e-6, bandwidth_Bps=1e9)
NODE = Link(alpha_s=1e-6, bandwidth_Bps=10e9)
M = Machine("m", flops=1e12, step_floor_s=0.0, per_node=4, intra=NODE, net=NET, input_sps=1e9)
JOB = Job("j", params=25_000_000, batch_per_worker=64)  # 100 MB of gradient


def test_ring_is_bandwidth_optimal_and_latency_linear():
    nbytes = 1e8
    assert ring_s(nbytes, 1, NET) == 0.0
    assert ring_s(nbytes, 2, NET) == pytest.approx(2 * 10e-6 + nbytes / 1e9)
    # the bandwidth term tends to 2 M / B, the latency term grows with N
    assert ring_s(nbytes, 1024, NET) == pytest.approx(2 * 1023 * 10e-6 + 2 * 1023 / 1024 * 0.1)


def test_strategies_at_their_limits():
    nbytes = JOB.params * 4
    # one node: the flat ring runs on the node's link
    assert comm_s("ring", JOB, M, 4) == pytest.approx(ring_s(nbytes, 4, NODE))
    # across nodes: its slowest hop (the network) sets its speed
    assert comm_s("ring", JOB, M, 16) == pytest.approx(ring_s(nbytes, 16, Link(10e-6, 1e9)))
    # hierarchical: in-node reduce + broadcast, then a ring over the 4 node leaders
    assert comm_s("hierarchical", JOB, M, 16) == pytest.approx(
        2 * (2 * 1e-6 + nbytes / 10e9) + ring_s(nbytes, 4, NET)
    )
    # a parameter server with a shard per worker moves 2 M per worker, in 2 messages
    assert comm_s("ps", JOB, M, 16, shards=16) == pytest.approx(2 * 10e-6 + 2 * nbytes / 1e9)
    # one shard for 16 workers: that shard's link carries 16 M each way
    assert comm_s("ps", JOB, M, 16, shards=1) == pytest.approx(2 * 10e-6 + 32 * nbytes / 1e9)
    with pytest.raises(ValueError, match="unknown strategy"):
        comm_s("gossip", JOB, M, 4)


def test_efficiency_falls_with_workers_and_hierarchical_helps_latency_bound_jobs():
    assert efficiency("ring", JOB, M, 1) == 1.0
    effs = [efficiency("ring", JOB, M, n) for n in (8, 64, 512)]
    assert effs == sorted(effs, reverse=True)
    tiny = Job("tiny", params=1000, batch_per_worker=64)  # latency-bound
    assert efficiency("hierarchical", tiny, M, 512) > efficiency("ring", tiny, M, 512)
    assert stops_scaling("ring", tiny, M) <= stops_scaling("hierarchical", tiny, M)
    assert efficiency("ring", JOB, M, 64, overlap=True) >= efficiency("ring", JOB, M, 64)


def test_report_names_every_job():
    text = report(None, 50_000.0)
    assert FASHION_SAE.name in text and "Horovod" in text and "100M" in text
