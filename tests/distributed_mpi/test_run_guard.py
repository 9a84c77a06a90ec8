"""A job run again in its run directory: changed settings of a started stage are refused before
any engine starts, more epochs continue a stage, ``--restart`` starts afresh, and the records
say what was trained (local, real mpiexec, a real local Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers.jobs import mlp_job, write_job
from helpers.mpi import MPI_MARKS, launch
from helpers.params import checkpoint_arrays, flat

from distnet import cli

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def root(digits):
    return digits


def sae_job(pretrain_epochs: int = 1, finetune_epochs: int = 1) -> str:
    """A small stacked autoencoder: two pretraining stages, then fine-tuning."""
    text = mlp_job("data/train", test="data/test", epochs=finetune_epochs)
    text = text.replace('type = "mlp"', 'type = "stacked_autoencoder"')
    text = text.replace("hidden = [32]", "hidden = [24, 16]").replace('"tanh"', '"sigmoid"')
    return text + f"\n[pretrain]\nepochs = {pretrain_epochs}\n"


def train(*argv: str) -> int:
    return cli.main(["train", *map(str, argv), "--quiet"])


def segments(out, stage: str) -> list[tuple[int, int]]:
    record = json.loads((out / "stages" / stage / "trained.json").read_text())
    return [(s["from_epoch"], s["to_epoch"]) for s in record["segments"]]


def test_changed_setting_is_refused_in_one_line_and_restart_starts_afresh(root):
    path = write_job(root / "mlp.toml", mlp_job("data/train", test="data/test", epochs=2))
    out = root / "run-refuse"
    assert train(path, "--out", out) == 0
    report = (out / "report.json").read_text()
    (out / "notes-of-the-old-run.txt").write_text("stale")
    cmd = [sys.executable, "-m", "distnet.cli", "train", str(path), "--out", str(out)]
    proc = subprocess.run([*cmd, "--set", "finetune.lr=0.05", "--set", "run.log_every=1"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "finetune.lr 0.1 -> 0.05" in lines[0] and "--restart" in lines[0]
    assert "log_every" not in lines[0]  # it does not change what is trained
    assert "running" not in proc.stdout  # refused before anything ran
    assert (out / "report.json").read_text() == report  # the records still say what ran
    proc = subprocess.run([*cmd, "--set", "finetune.lr=0.05", "--restart"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (out / "notes-of-the-old-run.txt").exists()
    assert (root / "data" / "train").is_dir() and path.exists()  # the job's own files stay
    saved = json.loads((out / "report.json").read_text())
    trained = saved["stages"][0]["trained"]
    assert trained["settings"]["finetune.lr"] == 0.05 == saved["job"]["finetune"]["lr"]
    assert segments(out, "0-train") == [(0, 2)]


def test_restart_never_empties_a_directory_that_holds_no_run(root, capsys):
    path = write_job(root / "mlp-r.toml", mlp_job("data/train", test="data/test", epochs=1))
    out = root / "not-a-run"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert train(path, "--out", out, "--restart") == 2
    assert "holds no distnet run" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize(
    "change,message",
    [
        (["--set", "model.hidden=[16]"], "model.hidden [32] -> [16]"),
        (["--set", "model.type=stacked_autoencoder"], 'model.type "mlp" -> "stacked_autoencoder"'),
        (["--set", "finetune.epochs=1"], "finetune.epochs 2 -> 1 (stage train has trained 2"),
        (["--set", "data.batch_size=64"], "data.batch_size 32 -> 64"),
        (["--set", "run.seed=1"], "run.seed 0 -> 1"),
    ],
)
def test_changes_that_alter_what_was_trained_are_refused(root, capsys, change, message):
    path = write_job(root / "mlp-c.toml", mlp_job("data/train", test="data/test", epochs=2))
    out = root / "run-changes"
    if not (out / "report.json").exists():
        assert train(path, "--out", out) == 0
    capsys.readouterr()
    assert train(path, "--out", out, *change) == 2
    err = capsys.readouterr().err
    assert message in err and "--restart" in err and err.count("\n") == 1


def test_settings_that_do_not_change_training_are_accepted(root, capsys):
    path = write_job(root / "mlp-a.toml", mlp_job("data/train", test="data/test", epochs=2))
    out = root / "run-accept"
    assert train(path, "--out", out) == 0
    changes = ["--set", "run.log_every=1", "--set", "run.pictures=true", "--set",
               "run.report=true", "--set", "dist.bucket_mb=1.0", "--set",
               "run.on_nonfinite=skip"]  # fmt: skip
    assert cli.main(["train", str(path), "--out", str(out), *changes]) == 0
    assert "train: done, skipped" in capsys.readouterr().out
    assert segments(out, "0-train") == [(0, 2)]


def test_more_epochs_continue_and_equal_a_run_with_them_from_the_start(root, capsys):
    path = write_job(root / "mlp-e.toml", mlp_job("data/train", test="data/test", epochs=2))
    out, direct = root / "run-more", root / "run-direct"
    assert train(path, "--out", out) == 0
    capsys.readouterr()
    more = ["--set", "finetune.epochs=4", "--set", "run.report=true"]  # the page of both runs
    assert cli.main(["train", str(path), "--out", str(out), *more]) == 0
    printed = capsys.readouterr().out
    assert "stage train: 2 epochs trained, continuing to 4" in printed
    assert "done, skipped" not in printed
    assert train(path, "--out", direct, "--set", "finetune.epochs=4") == 0
    np.testing.assert_array_equal(
        flat(checkpoint_arrays(out, "")), flat(checkpoint_arrays(direct, ""))
    )
    report = json.loads((out / "report.json").read_text())
    assert len(report["stages"][0]["history"]["loss"]) == 4
    assert report["stages"][0]["epochs"] == 4 == report["job"]["finetune"]["epochs"]
    assert segments(out, "0-train") == [(0, 2), (2, 4)]
    assert len(json.loads((out / "run.json").read_text())["invocations"]) == 2
    page = (out / "report.html").read_text()
    assert "0-2: local (one process) × 1; 2-4: local (one process) × 1" in page
    assert train(path, "--out", out, "--set", "finetune.epochs=4") == 0  # now done: skipped


def test_more_pretraining_epochs_continue_the_layer_and_retrain_the_later_stages(root, capsys):
    path = write_job(root / "sae.toml", sae_job(pretrain_epochs=1))
    out, direct = root / "sae-more", root / "sae-direct"
    assert train(path, "--out", out) == 0
    assert train(path, "--out", out, "--set", "pretrain.epochs=2") == 0
    assert train(path, "--out", direct, "--set", "pretrain.epochs=2") == 0
    np.testing.assert_array_equal(
        flat(checkpoint_arrays(out, "")), flat(checkpoint_arrays(direct, ""))
    )
    assert segments(out, "0-pretrain-0") == [(0, 1), (1, 2)]
    assert segments(out, "2-finetune") == [(0, 1)]  # trained again on the new encoders
    # a finished layer's settings are refused; a change to a stage not yet run is not
    capsys.readouterr()
    assert train(path, "--out", out, "--set", "pretrain.epochs=2",
                 "--set", "pretrain.lr=[0.001, 0.01]") == 2  # fmt: skip
    assert "pretrain.lr 0.001 -> 0.01" in capsys.readouterr().err


def test_cosine_schedule_refuses_another_total_and_a_started_stage_is_guarded(root, capsys):
    text = mlp_job("data/train", test="data/test", epochs=2)
    path = write_job(
        root / "cos.toml", text.replace("[finetune]", '[finetune]\nschedule = "cosine"')
    )
    out = root / "run-cosine"
    assert train(path, "--out", out) == 0
    capsys.readouterr()
    assert train(path, "--out", out, "--set", "finetune.epochs=3") == 2
    assert "cosine schedule's curve depends on the total" in capsys.readouterr().err
    # a stage cut off after its epoch checkpoint (no commit) is guarded as well
    (out / "stages" / "0-train" / "manifest.json").unlink()
    assert train(path, "--out", out, "--set", "finetune.lr=0.2") == 2
    assert "(train, at epoch 2)" in capsys.readouterr().err


@MPI_MARKS[0]
@MPI_MARKS[1]
@pytest.mark.timeout(300)
def test_the_guard_refuses_and_continues_on_mpi_ranks(root):
    path = write_job(root / "mlp-mpi.toml", mlp_job("data/train", test="data/test", epochs=1))
    out = root / "run-mpi"
    cmd = ["-m", "distnet.cli", "train", str(path), "--out", str(out), "--quiet"]
    proc = launch(2, *cmd, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = launch(2, *cmd, "--set", "finetune.lr=0.05", timeout=240)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # rank 0 alone says it, and the launcher names it: rank 0 ended before MPI_Init, so the
    # peer waiting for it there is stopped at once, not after the failure grace (lifetime.py)
    assert proc.stderr.count("finetune.lr 0.1 -> 0.05") == 2, proc.stderr
    assert "rank 0 failed first: JobError: " in proc.stderr, proc.stderr
    proc = launch(2, *cmd, "--set", "finetune.epochs=2", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert len(report["stages"][0]["history"]["loss"]) == 2
    record = report["stages"][0]["trained"]["segments"]
    assert [(s["from_epoch"], s["to_epoch"], s["engine"], s["workers"]) for s in record] == [
        (0, 1, "MPICommunicator", 2), (1, 2, "MPICommunicator", 2)]  # fmt: skip
    # --restart: rank 0 empties the run directory before the ranks start, then all train
    proc = launch(2, *cmd, "--set", "finetune.lr=0.05", "--restart", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert segments(out, "0-train") == [(0, 1)]
    assert len(json.loads((out / "run.json").read_text())["invocations"]) == 1


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_guard_refuses_before_ray_starts_and_continues_on_ray(root, ray_cluster, capsys):
    path = write_job(root / "mlp-ray.toml", mlp_job("data/train", test="data/test", epochs=1))
    out = root / "run-ray"
    ray_args = ["--engine", "ray", "--workers", "2"]
    assert train(path, "--out", out, *ray_args) == 0
    capsys.readouterr()
    assert train(path, "--out", out, *ray_args, "--set", "finetune.lr=0.05") == 2
    captured = capsys.readouterr()
    assert "finetune.lr 0.1 -> 0.05" in captured.err and "RayCommunicator" not in captured.out
    assert train(path, "--out", out, *ray_args, "--set", "finetune.epochs=2") == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["stages"][0]["history"]["loss"]) == 2
    assert segments(out, "0-train") == [(0, 1), (1, 2)]
    record = report["stages"][0]["trained"]["segments"]
    assert {s["engine"] for s in record} == {"RayCommunicator"}
