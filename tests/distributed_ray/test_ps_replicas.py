"""Replicated shards (``replicas = 2``, primary-backup): a real local Ray, token authentication on.

Two workers (threads of this process, each a ``ParameterServerOptimizer`` over its own model)
push fixed gradients to 2 shards of 2 replicas each. The backups must hold, byte for byte,
what the primaries hold (parameters, Adam's moments and step count, version, clocks, ledger);
a primary SIGKILLed mid-run hands over to its backup, the run finishes with the parameters of
an undisturbed run (sync: bit for bit), and the ledger shows nothing lost or doubled.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from distnet import backend  # noqa: E402
from distnet.nn import Dense, Sequential  # noqa: E402
from distnet.optim import Adam  # noqa: E402
from distnet.parallel.ps import ParameterServer, ParameterServerOptimizer  # noqa: E402
from distnet.parallel.ps.ledger import check_ledgers  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]

STEPS = 40


def make_model():
    backend.seed(0)
    return Sequential(Dense(64, 48, activation="relu"), Dense(48, 10))


def make_server(mode, replicas):
    flat = Adam(make_model(), lr=0.01).flat_params.copy()
    return ParameterServer.create(
        flat, shards=2, mode=mode, num_workers=2, optimizer={"name": "adam", "lr": 0.01},
        replicas=replicas, timeout_s=10, retries=4,
    )  # fmt: skip


def train(ps, kill_at=None):
    """Both workers push STEPS fixed gradients (worker k, step t: its own seeded draw);
    ``kill_at``: (shard, step) whose primary is SIGKILLed when worker 0 reaches the step.
    Returns each worker's acknowledged pushes."""
    acks, errors = {}, []
    pid = None if kill_at is None else ray.get(ps.shards[kill_at[0]].ping.remote(), timeout=30)

    def run(k):
        try:
            opt = ParameterServerOptimizer(Adam(make_model(), lr=0.01), ps, k)
            rng = np.random.default_rng(k)
            for t in range(STEPS):
                opt.zero_grad()
                opt.optimizer.flat_grads[...] = rng.standard_normal(ps.size).astype(np.float32)
                if k == 0 and kill_at is not None and t == kill_at[1]:
                    os.kill(pid, signal.SIGKILL)
                opt.step()
            acks[k] = opt.acknowledged()[1]
        except Exception as e:  # noqa: BLE001 (reported by the test)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not errors and not any(t.is_alive() for t in threads), [str(e) for e in errors]
    return acks


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_backups_hold_byte_for_byte_what_their_primaries_hold(ray_cluster, mode):
    ps = make_server(mode, replicas=2)
    try:
        acks = train(ps)
        primaries = ray.get([s.replica_state.remote(ps.token) for s in ps.shards], timeout=30)
        backups = ray.get([bs[0].replica_state.remote(ps.token) for bs in ps.backups], timeout=30)
        ledger = check_ledgers(ps.ledgers(), acks)
        stats = ps.stats()
    finally:
        ps.shutdown()
    for i, (p, b) in enumerate(zip(primaries, backups, strict=True)):
        assert sorted(p) == sorted(b)
        for key in p:  # meta: the counters' JSON (version, clocks, applied, membership)
            a, c = np.asarray(p[key]), np.asarray(b[key])
            assert a.dtype == c.dtype and a.shape == c.shape, (i, key)
            assert a.tobytes() == c.tobytes(), f"shard {i}: {key} differs between replicas"
    assert int(primaries[0]["version"]) == (STEPS if mode == "sync" else 2 * STEPS)
    assert ledger["ok"] and ledger["acknowledged"] == 2 * STEPS, ledger
    assert [s["replica_role"] for s in stats["shards"]] == ["primary", "primary"]


def test_a_killed_primary_hands_over_to_its_backup_and_nothing_is_lost(ray_cluster):
    """sync: the run with shard 1's primary SIGKILLed at step 15 ends with the parameters of
    the undisturbed run, bit for bit; no snapshot was involved, nothing was redone."""
    calm = make_server("sync", replicas=2)
    try:
        train(calm)
        want = calm.pull()
    finally:
        calm.shutdown()
    ps = make_server("sync", replicas=2)
    try:
        t0 = time.monotonic()
        acks = train(ps, kill_at=(1, 15))
        took = time.monotonic() - t0
        got = ps.pull()
        ledger = check_ledgers(ps.ledgers(), acks)
        stats = ps.stats()
    finally:
        ps.shutdown()
    print(f"primary killed: {took:.1f} s for {STEPS} steps; ledger {ledger}")
    assert stats["shards"][1]["replica_role"] == "backup"  # the backup serves shard 1 now
    assert stats["shards"][0]["replica_role"] == "primary"
    assert ledger["ok"] and ledger["missing"] == 0 and ledger["doubled"] == 0, ledger
    assert ledger["acknowledged"] == 2 * STEPS, ledger
    np.testing.assert_array_equal(got, want)


def test_async_primary_killed_every_push_acknowledged_is_held_once(ray_cluster):
    ps = make_server("async", replicas=2)
    try:
        acks = train(ps, kill_at=(0, 15))
        ledger = check_ledgers(ps.ledgers(), acks)
        stats = ps.stats()
    finally:
        ps.shutdown()
    assert stats["shards"][0]["replica_role"] == "backup"
    assert ledger["ok"] and ledger["acknowledged"] == 2 * STEPS, ledger
    assert ledger["applied"] == [2 * STEPS, 2 * STEPS], ledger


@pytest.fixture(scope="module")
def id_job(tmp_path_factory):
    from helpers.jobs import mlp_job  # noqa: PLC0415
    from helpers.sample_counts import write_id_digits  # noqa: PLC0415

    root = tmp_path_factory.mktemp("replicas")
    ids = write_id_digits(root / "ids" / "train", 1344)
    path = root / "job.toml"
    path.write_text(mlp_job(f"{root}/ids/train", epochs=2, log_every=1000))
    return path, ids


def test_a_job_whose_shard_primary_is_killed_goes_on_without_a_restart(ray_cluster, id_job):
    """``[dist] replicas = 2`` on a Ray job (sync, 2 workers, 2 shards, no snapshots): shard
    1's primary SIGKILLed mid-epoch. Without a backup the group would restart from the
    epoch's checkpoint; here the workers go on with the backup: one generation, every sample
    once, the ledger holding every acknowledged push."""
    from helpers.sample_counts import (  # noqa: PLC0415
        assert_every_sample_once,
        finished_by_generation,
    )

    from distnet.parallel.rayengine import RayJob, RayOptions, worker_specs  # noqa: PLC0415
    from distnet.train.jobs.job import load_job  # noqa: PLC0415
    from distnet.train.jobs.rayjob import run_rank  # noqa: PLC0415

    path, ids = id_job
    out = path.parent / "run"
    job = load_job(path, {"run": {"out": str(out)}})
    kill = {"generation": 1, "rank": 0, "step": 50, "action": "kill_shard", "shard": 1,
            "delay_s": 0.01}  # fmt: skip
    opts = RayOptions(
        workers=worker_specs(2), strategy="ps", faults=[kill], sample_log=str(out / "s"),
        ps={"mode": "sync", "shards": 2, "replicas": 2},
    )  # fmt: skip
    report = RayJob(opts, log=lambda line: None, task=run_rank).run(job)
    assert report["generation"] == 1 and not report["failures"], report["failures"]
    assert_every_sample_once(finished_by_generation(out / "s"), ids, 2, report["recoveries"])
    (server,) = report["ps_stats"]
    roles = [s["replica_role"] for s in server["shards"]]
    assert roles == ["primary", "backup"], roles  # shard 1 served by its backup at the end
    assert server["ledger"]["ok"] and server["ledger"]["acknowledged"] == 2 * 84, server
