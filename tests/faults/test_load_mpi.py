"""Load on the MPI engine (marker `load`): 8 ranks oversubscribing 2 cores run a job to the end,
every rank on its own shard, and the result is the same kind of model as on one rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distnet.data import convert_digits

pytestmark = [pytest.mark.load, pytest.mark.mpi, pytest.mark.slow, pytest.mark.timeout(300)]
DISTNET = str(Path(sys.executable).parent / "distnet")


def test_eight_ranks_on_two_cores_run_to_the_end(tmp_path):
    convert_digits(tmp_path / "data", test_fraction=0.25, seed=0, chunk_samples=32)
    job = tmp_path / "job.toml"
    job.write_text(
        "[data]\ntrain = 'data/train'\ntest = 'data/test'\nbatch_size = 64\n"
        "[model]\ntype = 'mlp'\nhidden = [32]\nactivation = 'relu'\n"
        "[finetune]\nepochs = 4\nlr = 0.01\n[run]\nout = 'run'\npictures = false\n"
    )
    cmd = [DISTNET, "launch", "-np", "8", "--", DISTNET, "train", str(job), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["workers"] == 8 and report["engine"] == "MPICommunicator"
    assert len(report["stages"][0]["history"]["loss"]) == 4
    assert report["test_accuracy"] > 0.8  # it learned: 4 epochs of digits
