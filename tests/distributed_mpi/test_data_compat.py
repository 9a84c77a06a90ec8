"""A job's stores and batch are checked against each other before the first step: one line
naming the store, the array and what is wrong, exit 2 (``distnet.train.jobs.datacheck``)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers.jobs import mlp_job
from helpers.mpi import MPI_MARKS, launch

from distnet import cli
from distnet.data import open_dataset, write_dataset
from distnet.train.jobs import datacheck
from distnet.train.jobs.job import load_job
from distnet.train.jobs.jobspec import JobError

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def root(digits):
    root = digits
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 17, (100, 64)).astype(np.uint8)
    write_dataset(str(root / "narrow"), pixels[:, :49], rng.integers(0, 10, 100))
    write_dataset(str(root / "twelve"), pixels, rng.integers(0, 12, 100))  # num_classes 12
    write_dataset(str(root / "floats"), pixels.astype(np.float32) / 16, rng.integers(0, 10, 100))
    write_dataset(
        str(root / "raw-floats"), pixels.astype(np.float32) * 15, rng.integers(0, 10, 100)
    )
    write_dataset(str(root / "unlabelled"), pixels)
    write_dataset(  # labels 0..11 but no num_classes attribute: read chunk by chunk
        str(root / "no-classes"), pixels, rng.integers(0, 12, 100), chunk_samples=16,
        attrs={"num_classes": None},
    )  # fmt: skip
    return root


def job_file(root, name="job.toml", test="data/test", epochs=1):
    path = root / name
    path.write_text(mlp_job("data/train", test=test, epochs=epochs))
    return path


def train_cli(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distnet.cli", "train", *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_test_store_with_other_features_fails_before_training(root):
    path = job_file(root, "narrow.toml", test=str(root / "narrow"))
    out = root / "run-narrow"
    proc = train_cli(path, "--out", out)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"{root / 'narrow'}: array 'x' samples are (49,), the training store's are (64,)" in err
    assert not (out / "stages").exists()  # nothing trained


def test_test_labels_beyond_the_classes_fail_before_training(root):
    path = job_file(root, "twelve.toml", test=str(root / "twelve"))
    proc = train_cli(path, "--out", root / "run-twelve")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{root / 'twelve'}: array 'y' has labels up to 11 (12 classes)" in proc.stderr
    assert "10 (the model's outputs)" in proc.stderr and "running" not in proc.stdout


def test_a_batch_larger_than_the_data_fails_before_training(root, capsys):
    path = job_file(root)
    assert cli.main(["train", str(path), "--out", str(root / "run-big"),
                     "--set", "data.batch_size=2048"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "[data] batch_size 2048 is larger than the training store" in err
    assert "(1347 samples)" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "test,message",
    [
        ("raw-floats", "array 'x' (float32, scale 1.0) has values in [0, 240], the training"),
        ("unlabelled", "the test store has no array 'y'"),
        ("no-classes", "array 'y' has labels up to 11 (12 classes)"),
    ],
)
def test_other_mismatches_name_the_store_and_array(root, capsys, test, message):
    path = job_file(root, f"{test}.toml", test=str(root / test))
    assert cli.main(["train", str(path), "--out", str(root / f"run-{test}")]) == 2
    err = capsys.readouterr().err
    assert f"{root / test}: " in err and message in err and err.count("\n") == 1


def test_labels_without_num_classes_are_read_only_when_few(root, monkeypatch):
    store = open_dataset(str(root / "no-classes"))
    assert store.num_classes is None and datacheck.label_bound(store) == 12
    monkeypatch.setattr(datacheck, "MAX_LABELS_READ", 50)  # a "large" store: not read
    assert datacheck.label_bound(store) is None
    job = load_job(job_file(root, "ok.toml"))
    assert datacheck.check_data(job, 2).num_classes == 10
    job["data"]["test"] = str(root / "floats")  # float32 beside uint8, on the same scale: fine
    assert datacheck.check_data(job, 2).num_classes == 10
    with pytest.raises(JobError, match="batch_size 32 does not split over 3 ranks"):
        datacheck.check_data(job, 3)


@MPI_MARKS[0]
@MPI_MARKS[1]
@pytest.mark.timeout(180)
def test_checks_run_before_the_ranks_train_and_say_it_once(root):
    path = job_file(root, "narrow-mpi.toml", test=str(root / "narrow"))
    proc = launch(2, "-m", "distnet.cli", "train", str(path), "--out",
                      str(root / "run-narrow-mpi"), timeout=150)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = [line for line in proc.stderr.splitlines() if "array 'x' samples are (49,)" in line]
    assert len(said) == 2, proc.stderr  # rank 0 alone, and the launcher naming rank 0's cause
    assert said[0].startswith("[0] distnet train: ") and "rank 0 failed first" in said[1]
    assert "running" not in proc.stdout
