"""Issue 8 under real mpiexec (``distnet launch``), 2 ranks: fp16 overflow leaves no MPI
request in flight; a job resumes from rank 0's checkpoint when the other ranks' run
directories are node-local (empty)."""

from __future__ import annotations

import subprocess

import pytest
from helpers.jobs import sae_job
from helpers.mpi import MPI_MARKS, SCRIPTS, launch

pytestmark = MPI_MARKS


@pytest.mark.timeout(100)
def test_fp16_overflow_waits_for_every_bucket_before_raising():
    proc = launch(2, str(SCRIPTS / "fp16_overflow.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[0] fp16 overflow ok" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_resume_with_node_local_run_directories_equals_a_run_that_never_stopped(digits, tmp_path):
    """Rank 1's run directory is new and empty on every run: rank 0 must read the checkpoints
    and broadcast them, or rank 1 starts at stage 0 while rank 0 resumes fine-tuning."""
    import numpy as np  # noqa: PLC0415

    from distnet.train.loop.checkpoint import read_manifest  # noqa: PLC0415

    job = tmp_path / "job.toml"
    job.write_text(sae_job(digits / "data"))
    script = str(SCRIPTS / "resume_local_dirs.py")
    local = tmp_path / "local"
    local.mkdir()

    def run(out: str, mode: str) -> subprocess.CompletedProcess:
        proc = launch(2, script, str(job), str(tmp_path / out), str(local), mode, timeout=80)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    assert "full done, resumed from [0, 0, 0]" in run("full", "full").stdout
    assert "crashed as planned" in run("stopped", "crash").stdout
    progress = tmp_path / "stopped" / "stages" / "2-finetune" / "progress"
    assert read_manifest(progress)["extra"]["epoch"] == 2
    assert "resume done, resumed from [0, 0, 2]" in run("stopped", "resume").stdout

    full = np.load(local / "final-full-rank0.npz")
    for rank in (0, 1):
        resumed = np.load(local / f"final-resume-rank{rank}.npz")
        assert sorted(resumed.files) == sorted(full.files)
        for name in full.files:
            np.testing.assert_array_equal(resumed[name], full[name], err_msg=f"{rank} {name}")
    # rank 1 wrote no checkpoint and no report in its own directory (only its metrics and
    # timeline, which rank 0 fetches: distnet.train.loop.metrics)
    rank1 = local / "rank1-resume"
    written = {p.relative_to(rank1).parts[0] for p in rank1.rglob("*")} if rank1.exists() else set()
    assert written <= {"metrics", "trace"}, written


@pytest.mark.timeout(100)
def test_checkpoints_are_read_on_rank_zero_and_broadcast(tmp_path):
    proc = launch(2, str(SCRIPTS / "checkpoint_broadcast.py"), str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[0] checkpoint broadcast ok" in proc.stdout
