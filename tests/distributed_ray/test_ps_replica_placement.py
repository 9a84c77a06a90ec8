"""Where replicated shards run on a cluster of several nodes (``ps/shardplace.py``): a real
``ray.cluster_utils.Cluster`` of three nodes on this machine (a head with no CPUs, where the
driver and the job's keeper run, and two worker nodes), token authentication on.

The keeper creates a server of 3 shards with ``replicas = 2``: every shard's backup must run
on another node than its primary, and the primaries on 3 different nodes. A backup
SIGKILLed is rebuilt on another node than its (live) primary. A server made with the
default (``replicas = "auto"``) has 2 replicas here, each backup away from its primary, and
one made with ``replicas = 1`` has none (the single-node case, 1: ``test_ps_replicas.py``).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from distnet.parallel.ps.keeper import start_keeper, stop_keeper  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def three_nodes():
    from helpers.ray_cluster import token_cluster  # noqa: PLC0415

    with token_cluster(2, 1, log_to_driver=False) as cluster:
        yield cluster


def node_of(handle) -> str:
    return ray.get(handle.stats.remote(), timeout=60)["node_id"]


def test_backups_run_away_from_their_primaries_and_a_lost_one_is_rebuilt_away(three_nodes):
    keeper = start_keeper()
    try:
        flat = np.arange(3000, dtype=np.float32) / 3000
        settings = {"shards": 3, "mode": "async", "num_workers": 1, "replicas": 2,
                    "optimizer": {"name": "sgd", "lr": 0.1}, "timeout_s": 30}  # fmt: skip
        ps = ray.get(keeper.create.remote(flat, settings), timeout=120)
        sets = ps.replica_sets()
        where = [(node_of(s["primary"]), node_of(s["backup"])) for s in sets]
        print(f"(primary, backup) nodes per shard: {where}")
        assert all(p != b for p, b in where), where  # a node's loss takes one replica at most
        assert len({p for p, _ in where}) == 3, where  # the primaries spread over the nodes
        primary_node = where[1][0]
        os.kill(ray.get(sets[1]["backup"].ping.remote(), timeout=30), signal.SIGKILL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            now = ps.replica_sets()[1]
            if now["ready"] and now["view"] > sets[1]["view"]:
                break
            time.sleep(0.1)
        assert now["ready"] and now["view"] > sets[1]["view"], now
        assert node_of(now["backup"]) != primary_node  # rebuilt on another node
        assert node_of(now["primary"]) == primary_node
        assert ps.stats()["replicas"][1]["rebuilds"] == 1
    finally:
        stop_keeper(keeper)


def test_the_default_replicates_on_several_nodes_and_1_is_kept(three_nodes):
    keeper = start_keeper()
    try:
        flat = np.arange(2000, dtype=np.float32) / 2000
        settings = {"shards": 2, "mode": "sync", "num_workers": 1,
                    "optimizer": {"name": "sgd", "lr": 0.1}, "timeout_s": 30}  # fmt: skip
        ps = ray.get(keeper.create.remote(flat, settings), timeout=120)  # no "replicas": auto
        assert ps.replicas == 2 and ps.stats()["replicas_per_shard"] == 2
        where = [(node_of(s["primary"]), node_of(s["backup"])) for s in ps.replica_sets()]
        assert all(p != b for p, b in where), where  # each backup on another node
        one = ray.get(keeper.create.remote(flat, {**settings, "replicas": 1}), timeout=120)
        assert one.replicas == 1 and one.warden is None and not any(one.backups)
        assert one.stats()["replicas_per_shard"] == 1
    finally:
        stop_keeper(keeper)
