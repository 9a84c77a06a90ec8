"""`distnet train JOB.toml`: in one process and across real mpiexec ranks."""

from __future__ import annotations

import json

import pytest
from helpers.jobs import write_job
from helpers.mpi import launch

from distnet import cli

pytest.importorskip("sklearn")

MLP_JOB = """
[data]
train = "data/train"
test = "data/test"
batch_size = {batch}

[model]
type = "mlp"
hidden = [64]
activation = "relu"

[finetune]
epochs = 15
lr = 0.003

[run]
log_every = 100
"""


@pytest.fixture(scope="module")
def job_dir(digits):
    """Where this module's job files go, beside the digits stores they name."""
    return digits


def test_mlp_job_trains_in_one_process_and_resumes(job_dir, capsys):
    path = write_job(job_dir / "mlp.toml", MLP_JOB.format(batch=32))
    out = job_dir / "run-local"
    assert cli.main(["train", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[stage 1/1] train: done" in printed
    assert f"report: {out / 'report.html'}" in printed and (out / "report.html").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["workers"] == 1 and report["engine"] == "LocalCommunicator"
    assert report["test_accuracy"] >= 0.93
    assert len(report["stages"][0]["history"]["loss"]) == 15
    assert (out / "filters-final.png").exists()
    assert cli.main(["train", str(path), "--out", str(out)]) == 0
    assert "train: done, skipped" in capsys.readouterr().out


def test_without_the_page_a_run_keeps_its_records_and_distnet_report_draws_it(job_dir, capsys):
    path = write_job(
        job_dir / "mlp-quiet.toml",
        MLP_JOB.format(batch=64)
        .replace("epochs = 15", "epochs = 2")
        .replace("log_every = 100", "log_every = 100\nreport = false"),
    )
    out = job_dir / "run-no-page"
    assert cli.main(["train", str(path), "--out", str(out)]) == 0
    assert f"report: {out / 'report.json'}" in capsys.readouterr().out
    assert not (out / "report.html").exists()
    assert json.loads((out / "report.json").read_text())["test_accuracy"] > 0.5
    assert cli.main(["report", str(out)]) == 0  # drawn from the records when asked
    assert "loss curves" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    "text,message",
    [
        ("[data]\ntrain = 'x'\n[modle]\ntype = 'mlp'\n", "unknown section [modle]"),
        ("[data]\ntrain = 'x'\nbatchsize = 3\n", "unknown key 'batchsize' in [data]"),
        ("[model]\ntype = 'mlp'\n", "[data] train: expected the path or URL of a distnet"),
        ("[data]\ntrain = 'x'\n[model]\ntype = 'rnn'\n", "[model] type: expected 'stacked_"),
        ("[data]\ntrain = 'x'\n[model]\nhidden = 100\n", "[model] hidden: expected a non-"),
        (
            "[data]\ntrain = 'x'\n[pretrain]\nepochs = -1\n",
            "[pretrain] epochs: expected an integer >= 0 (epochs per layer), or a list of "
            "them, one per hidden layer, got -1",
        ),
        ("[data\ntrain = 'x'\n", "not valid TOML"),
    ],
)
def test_bad_job_files_name_the_file_and_key(job_dir, capsys, text, message):
    path = write_job(job_dir / "bad.toml", text)
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err


def test_missing_job_file_and_store(job_dir, capsys):
    assert cli.main(["train", str(job_dir / "nope.toml")]) == 2
    assert "no such job file" in capsys.readouterr().err
    path = write_job(job_dir / "nostore.toml", "[data]\ntrain = 'missing-store'\n")
    assert cli.main(["train", str(path)]) == 2
    assert "missing-store" in capsys.readouterr().err


def launch_train(job_dir, job_path, out, np_=2, timeout=180):
    """``distnet train JOB --out OUT`` on ``np_`` real MPI ranks, run in ``job_dir``."""
    command = ("-m", "distnet.cli", "train", str(job_path), "--out", str(out))
    return launch(np_, *command, timeout=timeout, cwd=job_dir)


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_mlp_job_on_two_mpi_ranks(job_dir):
    path = write_job(job_dir / "mlp2.toml", MLP_JOB.format(batch=32))
    out = job_dir / "run-mpi"
    proc = launch_train(job_dir, path, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 rank(s) x batch 16" in proc.stdout
    assert proc.stdout.count("test accuracy") == 1  # rank 0 alone prints
    report = json.loads((out / "report.json").read_text())
    assert report["workers"] == 2 and report["engine"] == "MPICommunicator"
    assert report["test_accuracy"] >= 0.93


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_batch_that_does_not_split_over_the_ranks_fails_cleanly(job_dir):
    path = write_job(job_dir / "odd.toml", MLP_JOB.format(batch=33))
    proc = launch_train(job_dir, path, job_dir / "run-odd")
    assert proc.returncode != 0
    assert "batch_size 33 does not split over 2 ranks" in proc.stderr


def test_image_shaped_store_is_flattened_for_dense_models(tmp_path, capsys):
    from distnet.data import digits_arrays, write_dataset

    x, y = digits_arrays()
    attrs = {"scale": 1 / 16}
    write_dataset(tmp_path / "img" / "train", x[:1200].reshape(-1, 8, 8), y[:1200], attrs=attrs)
    write_dataset(tmp_path / "img" / "test", x[1200:].reshape(-1, 8, 8), y[1200:], attrs=attrs)
    job = MLP_JOB.format(batch=32).replace("data/", "img/")
    path = write_job(tmp_path / "img.toml", job)
    assert cli.main(["train", str(path), "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["model"] == "mlp 64-64-10"
    assert report["test_accuracy"] >= 0.85


@pytest.mark.gpu
@pytest.mark.skipif(
    __import__("distnet.backend").backend.gpu_skip_reason() is not None,
    reason="needs a CUDA GPU and cupy",
)
def test_mlp_job_on_a_gpu(job_dir):
    job = MLP_JOB.format(batch=32) + '\ndevice = "cuda"\n'
    path = write_job(job_dir / "gpu.toml", job)
    assert cli.main(["train", str(path), "--out", str(job_dir / "run-gpu")]) == 0
    report = json.loads((job_dir / "run-gpu" / "report.json").read_text())
    assert report["test_accuracy"] >= 0.93


@pytest.mark.parametrize("name", ["digits_sae.toml", "fashion_sae.toml"])
def test_example_jobs_in_launch_jobs_load(name):
    from pathlib import Path

    from distnet.train.jobs.job import load_job

    job = load_job(Path(__file__).parents[2] / "launch" / "jobs" / name)
    assert job["model"]["type"] == "stacked_autoencoder"
    assert job["data"]["train"].endswith("/train")


def test_paths_in_a_job_file_are_relative_to_it_and_overrides_keep_other_keys(tmp_path):
    from distnet.train.jobs.job import load_job

    sub = tmp_path / "jobs"
    sub.mkdir()
    path = write_job(sub / "j.toml", "[data]\ntrain = 'd/train'\n[run]\nout = 'r'\nseed = 7\n")
    job = load_job(path)
    assert job["data"]["train"] == str(sub / "d" / "train")
    assert job["run"]["out"] == str(sub / "r")
    job = load_job(path, {"run": {"out": "elsewhere"}})
    assert job["run"] == {**job["run"], "out": "elsewhere", "seed": 7}


def test_rank_noise_differs_across_ranks_and_repeats_for_the_same_step():
    import numpy as np

    from distnet import backend
    from distnet.train.jobs.job import RankNoise

    def draws(rank, step):
        RankNoise(seed=0, stage=1, rank=rank).on_batch_begin(0, {"step": step})
        return backend.random_like((5,), np.zeros(1, np.float32))

    np.testing.assert_array_equal(draws(0, 3), draws(0, 3))  # a redone step: same noise
    assert not np.array_equal(draws(0, 3), draws(1, 3))  # other rank: other masks
    assert not np.array_equal(draws(0, 3), draws(0, 4))
