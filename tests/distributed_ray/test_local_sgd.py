"""Strategy ``local_sgd`` (``distnet/parallel/localsgd.py``), added through the engine interface:
H local steps, then the parameters (and optimiser state) averaged with one allreduce. On real
mpiexec ranks and a real local Ray: H = 1 equals the allreduce strategy; H = 8 makes H times
fewer collectives (counted by the communicator) and reaches the digits jobs' accuracy bars."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers.jobs import mlp_job
from helpers.mpi import MPIEXEC, SCRIPTS, launch

from distnet.train.jobs import jobspec

pytest.importorskip("sklearn")

sys.path.insert(0, str(SCRIPTS))  # ``import local_sgd``: the contest the Ray actors run too
needs_mpi = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this python")


def refusal(dist: dict) -> str | None:
    try:
        jobspec.validate({"data": {"train": "x"}, "dist": dist}, "job.toml")
    except jobspec.JobError as e:
        return str(e)
    return None


@pytest.mark.parametrize(
    "dist,words",
    [
        ({"engine": "ray", "strategy": "local_sgd", "mode": "async"}, "mode = 'async' needs"),
        ({"engine": "ray", "strategy": "local_sgd", "shards": 2}, "shards = 2 needs strategy"),
        ({"engine": "mpi", "sync_every": 4}, "sync_every needs strategy = 'local_sgd'"),
        ({"engine": "mpi", "average_state": True}, "average_state needs strategy"),
        ({"engine": "mpi", "strategy": "local_sgd", "shard_optimizer": True}, "does nothing"),
        ({"engine": "mpi", "strategy": "local_sgd", "compression": "fp16"}, "float32"),
        ({"engine": "mpi", "strategy": "local_sgd", "overlap": True}, "overlap = true needs"),
        ({"engine": "mpi", "strategy": "local_sgd", "sync_every": 0}, "sync_every"),
    ],
)
def test_senseless_local_sgd_combinations_are_refused(dist, words):
    message = refusal(dist)
    assert message is not None and words in message, message


@pytest.mark.parametrize("engine", ["local", "mpi", "ray"])
def test_local_sgd_runs_on_every_engine(engine):
    assert refusal({"engine": engine, "strategy": "local_sgd", "sync_every": 8,
                    "average_state": True}) is None  # fmt: skip


def check_contest(r: dict) -> None:
    """The numbers of ``mpi_scripts/local_sgd.py``'s ``contest`` (2 ranks, H = 8)."""
    assert r["max_diff_h1"] < 1e-5, r  # H = 1 with the state averaged: allreduce SGD
    h = 8
    assert r["averages_h"] == -(-r["steps"] // h), r  # one allreduce per H steps
    # what every run makes besides the strategy's own (fit's epoch means, the start's
    # broadcasts): H = 1 makes one average per step
    besides = r["collectives_h1"] - r["steps"]
    assert besides >= 0 and r["collectives_h"] - besides == r["averages_h"], r
    assert r["collectives_allreduce"] - besides >= r["steps"], r  # at least one per step
    fewer = (r["collectives_allreduce"] - besides) / (r["collectives_h"] - besides)
    assert fewer >= h - 0.5, r
    assert r["replicas_equal_h"], r  # the stage ends with one model on every rank
    assert r["accuracy_h"] >= 0.85 and r["accuracy_h"] >= r["accuracy_allreduce"] - 0.03, r


@pytest.mark.mpi
@needs_mpi
@pytest.mark.timeout(240)
def test_local_sgd_on_mpi_ranks_equals_allreduce_at_h1_and_makes_h_times_fewer_collectives():
    proc = launch(2, str(SCRIPTS / "local_sgd.py"), timeout=220)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "{" in x)
    check_contest(json.loads(line.split("] ", 1)[-1]))


LOCAL_SGD = 'strategy = "local_sgd"\nsync_every = 8\naverage_state = true'


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from distnet.data import convert_digits

    root = tmp_path_factory.mktemp("localsgd")
    convert_digits(root / "data", test_fraction=0.25, seed=0, chunk_samples=64)
    return root


@pytest.mark.mpi
@needs_mpi
@pytest.mark.timeout(300)
def test_local_sgd_job_on_two_mpi_ranks_reaches_the_digits_bar(digits):
    path = digits / "local_sgd.toml"
    path.write_text(mlp_job("data/train", test="data/test", epochs=15, dist=LOCAL_SGD))
    out = digits / "run-mpi"
    cmd = [sys.executable, "-m", "distnet.cli", "launch", "-np", "2", "--", sys.executable,
           "-m", "distnet.cli", "train", str(path), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=digits)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["workers"] == 2 and report["engine"] == "MPICommunicator"
    assert report["job"]["dist"]["strategy"] == "local_sgd"
    assert report["test_accuracy"] >= 0.93, report["test_accuracy"]  # test_job.py's digits bar


# --- the Ray engine ------------------------------------------------------------------------
def final_params(job: dict, out) -> np.ndarray:
    from distnet import backend
    from distnet.train.jobs.job import build_model
    from distnet.train.loop.checkpoint import load_checkpoint

    backend.seed(0)
    model = build_model(job, 64, 10)
    load_checkpoint(sorted(glob.glob(str(out / "stages" / "*")))[-1], model)
    return np.array(model.flat_params(), copy=True)


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_local_sgd_on_ray_equals_allreduce_at_h1_and_counts_fewer_collectives(ray_cluster, digits):
    import ray

    from distnet.parallel.rayengine import RayJob, RayOptions, worker_specs
    from distnet.train.jobs.job import load_job
    from distnet.train.jobs.rayjob import run_ray_job

    runs = {}
    for name, dist in (("allreduce", ""), ("h1", 'strategy = "local_sgd"\naverage_state = true')):
        path = digits / f"ray-{name}.toml"
        # one epoch (42 steps): H = 1 equals allreduce at every step, and one process on the
        # global batch reaches 0.89 on the test set after it (the bar is 0.85)
        path.write_text(mlp_job("data/train", test="data/test", epochs=1, dist=dist))
        out = digits / f"run-ray-{name}"
        job = load_job(path, {"run": {"out": str(out)}, "dist": {"engine": "ray"}})
        strategy = job["dist"]["strategy"]
        report = run_ray_job(job, RayOptions(workers=worker_specs(2), strategy=strategy),
                             log=lambda line: None)  # fmt: skip
        assert report["workers"] == 2 and report["engine"] == "RayCommunicator"
        runs[name] = (final_params(job, out), report["test_accuracy"])
    assert np.max(np.abs(runs["h1"][0] - runs["allreduce"][0])) < 1e-5
    assert runs["h1"][1] >= 0.85  # test_ray_engine.py's bar for this job

    # H = 8 on Ray actors: the same contest as on MPI ranks, collectives counted by the
    # Ray communicator
    import local_sgd  # tests/mpi_scripts/local_sgd.py, sent to the workers by value

    ray.cloudpickle.register_pickle_by_value(local_sgd)
    group = RayJob(RayOptions(workers=worker_specs(2)))
    try:
        group._place()
        group._setup_group()
        results = ray.get([a.apply.remote(local_sgd.contest) for a in group.actors], timeout=300)
    finally:
        group.stop()
    check_contest(results[0])
