"""A lost shard replica rebuilt in the background (``replicas = 2``, ``ps/warden.py``): a real
local Ray, token authentication on.

Two workers (threads of this process, each a ``ParameterServerOptimizer`` over its own model)
push fixed gradients to 2 shards of 2 replicas each, a few steps a second, while a replica
is SIGKILLed. The warden starts a new replica, the live one transfers its state as of an
operation number and then the operations after it, and the new one becomes the backup. At
the end both replicas of every shard hold the same bytes (parameters, Adam's moments and
step count, version, clocks, ledger), the new backup took operations after its transfer
(training went on meanwhile), the ledger holds every acknowledged push once, and a sync run
ends with the parameters of the undisturbed run, bit for bit.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from helpers.ps_threads import make_server, push_fixed_gradients  # noqa: E402

from distnet.parallel.ps.ledger import check_ledgers  # noqa: E402
from distnet.parallel.ps.warden import compare_replicas  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

STEPS = 40
PACE_S = 0.05  # a step's pause: the rebuild (a new actor process) overlaps the pushes


def wait_rebuilt(ps, shard, rebuilds):
    """Shard ``shard``'s replica set once it has a caught-up backup after ``rebuilds``
    rebuilds (bounded wait)."""
    deadline = time.monotonic() + 60
    while True:
        history = ps.stats()["replicas"][shard]
        sets = ps.replica_sets()[shard]
        if history["rebuilds"] >= rebuilds and sets["ready"]:
            return sets
        assert time.monotonic() < deadline, f"no rebuilt backup within 60 s: {history}"
        time.sleep(0.05)


def train(ps, kills=()):
    """Both workers push STEPS fixed gradients, PACE_S apart; ``kills``: (step, shard,
    "primary" | "backup") replicas worker 0 SIGKILLs at that step (the n-th kill of a shard
    waits for its (n-1)-th rebuild); 5 steps before the end it waits for the last rebuilds,
    so that pushes follow every one. Returns each worker's acknowledged pushes."""
    done: dict[int, int] = {}

    def before_step(k, t):
        for step, shard, which in kills if k == 0 else ():
            if step == t:
                sets = wait_rebuilt(ps, shard, done.get(shard, 0))
                os.kill(ray.get(sets[which].ping.remote(), timeout=30), signal.SIGKILL)
                done[shard] = done.get(shard, 0) + 1
        if k == 0 and t == STEPS - 5:
            for shard, n in done.items():
                wait_rebuilt(ps, shard, n)

    return push_fixed_gradients(ps, STEPS, before_step, pace_s=PACE_S, timeout_s=180)


@pytest.fixture(scope="module")
def undisturbed(ray_cluster):
    ps = make_server("sync", 2)
    try:
        train(ps)
        return ps.pull()
    finally:
        ps.shutdown()


def check_rebuilt(ps, acks, shard, kills, promotions):
    """Both replicas of every shard equal byte for byte; shard ``shard`` rebuilt ``kills``
    times, ``promotions`` of them after its primary died; the new backup took operations
    after its transfer; the ledger holds every acknowledged push once."""
    replicas = compare_replicas(ps, settle_s=60)
    ledger = check_ledgers(ps.ledgers(), acks)
    stats = ps.stats()
    history = stats["replicas"][shard]
    print(f"rebuilt: {history['rebuild_s']} s; {replicas}; ledger {ledger}")
    assert replicas["ok"], replicas  # every shard: 2 replicas, no key differing
    assert history["rebuilds"] == kills and history["promotions"] == promotions, history
    rebuilt = [e for e in history["events"] if e["event"] == "backup rebuilt"]
    sent = stats["shards"][shard]["replica_seq"][0]
    assert sent > rebuilt[-1]["seq"], (sent, rebuilt)  # operations followed the transfer
    assert stats["shards"][shard]["backups_adopted"] >= 1
    assert ledger["ok"] and ledger["missing"] == 0 and ledger["doubled"] == 0, ledger
    assert ledger["acknowledged"] == 2 * STEPS, ledger


@pytest.mark.parametrize("which", ["primary", "backup"])
def test_sync_a_lost_replica_is_rebuilt_while_training_goes_on(undisturbed, which):
    ps = make_server("sync", 2)
    try:
        acks = train(ps, kills=[(10, 1, which)])
        check_rebuilt(ps, acks, 1, kills=1, promotions=int(which == "primary"))
        got = ps.pull()
    finally:
        ps.shutdown()
    np.testing.assert_array_equal(got, undisturbed)


@pytest.mark.parametrize("which", ["primary", "backup"])
def test_async_a_lost_replica_is_rebuilt_while_training_goes_on(ray_cluster, which):
    ps = make_server("async", 2)
    try:
        acks = train(ps, kills=[(10, 0, which)])
        check_rebuilt(ps, acks, 0, kills=1, promotions=int(which == "primary"))
        applied = check_ledgers(ps.ledgers(), acks)["applied"]
    finally:
        ps.shutdown()
    assert applied == [2 * STEPS, 2 * STEPS]


def test_a_rebuilt_backup_takes_over_when_its_primary_dies_in_turn(undisturbed):
    """sync: shard 0's primary killed at step 8; once its backup is rebuilt, the promoted
    primary is killed too (step 25): the rebuilt backup, filled by state transfer, serves
    the shard, and the run still ends bit for bit as the undisturbed one."""
    ps = make_server("sync", 2)
    try:
        acks = train(ps, kills=[(8, 0, "primary"), (25, 0, "primary")])
        check_rebuilt(ps, acks, 0, kills=2, promotions=2)
        got = ps.pull()
    finally:
        ps.shutdown()
    np.testing.assert_array_equal(got, undisturbed)
