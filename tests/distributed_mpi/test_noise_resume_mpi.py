"""Dropout across a crash and resume under real mpiexec (2 ranks): noise is keyed by (seed,
stage, rank, step) (``distnet.train.jobs.job.RankNoise``), and the resumed run's steps go on from
the optimiser's restored step count, so it draws the masks the run that never stopped drew
and ends with its parameters, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.mpi import MPI_MARKS, SCRIPTS, launch

pytestmark = MPI_MARKS

DROPOUT_JOB = """
[data]
train = "{data}/train"
batch_size = 32

[model]
type = "mlp"
hidden = [32]
activation = "relu"
dropout = 0.2

[finetune]
epochs = 3
lr = 0.003

[run]
log_every = 100
pictures = false
"""


@pytest.mark.timeout(150)
def test_a_job_with_dropout_resumes_to_the_parameters_of_a_run_that_never_stopped(digits, tmp_path):
    """Every rank stops after epoch 2 of 3 was checkpointed; the rerun resumes at epoch 2.
    If the resumed run numbered its steps from 0 again (as the parameter-server wrappers
    did, their ``steps`` being the shards' clock), its epoch would draw the first epoch's
    masks and the parameters would differ."""
    job = tmp_path / "job.toml"
    job.write_text(DROPOUT_JOB.format(data=digits / "data"))
    local = tmp_path / "local"
    local.mkdir()

    def run(out: str, mode: str) -> str:
        proc = launch(2, str(SCRIPTS / "resume_local_dirs.py"), str(job), str(tmp_path / out),
                      str(local), mode, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    assert "full done, resumed from [0]" in run("full", "full")
    assert "crashed as planned" in run("stopped", "crash")
    assert "resume done, resumed from [2]" in run("stopped", "resume")
    full = np.load(local / "final-full-rank0.npz")
    for rank in (0, 1):
        resumed = np.load(local / f"final-resume-rank{rank}.npz")
        assert sorted(resumed.files) == sorted(full.files)
        for name in full.files:
            np.testing.assert_array_equal(resumed[name], full[name], err_msg=f"{rank} {name}")
