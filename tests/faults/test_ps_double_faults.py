"""Two deaths at the same moment on a Ray ``ps`` job with replicated shards (``replicas = 2``,
sync, 2 workers, 2 shards, no snapshots): a worker and a shard's primary, or rank 0 and a
shard's primary, both at the end of step 50 (of 84).

Each is survived as it is alone: the worker's death as a lost worker in sync (the group
resumes at step 50, the last step every worker finished, not at the epoch's checkpoint), the
primary's as a lost replica (its backup holds every acknowledged push: the shards still hold
exactly 50 rounds, which is what lets the group resume mid-epoch; without a backup the shard
would be gone and the job would run again from its checkpoint). Every sample counts once per
epoch (by id), and the resumed server's ledger holds every acknowledged push once. In async,
rank 0 and a shard's primary at the same step: no restart at all (a stand-in for rank 0, the
promoted backup, a rebuilt replica).
"""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("sklearn")

from helpers.jobs import mlp_job  # noqa: E402
from helpers.sample_counts import (  # noqa: E402
    assert_every_sample_once,
    finished_by_generation,
    write_id_digits,
)

from distnet.parallel.rayengine import RayJob, RayOptions, worker_specs  # noqa: E402
from distnet.train.jobs.job import load_job  # noqa: E402
from distnet.train.jobs.rayjob import run_rank  # noqa: E402

pytestmark = [
    pytest.mark.fault,
    pytest.mark.ray,
    pytest.mark.timeout(240, func_only=True),
    pytest.mark.load_scaled,
]
EPOCHS, SAMPLES, STEPS, KILL_AT = 2, 1344, 84, 50


@pytest.fixture(scope="module")
def id_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("doublefaults")
    ids = write_id_digits(root / "ids" / "train", SAMPLES)
    path = root / "job.toml"
    path.write_text(mlp_job(f"{root}/ids/train", epochs=EPOCHS, log_every=1000))
    return path, ids


@pytest.mark.parametrize(
    ("dies", "killer"),
    [("exit", 0), ("sigkill", 1)],  # rank 1 exits, rank 0 kills; rank 0 killed, rank 1 kills
    ids=["worker-and-primary", "rank0-and-primary"],
)
def test_sync_a_worker_and_a_shard_primary_lost_together_resume_at_the_last_step(
    ray_cluster, id_job, tmp_path, dies, killer
):
    path, ids = id_job
    out = tmp_path / "run"
    job = load_job(path, {"run": {"out": str(out)}})
    victim = 1 - killer
    faults = [
        {"generation": 1, "rank": victim, "step": KILL_AT, "action": dies},
        {"generation": 1, "rank": killer, "step": KILL_AT, "action": "kill_shard", "shard": 1,
         "delay_s": 0.0},
    ]  # fmt: skip
    opts = RayOptions(
        workers=worker_specs(2), strategy="ps", faults=faults, sample_log=str(out / "s"),
        ps={"mode": "sync", "shards": 2, "replicas": 2},
    )  # fmt: skip
    report = RayJob(opts, log=lambda line: None, task=run_rank).run(job)
    (failure,) = report["failures"]  # the worker; the shard's loss was no failure
    assert report["generation"] == 2 and failure.startswith(f"rank {victim}:"), report
    (rec,) = report["recoveries"]
    assert rec["kind"] == "group restarted" and rec["lost"] == [victim], rec
    assert rec["mid_epoch"] and rec["resumed_at"]["steps"] == KILL_AT, rec  # not the epoch
    assert_every_sample_once(finished_by_generation(out / "s"), ids, EPOCHS, report["recoveries"])
    (server,) = report["ps_stats"]  # the resumed group's server: the rest of the stage
    for shard in server["shards"]:
        assert shard["version"] == STEPS - KILL_AT and shard["rounds_lost"] == 0, shard
    ledger = server["ledger"]
    assert ledger["ok"] and ledger["acknowledged"] == 2 * (STEPS - KILL_AT), ledger
    assert ledger["missing"] == 0 and ledger["doubled"] == 0, ledger
    assert server["replica_check"]["ok"], server["replica_check"]


def test_async_rank_0_and_a_shard_primary_lost_together_the_survivor_goes_on(
    ray_cluster, id_job, tmp_path
):
    """async: rank 0 SIGKILLed and, at the same step, shard 1's primary killed by rank 1 (slowed,
    so it is still inside the epoch). No group restart: rank 1 goes on with the promoted
    backup while a stand-in takes rank 0's place and the warden rebuilds the replica; every
    sample once per epoch, every step of both ranks applied once, the replicas equal."""
    path, ids = id_job
    out = tmp_path / "run"
    job = load_job(path, {"run": {"out": str(out)}})
    workers = worker_specs(2)
    workers[1].delay_per_sample_s = 0.002
    faults = [
        {"generation": 1, "rank": 0, "step": KILL_AT, "action": "sigkill"},
        {"generation": 1, "rank": 1, "step": KILL_AT, "action": "kill_shard", "shard": 1,
         "delay_s": 0.0},
    ]  # fmt: skip
    opts = RayOptions(
        workers=workers, strategy="ps", faults=faults, sample_log=str(out / "s"),
        ps={"mode": "async", "shards": 2, "replicas": 2},
    )  # fmt: skip
    report = RayJob(opts, log=lambda line: None, task=run_rank).run(job)
    (failure,) = report["failures"]
    assert report["generation"] == 1 and failure.startswith("rank 0:"), report
    (rec,) = report["recoveries"]
    assert rec["kind"] == "survivors went on" and rec["lost"] == [0], rec
    (only,) = finished_by_generation(out / "s").values()  # one generation: no restart
    assert sorted(only) == list(range(EPOCHS))
    for epoch, steps in only.items():  # the stand-in logs rank 0's steps on
        seen = np.sort(np.concatenate([np.asarray(i, np.float32) for _, i in steps]))
        np.testing.assert_array_equal(seen, ids, f"epoch {epoch}")
    (server,) = report["ps_stats"]
    for shard in server["shards"]:
        assert shard["pushes_applied"] == [STEPS, STEPS], shard  # each step of each rank once
    ledger = server["ledger"]
    assert ledger["ok"] and ledger["missing"] == 0 and ledger["doubled"] == 0, ledger
    check = server["replica_check"]
    assert check["ok"] and check["shards"][1]["promotions"] == 1, check
    assert check["shards"][1]["rebuilds"] == 1, check
