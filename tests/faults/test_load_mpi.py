"""Load on the MPI engine (marker `load`): 8 ranks oversubscribing 2 cores run a job to the end,
every rank on its own shard, and the result is the same kind of model as on one rank."""

from __future__ import annotations

import json

import pytest
from helpers.jobs import write_job
from helpers.mpi import launch

from distnet.data import convert_digits

pytestmark = [pytest.mark.load, pytest.mark.mpi, pytest.mark.slow, pytest.mark.timeout(300)]


def test_eight_ranks_on_two_cores_run_to_the_end(tmp_path):
    convert_digits(tmp_path / "data", test_fraction=0.25, seed=0, chunk_samples=32)
    job = write_job(tmp_path / "job.toml", {
        "data": {"train": "data/train", "test": "data/test", "batch_size": 64},
        "model": {"type": "mlp", "hidden": [32], "activation": "relu"},
        "finetune": {"epochs": 4, "lr": 0.01},
        "run": {"out": "run", "pictures": False},
    })  # fmt: skip
    proc = launch(8, "-m", "distnet.cli", "train", str(job), "--quiet", timeout=280, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["workers"] == 8 and report["engine"] == "MPICommunicator"
    assert len(report["stages"][0]["history"]["loss"]) == 4
    assert report["test_accuracy"] > 0.8  # it learned: 4 epochs of digits
