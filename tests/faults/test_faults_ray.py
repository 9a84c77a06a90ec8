"""Faults on the Ray engine (marker `fault`): a worker killed, then a parameter-server shard,
then both at once, at moments drawn from a seeded RNG, in one job per seed.

The job (digits with a sample-id column, a small MLP, strategy "ps", sync, 2 workers, 2
shards snapshotted every update) must finish; the per-epoch sample logs must hold every
sample exactly once in the epochs the final parameters are made of; the final server must
have applied every push exactly once (counted on the shards); the final loss must be within
tolerance of an undisturbed run. Workers die by ``os._exit`` at a step; shards by SIGKILL from
a timer started at a step (so it lands part way through the next one). The shared local Ray.

The jobs run with the engine's default ``collective_timeout_s`` (300 s), longer than these
tests' timeout: a survivor left waiting for a dead peer's push until the driver gives up on it
(as before the parameter server's rounds were aborted with the group) fails them.
"""

from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("sklearn")

from helpers.jobs import mlp_job  # noqa: E402
from helpers.sample_counts import (  # noqa: E402
    assert_every_sample_once,
    final_loss,
    finished_by_generation,
    write_id_digits,
)

from distnet.parallel.ps import ParameterServer  # noqa: E402
from distnet.parallel.rayengine import RayJob, RayOptions, worker_specs  # noqa: E402
from distnet.train.jobs.job import load_job  # noqa: E402
from distnet.train.jobs.rayjob import run_rank  # noqa: E402

# func_only: the module's fixtures (a Ray start, the undisturbed job) bound their own waits;
# counted in the first test's 150 s they failed it on a loaded machine (setup alone > 150 s).
# load_scaled: the jobs are long by design (three generations of 84 steps, four processes
# on two cores): seed 1 took 38 s at load 17 and 148 s at load 25-30, so the 150 s (an idle
# machine's limit, with room) grows with the load (conftest.load_factor, at most 4x)
pytestmark = [
    pytest.mark.fault,
    pytest.mark.ray,
    pytest.mark.timeout(150, func_only=True),
    pytest.mark.load_scaled,
]
EPOCHS, SAMPLES = 2, 1344  # 1344 samples = 42 global batches of 32
PS = {"mode": "sync", "shards": 2, "snapshot_every": 1, "retries": 8}


@pytest.fixture(scope="module")
def id_job(tmp_path_factory):
    """Digits whose last feature column is each sample's id; returns (job path, sorted ids)."""
    root = tmp_path_factory.mktemp("rayfaults")
    ids = write_id_digits(root / "ids" / "train", SAMPLES)
    path = root / "job.toml"
    path.write_text(mlp_job(f"{root}/ids/train", epochs=EPOCHS, log_every=1000))
    return path, ids


def run(path, out, **options):
    job = load_job(path, {"run": {"out": str(out)}})
    opts = RayOptions(workers=worker_specs(2), **options)
    t0 = time.monotonic()
    report = RayJob(opts, log=lambda line: None, task=run_rank).run(job)
    return report, time.monotonic() - t0


def fault_plan(seed: int) -> list[dict]:
    """A worker exit (generation 1, in epoch 0 of the 84 steps), a shard kill, then a worker
    exit and a shard kill at the same step (generation 2), a last shard kill (generation 3,
    which finishes). A generation that resumes mid-epoch runs only the steps left, so every
    step drawn lies within what its generation surely runs: generation 2 at least the 44
    steps after step 40, generation 3 at least the 9 after generation 2's step 35."""
    rng = random.Random(seed)
    exit_step, b = rng.randint(5, 40), rng.randint(3, 15)
    c = b + rng.randint(5, 20)

    def kill_shard(gen, step):
        return {"generation": gen, "rank": 0, "step": step, "action": "kill_shard",
                "shard": rng.randrange(2), "delay_s": rng.uniform(0.0, 0.03)}  # fmt: skip

    return [  # seeds 0 and 2: rank 0 dies; the shards (the job's) live on, resumed mid-epoch
        {"generation": 1, "rank": seed % 2, "step": exit_step, "action": "exit"},
        kill_shard(2, b),
        kill_shard(2, c),
        {"generation": 2, "rank": 1, "step": c, "action": "exit"},
        kill_shard(3, rng.randint(2, 8)),
    ]


@pytest.fixture(scope="module")
def calm_loss(ray_cluster, id_job, tmp_path_factory):
    root = tmp_path_factory.mktemp("calm")
    report, took = run(id_job[0], root / "run", strategy="ps", ps=PS)
    assert report["generation"] == 1 and not report["failures"]
    print(f"undisturbed ps job: {took:.1f} s")
    return final_loss(load_job(id_job[0], {"run": {"out": str(root / "run")}}), SAMPLES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ps_job_survives_a_worker_a_shard_and_both_killed_at_random_moments(
    ray_cluster, id_job, calm_loss, tmp_path, seed
):
    path, ids = id_job
    plan = fault_plan(seed)
    report, took = run(
        path, tmp_path / "run", strategy="ps", ps=PS, faults=plan, sample_log=str(tmp_path / "s")
    )
    print(f"seed {seed}: {took:.1f} s, plan {plan}, failures {report['failures']}")
    assert report["generation"] == 3, report["failures"]
    assert len(report["failures"]) == 2 and report["workers"] == 2
    assert_every_sample_once(
        finished_by_generation(tmp_path / "s"), ids, EPOCHS, report["recoveries"]
    )
    # the final generation's server: the killed shard came back from its snapshot, and every
    # push of every worker was applied exactly once (retries across the kill not twice)
    (server,) = report["ps_stats"]
    killed = plan[-1]["shard"]
    steps = report["steps"]
    for shard in server["shards"]:
        assert shard["restored_from_snapshot"] == (shard["shard"] == killed), shard
        assert shard["pushes_applied"] == [steps, steps], shard
        assert shard["clocks"] == [steps, steps] and shard["version"] == steps
        assert shard["rounds_failed"] == 0
        if shard["shard"] != killed:  # a retry of a whole step re-sends to it: not re-applied
            assert min(shard["pushes_received"]) >= steps
    # snapshots after every update: the ledger shows no acknowledged push lost or doubled
    ledger = server["ledger"]
    assert ledger["ok"] and ledger["acknowledged"] == 2 * steps, ledger
    # the final parameters' loss (the last epoch's logged mean covers only the steps after a
    # resume inside it: seed 0 resumes in epoch 1 since rank 0's death leaves the shards)
    loss = final_loss(load_job(path, {"run": {"out": str(tmp_path / "run")}}), SAMPLES)
    print(f"seed {seed}: final loss {loss:.4f}, undisturbed {calm_loss:.4f}")
    # the checkpoint holds the shards' optimiser state and a resumed stage puts it back into
    # the new server; snapshots and retries lose and double nothing: measured equal to 4
    # decimals (regression: the resumed server started from the initial parameters, 0.92)
    assert loss == pytest.approx(calm_loss, abs=1e-3), (loss, calm_loss)


def test_allreduce_job_survives_a_worker_killed_at_a_random_moment(ray_cluster, id_job, tmp_path):
    path, ids = id_job
    rng = random.Random(7)
    fault = {"generation": 1, "rank": rng.randrange(2), "step": rng.randint(5, 80),
             "action": "exit"}  # fmt: skip
    report, took = run(path, tmp_path / "run", faults=[fault], sample_log=str(tmp_path / "s"))
    print(f"allreduce: {took:.1f} s, {fault}")
    assert report["generation"] == 2 and len(report["failures"]) == 1
    assert_every_sample_once(
        finished_by_generation(tmp_path / "s"), ids, EPOCHS, report["recoveries"]
    )


def test_a_killed_shard_without_snapshots_is_an_error_not_a_silent_reset(ray_cluster):
    """Regression: with ``snapshot_every=0`` Ray restarted a killed shard, which came back with
    the initial parameters and clocks 0 and went on applying pushes as if nothing was lost."""
    flat = np.zeros(10, np.float32)
    ps = ParameterServer.create(
        flat, shards=2, mode="async", num_workers=1, optimizer={"name": "sgd", "lr": 0.5},
        timeout_s=5, retries=6,
    )  # fmt: skip
    try:
        lo, hi = ps.ranges[1]
        grad = np.ones(hi - lo, np.float32)
        ps.call_with_retry(1, lambda s: s.push_pull.remote(ps.token, 0, 1, 0, grad, 1.0, 0.5))
        os.kill(ps.call_all("ping")[1], signal.SIGKILL)
        sends = []

        def push(shard):
            sends.append(1)
            return shard.push_pull.remote(ps.token, 0, 2, 1, grad, 1.0, 0.5)

        with pytest.raises(RuntimeError, match=r"shard 1 .*no snapshots: a killed shard is not"):
            ps.call_with_retry(1, push)
        # given up because the shard died, not after every retry's back-off (before: all 1 +
        # 6 sends, 11 s). Counted, not timed: how long Ray takes to learn that the actor is
        # dead (until then it may call it unavailable, and the call is sent again) is load's
        assert len(sends) < 1 + ps.retries, len(sends)
    finally:
        ps.shutdown()


def wait_until_dead(actor, timeout_s: float = 60.0) -> None:
    """Returns once ``actor`` answers a call with RayActorError. ``ray.kill`` only asks the
    GCS to kill it: a call sent meanwhile goes straight to the actor, which answers it while
    the kill is on its way (on a loaded machine, for as long as that takes; one ping after
    the kill was answered there). So ask again until the answer is its death."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.ping.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        assert time.monotonic() < deadline, f"the actor still answers {timeout_s} s after ray.kill"
        time.sleep(0.05)


def test_retries_of_a_dead_shard_stop_when_the_workers_group_was_stopped(ray_cluster):
    """Regression: a survivor whose rank 0 died (taking the shards it owns along) retried
    every call to the dead shards with back-off before it noticed that its group was stopped,
    which cost the fault tests 25 s a recovery. The worker's ``interrupt`` hook is now checked
    between retries too."""

    class GroupStopped(Exception):
        pass

    def stopped():
        raise GroupStopped

    ps = ParameterServer.create(
        np.zeros(10, np.float32), shards=2, mode="async", num_workers=1,
        optimizer={"name": "sgd", "lr": 0.5}, snapshot_every=1, timeout_s=5, retries=6,
    )  # fmt: skip
    try:
        ray.kill(ps.shards[1], no_restart=True)
        wait_until_dead(ps.shards[1])
        ps.interrupt = stopped
        with pytest.raises(GroupStopped):
            ps.call_with_retry(1, lambda s: s.ping.remote())
    finally:
        ps.shutdown()


def test_ps_job_without_snapshots_runs_again_from_its_checkpoint_when_a_shard_dies(
    ray_cluster, id_job, calm_loss, tmp_path
):
    """No snapshots (the default): a killed shard is not restarted, its slice is gone. The
    job runs again from the last checkpoint with a new server, as after a lost worker."""
    path, ids = id_job
    rng = random.Random(11)
    fault = {"generation": 1, "rank": 0, "step": rng.randint(45, 80), "action": "kill_shard",
             "shard": rng.randrange(2), "delay_s": rng.uniform(0.0, 0.03)}  # fmt: skip
    report, took = run(
        path, tmp_path / "run", strategy="ps", ps={"mode": "sync", "shards": 2},
        faults=[fault], sample_log=str(tmp_path / "s"),
    )  # fmt: skip
    print(f"no snapshots: {took:.1f} s, {fault}, failures {report['failures']}")
    assert report["generation"] == 2 and report["workers"] == 2
    assert any(f"shard {fault['shard']}" in f for f in report["failures"]), report["failures"]
    assert_every_sample_once(
        finished_by_generation(tmp_path / "s"), ids, EPOCHS, report["recoveries"]
    )
    loss = final_loss(load_job(path, {"run": {"out": str(tmp_path / "run")}}), SAMPLES)
    assert loss == pytest.approx(calm_loss, abs=1e-3), (loss, calm_loss)
