"""Training jobs that stream from an S3 bucket (moto's S3 server in its own process, reached
through a proxy adding 5 ms a request): a 2-rank MPI job (real mpiexec) stopped and resumed,
and a 2-worker Ray job (real local Ray) whose worker dies mid-epoch and resumes there. The
credentials and the endpoint reach every rank through the standard AWS environment only."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.jobs import mlp_job
from helpers.mpi import MPIEXEC, SCRIPTS, launch

pytest.importorskip("s3fs", reason="s3:// stores need the [s3] extra (s3fs)")
pytest.importorskip("moto", reason="the tests' S3 server is moto's (the [dev] extra)")
pytest.importorskip("sklearn")

from distnet.bench.netproxy import FaultProxy, make_bucket, s3_env, start_s3_server  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.fresh_ray, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def bucket():
    """``s3://jobs`` on a fresh server; os.environ points at it (so Ray's workers, started
    after this, and mpiexec's ranks inherit it) until the module ends."""
    with start_s3_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        proxy = FaultProxy(endpoint)
        proxy.latency_s = 0.005
        for k, v in s3_env(proxy.url).items():
            mp.setenv(k, v)
        make_bucket(endpoint, "jobs")
        yield "s3://jobs", proxy
        proxy.close()


@pytest.mark.mpi
@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside the interpreter")
def test_mpi_job_from_a_bucket_resumes_to_the_local_runs_parameters(bucket, tmp_path):
    """2 ranks: the job on the local store, and the same job on the bucket's copy stopped
    after epoch 2 and resumed, end with the same parameters bit for bit."""
    from distnet.data import convert_digits  # noqa: PLC0415

    url, proxy = bucket
    convert_digits(str(tmp_path / "digits"), chunk_samples=64)
    convert_digits(f"{url}/digits", chunk_samples=64)
    local = tmp_path / "final"
    local.mkdir()

    def run(train: str, out: str, mode: str) -> str:
        job = tmp_path / f"{out}.toml"
        job.write_text(mlp_job(train, epochs=3))
        proc = launch(2, str(SCRIPTS / "resume_local_dirs.py"), str(job), str(tmp_path / out),
                      str(local), mode, timeout=150)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    assert "full done" in run(str(tmp_path / "digits" / "train"), "full", "full")
    before = proxy.requests
    assert "crashed as planned" in run(f"{url}/digits/train", "s3", "crash")
    assert "resume done, resumed from [2]" in run(f"{url}/digits/train", "s3", "resume")
    assert proxy.requests - before > 50  # the ranks did stream from the bucket
    full = np.load(local / "final-full-rank0.npz")
    for rank in (0, 1):
        resumed = np.load(local / f"final-resume-rank{rank}.npz")
        for name in full.files:
            np.testing.assert_array_equal(resumed[name], full[name], err_msg=f"{rank} {name}")


@pytest.mark.ray
@pytest.mark.fault
def test_ray_job_from_a_bucket_resumes_mid_epoch_every_sample_once(bucket, ray_cluster, tmp_path):
    """2 Ray workers stream from the bucket; rank 1 dies 8 steps into epoch 1; a new worker
    takes its place and the epoch goes on from the last finished global step: every sample of
    every epoch counted exactly once (the per-rank sample logs), at most one batch redone."""
    from helpers.sample_counts import (  # noqa: PLC0415
        assert_every_sample_once,
        finished_by_generation,
        write_id_digits,
    )

    from distnet.parallel.rayengine import RayJob, RayOptions, worker_specs  # noqa: PLC0415
    from distnet.train.jobs.job import load_job  # noqa: PLC0415
    from distnet.train.jobs.rayjob import run_rank  # noqa: PLC0415

    url, proxy = bucket
    assert os.environ["AWS_ENDPOINT_URL"] == proxy.url
    n = 1344  # 42 global steps of 32 an epoch
    ids = write_id_digits(f"{url}/ids/train", n)
    (tmp_path / "job.toml").write_text(mlp_job(f"{url}/ids/train", epochs=2))
    log_dir = tmp_path / "samples"
    job = load_job(tmp_path / "job.toml", {"run": {"out": str(tmp_path / "run")}})
    before = proxy.requests
    opts = RayOptions(workers=worker_specs(2), fail_at_step={1: 50}, sample_log=str(log_dir),
                      min_workers=1)  # fmt: skip
    report = RayJob(opts, log=lambda line: None, task=run_rank).run(job)
    assert report["generation"] == 2 and len(report["failures"]) == 1
    (recovery,) = report["recoveries"]
    assert recovery["mid_epoch"] and recovery["resumed_at"]["epoch"] == 1
    # rank 1 exits right after its step 50 (step 8 of epoch 1); its last message to rank 0 may
    # die with it (seen at load ~60), so the survivor's last finished step is 7 or 8
    assert recovery["resumed_at"]["samples_seen"] in (7 * 32, 8 * 32), recovery["resumed_at"]
    assert_every_sample_once(finished_by_generation(log_dir), ids, 2, report["recoveries"])
    assert proxy.requests - before > 40  # the workers did stream from the bucket
