"""`distnet report RUN_A RUN_B`: two real runs of the shipped digits job (tiny: 16-16 hidden,
one pretraining epoch per layer, three fine-tuning epochs, one process) at two learning
rates, compared on one page; the validation split they hold out; a failed run's page."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from distnet import cli
from distnet.data import convert_digits, open_dataset

pytest.importorskip("sklearn")
JOB = Path(__file__).parents[2] / "launch" / "jobs" / "digits_sae.toml"
LRS = (0.01, 0.001)


def train(data: Path, out: Path, *sets: str) -> int:
    tiny = ["model.hidden=[16, 16]", "pretrain.epochs=1", "finetune.epochs=3",
            "run.pictures=false", f"data.train='{data / 'train'}'",
            f"data.test='{data / 'test'}'", *sets]  # fmt: skip
    args = ["train", str(JOB), "--out", str(out), "--engine", "local", "--quiet"]
    return cli.main(args + [a for s in tiny for a in ("--set", s)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    convert_digits(root / "data", test_fraction=0.25, seed=0, chunk_samples=64)
    dirs = []
    for lr in LRS:
        out = root / f"lr-{lr}"
        assert train(root / "data", out, f"finetune.lr={lr}") == 0
        dirs.append(out)
    return root, dirs


def blob(path: Path, id_: str) -> dict:
    text = path.read_text()
    found = re.search(f'<script type="application/json" id="{id_}">(.*?)</script>', text, re.S)
    assert found, f"no {id_} in {path}"
    return json.loads(found.group(1).replace("<\\/", "</"))


def test_compare_two_runs_overlays_curves_and_highlights_the_one_setting_that_differs(
    runs, monkeypatch, capsys
):
    from matplotlib import image

    root, (a, b) = runs
    monkeypatch.chdir(root)  # the default place: compare.html in the current directory
    assert cli.main(["report", str(a), str(b)]) == 0
    assert "comparison of 2 runs: compare.html" in capsys.readouterr().out
    page = root / "compare.html"
    assert not (a / "compare.html").exists() and not (b / "compare.html").exists()
    data = blob(page, "distnet-compare-data")
    assert data["labels"] == ["lr-0.01", "lr-0.001"]
    differing = [r for r in data["settings"] if r["differs"]]
    assert [r["key"] for r in differing] == ["finetune.lr"]  # run.out is left out
    assert differing[0]["values"] == list(LRS)
    text = page.read_text()
    assert "<tr class='differs'><td>finetune.lr</td><td>0.01</td><td>0.001</td></tr>" in text
    assert (
        "<tr class='same'><td>finetune.epochs</td><td>3</td><td>3</td></tr>"
        in text.split("<details>")[1]
    )
    for run_dir, result, curves in zip((a, b), data["results"], data["curves"], strict=True):
        report = json.loads((run_dir / "report.json").read_text())
        assert result["test_accuracy"] == pytest.approx(report["test_accuracy"])
        assert result["status"] == "finished" and result["seconds"] > 0
        finetune = next(c for c in curves if c["stage"] == "finetune")
        assert len(finetune["val_loss"]) == len(finetune["val_accuracy"]) == 3
        assert result["val_accuracy"] == pytest.approx(finetune["val_accuracy"][-1])
        assert finetune["lr"] == pytest.approx([report["job"]["finetune"]["lr"]] * 3)
        assert f"{report['test_accuracy']:.2%}" in text
    src = re.search(r'<img src="data:image/png;base64,([^"]+)" alt="curves of every run"', text)
    pixels = image.imread(io.BytesIO(base64.b64decode(src.group(1))), format="png")
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600


def test_compare_with_a_directory_that_is_not_a_run_writes_nothing(runs, tmp_path, capsys):
    _, (a, _) = runs
    (tmp_path / "notes").mkdir()
    out = tmp_path / "c.html"
    assert cli.main(["report", str(a), str(tmp_path / "notes"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'notes'} is not a run directory" in err
    assert not out.exists()
    assert cli.main(["report", str(a), str(tmp_path / "gone"), "--out", str(out)]) == 2
    assert "no such run directory" in capsys.readouterr().err and not out.exists()


def test_validation_split_is_the_stores_tail_and_never_trained_on(tmp_path):
    """The job's training part ends where the held-out samples begin: every batch of two
    ranks over two epochs comes from the part, and together they cover all of it."""
    from helpers.data import labelled_store

    from distnet.data import StreamLoader
    from distnet.data.holdout import hold_out, read_range

    store = labelled_store(tmp_path / "s", n=1000, chunk=64)
    part, held = hold_out(store, 0.1)
    assert held == range(900, 1000) and len(part) == 900  # 900 cuts chunk 14 (896..959)
    seen = []
    for rank in (0, 1):
        loader = StreamLoader(part, global_batch_size=50, rank=rank, world_size=2, seed=3)
        for epoch in range(2):
            loader.set_epoch(epoch)
            seen += [int(v) for _, y in loader for v in y]
        loader.close()
    assert max(seen) < 900  # y is the sample index: no held-out sample in any batch
    assert set(seen) == set(range(900))
    x, y = read_range(store, held)
    assert y.tolist() == list(range(900, 1000)) and x.shape == (100, 3)


def test_a_job_with_validation_records_validation_curves(runs):
    _, (a, _) = runs
    from distnet.train.report.rundata import gather

    data, _ = gather(a)
    n_train = len(open_dataset(str(a.parent / "data" / "train")))
    assert data["report"]["config"]["validation_samples"] == round(0.1 * n_train)
    finetune = next(c for c in data["curves"] if c["stage"] == "finetune")
    assert all(0.0 <= v <= 1.0 for v in finetune["val_accuracy"])
    assert np.isfinite(finetune["val_loss"]).all()


def test_a_failed_run_shows_the_error_the_rank_and_the_stage(runs, tmp_path, capsys):
    """A chunk file of the training store goes missing: the run fails in its first stage,
    and its page says so (status, rank, stage, the error's own words)."""
    import shutil

    root, _ = runs
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    from helpers.data import chunk_file

    chunk_file(data / "train", "x", 5).unlink()
    out = tmp_path / "failed"
    assert train(data, out) == 2
    failure = json.loads((out / "failures" / "rank-0.json").read_text())
    assert failure["stage"] == "pretrain-0" and failure["rank"] == 0
    assert "chunk file is missing" in failure["error"]
    page = (out / "report.html").read_text()
    data_blob = blob(out / "report.html", "distnet-report-data")
    assert data_blob["status"] == "failed: rank 0 in pretrain-0"
    assert "Why it stopped" in page and "chunk file is missing" in page
    assert "unfinished" not in data_blob["status"]
    capsys.readouterr()
    assert cli.main(["report", str(out), "--no-html"]) == 0
    assert "failed: rank 0 in pretrain-0: DatasetError: " in capsys.readouterr().out
