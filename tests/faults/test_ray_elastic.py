"""Elastic Ray jobs: a worker killed mid-epoch costs one global batch, not the epoch.

A real local Ray (shared by the modules, token authentication on). The training store
carries each sample's id in its last feature column; every worker logs the ids of each step
it finished and of the step a dead peer interrupted, so the tests count samples exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("sklearn")

from helpers.jobs import mlp_job  # noqa: E402
from helpers.params import final_model, flat  # noqa: E402
from helpers.sample_counts import (  # noqa: E402
    assert_every_sample_once,
    finished_by_generation,
    write_id_digits,
)

from distnet import backend  # noqa: E402
from distnet.core.functional import cross_entropy  # noqa: E402
from distnet.data import StreamLoader  # noqa: E402
from distnet.parallel.rayengine import RayJob, RayOptions, worker_specs  # noqa: E402
from distnet.train.jobs.job import _make_optimizer, build_model, load_job  # noqa: E402
from distnet.train.jobs.rayjob import run_rank  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.fault, pytest.mark.timeout(180)]

N, GLOBAL_BATCH, EPOCHS = 1344, 32, 2  # 42 global steps an epoch
KILL_AT = 50  # rank 1 exits after its 50th step: 8 steps into epoch 1 (the last)


@pytest.fixture(scope="module")
def ids_root(tmp_path_factory):
    """Digits with a 65th feature column holding each sample's id (id / 10000)."""
    root = tmp_path_factory.mktemp("elastic")
    write_id_digits(root / "ids" / "train", N)
    (root / "job.toml").write_text(mlp_job(f"{root}/ids/train", epochs=EPOCHS))
    return root


def run_killed(root, name, **options):
    """The job with rank 1 killed at step KILL_AT; (report, job, sample-log directory)."""
    log_dir = root / f"samples-{name}"
    job = load_job(root / "job.toml", {"run": {"out": str(root / f"run-{name}")}})
    opts = RayOptions(workers=worker_specs(2), fail_at_step={1: KILL_AT}, sample_log=str(log_dir),
                      min_workers=1, **options)  # fmt: skip
    report = RayJob(opts, log=lambda line: None, task=run_rank).run(job)
    assert report["generation"] == 2 and len(report["failures"]) == 1
    return report, job, log_dir


def redone_ids(log_dir) -> list[float]:
    """Ids computed in steps that never finished (a peer died in them)."""
    redone: list[float] = []
    for f in sorted(log_dir.glob("rank*-gen*.jsonl")):
        for line in f.read_text().splitlines():
            redone.extend(json.loads(line).get("incomplete", []))
    return redone


def assert_each_sample_once_and_one_batch_redone(log_dir, report):
    """Every sample of every epoch reached the parameters once (a dead worker's logged step
    that its peers never finished is not counted: the next generation did it again, see
    ``sample_counts``), and the work done twice is at most one global batch."""
    records = finished_by_generation(log_dir)
    ids = (np.arange(N, dtype=np.float32) + 1) / 10000
    assert_every_sample_once(records, ids, EPOCHS, report["recoveries"])
    done = sum(len(got) for epochs in records.values() for steps in epochs.values()
               for _, got in steps)  # fmt: skip
    redone = redone_ids(log_dir)
    # computed in all: the epochs, plus the part of the interrupted batch that was done twice
    assert 0 < len(redone) <= GLOBAL_BATCH
    assert done + len(redone) <= EPOCHS * N + GLOBAL_BATCH


def reference_model(job):
    """One process, one optimiser, on the union of both ranks' batches (the global batch)."""
    backend.seed(job["run"]["seed"])
    net = build_model(job, 65, 10)
    opt = _make_optimizer(job["finetune"], net)
    loaders = [
        StreamLoader(job["data"]["train"], GLOBAL_BATCH // 2, rank=r, world_size=2,
                     seed=job["run"]["seed"], shuffle_chunks=job["data"]["shuffle_chunks"])
        for r in range(2)
    ]  # fmt: skip
    for epoch in range(EPOCHS):
        for ld in loaders:
            ld.set_epoch(epoch)
        for (x0, y0), (x1, y1) in zip(*loaders, strict=True):
            opt.zero_grad()
            cross_entropy(net(np.concatenate([x0, x1])), np.concatenate([y0, y1])).backward()
            opt.step()
    for ld in loaders:
        ld.close()
    return net


def train_loss(model, job):
    with StreamLoader(job["data"]["train"], N, shuffle=False) as ld:
        x, y = next(iter(ld))
    return float(cross_entropy(model(x), y).data)


@pytest.fixture(scope="module")
def reference(ids_root):
    job = load_job(ids_root / "job.toml")
    return reference_model(job)


@pytest.mark.parametrize("strategy", ["allreduce", "ps"])
def test_replaced_worker_redoes_only_the_interrupted_global_batch(
    ray_cluster, ids_root, reference, strategy
):
    """A new actor takes rank 1's place; the job resumes at the last finished global step
    with the state after it, so it ends with the parameters of a run never disturbed."""
    ps = {"mode": "sync", "shards": 2} if strategy == "ps" else {}
    report, job, log_dir = run_killed(ids_root, f"replace-{strategy}", strategy=strategy, ps=ps)
    (recovery,) = report["recoveries"]
    assert recovery["mid_epoch"] and recovery["workers"] == 2
    assert recovery["resumed_at"]["epoch"] == 1
    # rank 1 exits after its step 50; rank 0 has finished step 50 too, or (the driver's abort
    # reaching it while it still takes in step 50's last message, seen with three suites'
    # load) step 49: the job resumes after the last step rank 0 finished, either way exact
    seen = recovery["resumed_at"]["samples_seen"]
    assert seen in ((KILL_AT - 43) * GLOBAL_BATCH, (KILL_AT - 42) * GLOBAL_BATCH), seen
    assert report["resumed_mid_epoch"] == [{"stage": 0, "epoch": 1, "samples_seen": seen}]
    assert_each_sample_once_and_one_batch_redone(log_dir, report)
    got = flat(final_model(job, features=65))
    np.testing.assert_allclose(got, flat(reference), atol=1e-5)


@pytest.mark.slow
def test_survivor_alone_takes_over_the_rest_of_the_epoch(ray_cluster, ids_root, reference):
    """No replacement (--min-workers 1): the samples the epoch has left go to the one
    survivor, each once; the loss ends close to an undisturbed run's."""
    report, job, log_dir = run_killed(ids_root, "alone", replace_lost=False)
    assert report["workers"] == 1 and report["recoveries"][0]["mid_epoch"]
    assert_each_sample_once_and_one_batch_redone(log_dir, report)
    got, want = train_loss(final_model(job, features=65), job), train_loss(reference, job)
    # the rest of the run sees the samples in another order: undisturbed runs with seeds
    # 0..5 end between 0.114 and 0.137 (seed 0: 0.129)
    assert abs(got - want) <= 0.5 * want, (got, want)


@pytest.mark.slow
def test_ps_epoch_rollback_restores_the_shards(ray_cluster, ids_root, reference):
    """The fallback (the epoch redone from its checkpoint) on the parameter server: the
    shards get the checkpoint's parameters and momentum back. Before, they kept the ones
    they were created with, and the job trained on from the initial parameters."""
    report, job, log_dir = run_killed(
        ids_root, "ps-rollback", strategy="ps", ps={"mode": "sync", "shards": 2},
        mid_epoch_resume=False,
    )  # fmt: skip
    assert not report["recoveries"][0]["mid_epoch"]
    done = finished_by_generation(log_dir)
    logged = sum(len(got) for epochs in done.values() for steps in epochs.values()
                 for _, got in steps)  # fmt: skip
    assert logged > EPOCHS * N  # the epoch was redone
    np.testing.assert_allclose(flat(final_model(job, features=65)), flat(reference), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["allreduce", "ps"])
def test_worker_killed_by_sigkill_mid_step(ray_cluster, ids_root, reference, strategy):
    """SIGKILL from outside at whatever point of a step rank 1 is in (not at a step's end,
    as fail_at_step does): the job still ends with the parameters of an undisturbed run."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    log_dir = ids_root / f"samples-sigkill-{strategy}"
    job = load_job(
        ids_root / "job.toml", {"run": {"out": str(ids_root / f"run-sigkill-{strategy}")}}
    )
    ps = {"mode": "sync", "shards": 2} if strategy == "ps" else {}
    rj = RayJob(
        RayOptions(workers=worker_specs(2), sample_log=str(log_dir), strategy=strategy, ps=ps),
        log=lambda line: None, task=run_rank,
    )  # fmt: skip
    killed: list[int] = []
    over = threading.Event()

    def kill_rank_1_in_epoch_1():
        # as long as the job runs (the test's timeout bounds it): a fixed deadline ran out
        # before step 50 on a loaded machine, and then nothing was killed
        path = log_dir / "rank1-gen1.jsonl"
        while not over.is_set():
            lines = path.read_text().count("\n") if path.exists() else 0
            if lines >= 50 and len(rj.worker_info) >= 2:
                time.sleep(0.013)  # somewhere inside a step
                os.kill(rj.worker_info[1]["pid"], signal.SIGKILL)
                killed.append(lines)
                return
            time.sleep(0.002)

    threading.Thread(target=kill_rank_1_in_epoch_1, daemon=True).start()
    try:
        report = rj.run(job)
    finally:
        over.set()
    assert killed and report["generation"] == 2 and len(report["failures"]) == 1
    if strategy == "allreduce":  # ps: the dead worker may have pushed to one shard only
        assert report["recoveries"][0]["mid_epoch"], report["recoveries"]
    np.testing.assert_allclose(flat(final_model(job, features=65)), flat(reference), atol=1e-5)


@pytest.mark.slow
def test_rank_0_lost_a_survivor_becomes_rank_0_and_resumes(ray_cluster, ids_root, reference):
    """Rank 0 (the writer) dies: rank 1 holds the state after the last step, becomes rank 0
    of the new group and broadcasts it; the replacement takes the other place."""
    log_dir = ids_root / "samples-rank0"
    job = load_job(ids_root / "job.toml", {"run": {"out": str(ids_root / "run-rank0")}})
    opts = RayOptions(workers=worker_specs(2), fail_at_step={0: KILL_AT}, sample_log=str(log_dir))
    rj = RayJob(opts, log=lambda line: None, task=run_rank)
    became_rank_0: list[bool] = []

    def recover_and_look(lost):  # is the actor that was rank 1 rank 0 of the new group?
        old_rank_1 = rj.actors[1]
        recover(lost)
        became_rank_0.append(rj.actors[0] is old_rank_1)

    recover, rj._recover = rj._recover, recover_and_look
    report = rj.run(job)
    assert report["recoveries"][0]["mid_epoch"] and report["recoveries"][0]["lost"] == [0]
    assert became_rank_0 == [True]
    assert_each_sample_once_and_one_batch_redone(log_dir, report)
    np.testing.assert_allclose(flat(final_model(job, features=65)), flat(reference), atol=1e-5)


@pytest.mark.parametrize("strategy", ["allreduce", "ps"])
def test_a_replaced_worker_redraws_the_same_dropout_masks(ray_cluster, ids_root, strategy):
    """With dropout, the redone global batch draws the masks the undisturbed run drew (noise
    keyed by seed, stage, rank and step): the killed run ends with the undisturbed run's
    parameters. With the old per-epoch key a resumed rank went on from its epoch's generator
    state and the parameters differed by up to 0.19; on the parameter server the step came
    from the shards' clock, which a resumed run starts again at 0."""
    text = mlp_job(f"{ids_root}/ids/train", epochs=EPOCHS)
    with_dropout = text.replace('activation = "tanh"\n', 'activation = "tanh"\ndropout = 0.3\n')
    (ids_root / "dropout.toml").write_text(with_dropout)
    ps = {"mode": "sync", "shards": 2} if strategy == "ps" else {}

    def run(name, **options):
        job = load_job(ids_root / "dropout.toml", {"run": {"out": str(ids_root / name)}})
        opts = RayOptions(workers=worker_specs(2), strategy=strategy, ps=ps, **options)
        return job, RayJob(opts, log=lambda line: None, task=run_rank).run(job)

    undisturbed, _ = run(f"drop-{strategy}-0")
    killed, report = run(f"drop-{strategy}-1", fail_at_step={1: KILL_AT}, min_workers=1)
    assert report["generation"] == 2 and report["recoveries"][0]["mid_epoch"]
    want = flat(final_model(undisturbed, features=65))
    np.testing.assert_allclose(flat(final_model(killed, features=65)), want, atol=1e-5)


class DeathInSetUp(RayJob):
    """A job whose surviving rank 0 is SIGKILLed while the group is set up again after the
    first death (two deaths, the second during the recovery from the first)."""

    def _setup_group(self) -> None:
        if self.generation == 1:  # the recovery from generation 1's loss
            import os  # noqa: PLC0415
            import signal  # noqa: PLC0415

            pid = ray.get(self.actors[0].info.remote(), timeout=30)["pid"]
            os.kill(pid, signal.SIGKILL)
        super()._setup_group()


def test_a_death_while_the_group_is_set_up_is_one_more_lost_rank(ray_cluster, ids_root):
    """Regression: the second death ended the job with ActorDiedError from the set-up; now the
    dead actor is replaced as any lost rank (a third generation), and every sample counts
    once per epoch."""
    log_dir = ids_root / "samples-setup-death"
    job = load_job(ids_root / "job.toml", {"run": {"out": str(ids_root / "run-setup-death")}})
    opts = RayOptions(workers=worker_specs(2), fail_at_step={1: KILL_AT}, sample_log=str(log_dir))
    report = DeathInSetUp(opts, log=lambda line: None, task=run_rank).run(job)
    assert report["generation"] == 3, report["failures"]
    assert report["failures"][-1] == "rank 0: died while the group was set up", report["failures"]
    assert len(report["recoveries"]) == 2
    # generation 2 logged no step (its rank 0 died in the set-up): counted by the chaos
    # benchmark's accounting, which walks every generation, logged or not
    from distnet.bench.chaos_counts import epoch_samples  # noqa: PLC0415

    counted = epoch_samples(log_dir, report["recoveries"], N)["epochs"]
    ids = (np.arange(N, dtype=np.float32) + 1) / 10000
    assert sorted(counted) == list(range(EPOCHS))
    for epoch, uses in counted.items():
        got = np.sort(np.array(list(uses.elements()), np.float32))
        np.testing.assert_array_equal(got, ids, f"epoch {epoch}")


class OwnCarryLost(RayJob):
    """Rank 1 has no state of its own after the first loss (as when rank 0 ended the stage's
    server before rank 1's shards' check could ask it): only the copy of rank 0's is left."""

    def _recover(self, lost: list[int]) -> None:
        if self.generation == 1:
            ray.get(self.actors[1].drop_carry.remote(), timeout=30)
        super()._recover(lost)


# quarantined: in 1 of 2 clean-clone suites (2026-12-07) the "start" case's second restart
# went back to the epoch's checkpoint (mid_epoch False); passes alone and in the other suite
@pytest.mark.xfail(strict=False, reason="second death during a recovery: intermittent epoch redo")
@pytest.mark.parametrize("when", ["start", "resumed"])
def test_the_chosen_survivor_dead_before_a_step_another_survivor_resumes(
    ray_cluster, ids_root, when
):
    """Rank 2 of 3 exits at step KILL_AT; rank 0, whose state the new group resumes from,
    exits as that group starts (``start``: rank 1 kept its own state after the same step), or
    once the stage resumed from its state but before a step finished (``resumed``: rank 1
    holds only the copy of rank 0's the driver handed it). The third group resumes from rank
    1's at the same step, not from the epoch's checkpoint, and ends with the undisturbed
    run's parameters.

    Regression (``distnet bench chaos``, sync: rank 2 killed, then rank 0 during the recovery
    or the resumed group's first step: an epoch redone): the survivors not chosen dropped
    their state at the first recovery (or had none: rank 0 had ended the server their check
    needed), and the chosen one dropped its own once the stage resumed, so a death before the
    next finished step found no state to resume from."""
    ps = {"mode": "sync", "shards": 2, "replicas": 1}
    # a global batch of 48 (16 a rank): 28 steps an epoch, KILL_AT is in epoch 1
    text = mlp_job(f"{ids_root}/ids/train", epochs=EPOCHS, data={"batch_size": 48})
    (ids_root / "three.toml").write_text(text)

    def run(name, job_class=RayJob, **options):
        job = load_job(ids_root / "three.toml", {"run": {"out": str(ids_root / name)}})
        opts = RayOptions(workers=worker_specs(3), strategy="ps", ps=ps, **options)
        return job, job_class(opts, log=lambda line: None, task=run_rank).run(job)

    undisturbed, _ = run(f"reserve-calm-{when}")
    log_dir = ids_root / f"samples-reserve-{when}"
    faults = [{"generation": 1, "rank": 2, "step": KILL_AT, "action": "exit"},
              {"generation": 2, "rank": 0, "step": when, "action": "exit"}]  # fmt: skip
    job_class = OwnCarryLost if when == "resumed" else RayJob
    killed, report = run(f"reserve-{when}", job_class, faults=faults, sample_log=str(log_dir))
    assert report["generation"] == 3 and len(report["failures"]) == 2, report["failures"]
    first, second = report["recoveries"]
    assert first["lost"] == [2] and second["lost"] == [0], report["recoveries"]
    assert first["mid_epoch"] and second["mid_epoch"], report["recoveries"]
    assert second["resumed_at"] == first["resumed_at"], report["recoveries"]  # the same step
    assert report["resumed_mid_epoch"] == [
        {"stage": 0, "epoch": 1, "samples_seen": first["resumed_at"]["samples_seen"]}
    ]
    # generation 2 logged no step: counted as the chaos benchmark counts (every generation)
    from distnet.bench.chaos_counts import epoch_samples  # noqa: PLC0415

    counted = epoch_samples(log_dir, report["recoveries"], N)
    ids = (np.arange(N, dtype=np.float32) + 1) / 10000
    assert sorted(counted["epochs"]) == list(range(EPOCHS)) and counted["epochs_redone"] == 0
    for epoch, uses in counted["epochs"].items():
        got = np.sort(np.array(list(uses.elements()), np.float32))
        np.testing.assert_array_equal(got, ids, f"epoch {epoch}")
    want = flat(final_model(undisturbed, features=65))
    np.testing.assert_allclose(flat(final_model(killed, features=65)), want, atol=1e-5)
