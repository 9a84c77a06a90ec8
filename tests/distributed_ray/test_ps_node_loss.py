"""A node holding a shard's primary removed while workers push (``replicas = 2``): a real
``ray.cluster_utils.Cluster`` on this machine, a head with no CPUs (the driver, the warden,
the workers as threads of this process) and two worker nodes, token authentication on, a lost
node noticed within about 5 s (``FAST_NODE_LOSS``).

Shard 0's primary runs on node A and its backup on node B; shard 1 the other way round. Node A
is removed (its raylet and every process on it killed, no graceful exit) in the middle of a
sync run: shard 0's backup on B takes over (promoted), shard 1's primary on B goes on without
its backup, and both shards get a new backup rebuilt on a node that is still alive. The
ledger holds every acknowledged push once, both replicas of every shard end byte for byte
equal, the final parameters are the undisturbed run's, bit for bit, and the takeover (from
the removal to the first push the promoted replica acknowledged) is measured and printed.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from helpers.ps_threads import make_server, push_fixed_gradients  # noqa: E402

from distnet.parallel.ps.ledger import check_ledgers  # noqa: E402
from distnet.parallel.ps.warden import compare_replicas  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.own_ray, pytest.mark.timeout(240)]

STEPS = 30
REMOVE_AT = 10  # the step before which worker 0 removes node A
PACE_S = 0.05
TAKEOVER_LIMIT_S = 20.0  # about 5 s to notice the node's loss; generous for a loaded machine


@pytest.fixture(scope="module")
def two_nodes():
    from helpers.ray_cluster import FAST_NODE_LOSS, token_cluster  # noqa: PLC0415

    with token_cluster(2, 1, system_config=FAST_NODE_LOSS, log_to_driver=False) as cluster:
        yield cluster


def on(node_id: str) -> dict:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def node_of(handle) -> str:
    return ray.get(handle.stats.remote(), timeout=60)["node_id"]


def test_a_removed_nodes_primary_is_taken_over_by_its_backup_on_the_other_node(two_nodes):
    node_a, node_b = sorted(two_nodes.worker_nodes, key=lambda n: n.node_id)
    a, b = node_a.node_id, node_b.node_id
    placement = [{**on(a), "backup": on(b)}, {**on(b), "backup": on(a)}]
    calm = make_server("sync", 2, placement=placement)
    try:
        push_fixed_gradients(calm, STEPS, pace_s=PACE_S, timeout_s=120)
        undisturbed = calm.pull()
    finally:
        calm.shutdown()

    ps = make_server("sync", 2, placement=placement)
    removed: dict[str, float] = {}
    acks_after: list[float] = []  # times of pushes acknowledged after the removal by the new one
    try:
        sets = ps.replica_sets()
        where = [(node_of(s["primary"]), node_of(s["backup"])) for s in sets]
        assert where == [(a, b), (b, a)], where
        here = lambda _: __import__("ray").get_runtime_context().get_node_id()  # noqa: E731
        warden_on = ray.get(ps.warden.__ray_call__.remote(here), timeout=60)
        assert warden_on == ray.get_runtime_context().get_node_id()  # its creator's: the head
        promoted = sets[0]["backup"]._actor_id.hex()

        def before_step(k, t):
            if k == 0 and t == REMOVE_AT:
                removed["t"] = time.monotonic()
                two_nodes.remove_node(node_a, allow_graceful=False)
                removed["call_s"] = time.monotonic() - removed["t"]

        def after_step(k, t):
            if "t" in removed and ps.shards[0]._actor_id.hex() == promoted:
                acks_after.append(time.monotonic())

        acks = push_fixed_gradients(
            ps, STEPS, before_step, pace_s=PACE_S, timeout_s=180, after_step=after_step
        )
        replicas = compare_replicas(ps, settle_s=60)
        ledger = check_ledgers(ps.ledgers(), acks)
        history = ps.stats()["replicas"]
        now = ps.replica_sets()
        got = ps.pull()
        placed = [(node_of(s["primary"]), node_of(s["backup"])) for s in now]
    finally:
        ps.shutdown()
    takeover_s = min(acks_after) - removed["t"]
    print(f"node A removed (the call took {removed['call_s']:.2f} s); takeover: first push "
          f"acknowledged by shard 0's promoted replica {takeover_s:.2f} s after the removal; "
          f"rebuilds {[h['rebuild_s'] for h in history]} s; replicas now on {placed}; "
          f"ledger {ledger}")  # fmt: skip
    assert replicas["ok"], replicas  # every shard: 2 live replicas, byte for byte equal
    assert history[0]["promotions"] == 1 and history[0]["rebuilds"] == 1, history[0]
    assert history[1]["promotions"] == 0 and history[1]["rebuilds"] == 1, history[1]
    assert now[0]["primary"]._actor_id.hex() == promoted  # the survivor serves shard 0
    assert placed[0][0] == b and placed[1][0] == b, placed  # primaries on the live node B
    assert all(a not in pair and pair[0] != pair[1] for pair in placed), placed
    assert ledger["ok"] and ledger["missing"] == 0 and ledger["doubled"] == 0, ledger
    assert ledger["acknowledged"] == 2 * STEPS, ledger
    assert 0 < takeover_s < TAKEOVER_LIMIT_S, takeover_s
    np.testing.assert_array_equal(got, undisturbed)
