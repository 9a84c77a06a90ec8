"""`distnet demo` and `distnet report`, run small."""

from __future__ import annotations

import json

import pytest

from distnet import cli

pytest.importorskip("sklearn")


def test_demo_runs_on_two_mpi_workers_writes_its_report_and_resumes(tmp_path, capfd):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--epochs",
        "2",
        "--finetune-epochs",
        "3",
        "--hidden",
        "32",
        "16",
        "--workers",
        "2",
    ]
    assert cli.main(args) == 0
    printed = capfd.readouterr().out  # the workers are real mpiexec ranks
    assert "2 rank(s)" in printed and "engine MPICommunicator" in printed
    assert "[stage 1/3] pretrain-0: running" in printed
    assert "[stage 3/3] finetune: done" in printed
    assert "test accuracy" in printed
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["pretrain-0", "pretrain-1", "finetune"]
    assert all(s["done"] for s in report["stages"])
    assert len(report["stages"][0]["history"]["loss"]) == 2
    assert report["workers"] == 2
    assert 0.5 <= report["test_accuracy"] <= 1.0  # tiny net, 3 epochs: far above chance
    for name in ("filters.png", "reconstructions.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run skips the finished stages and reports the same accuracy
    assert cli.main(args) == 0
    again = capfd.readouterr().out
    assert again.count("done, skipped") == 3
    assert json.loads((out / "report.json").read_text())["test_accuracy"] == pytest.approx(
        report["test_accuracy"]
    )
    # other settings in the same directory: refused, not silently mixed
    assert cli.main([*args[:-2], "--workers", "1", "--epochs", "3"]) == 2

    assert cli.main(["report", str(out)]) == 0
    summary = capfd.readouterr().out
    assert "pretrain-1: done, 2 epochs" in summary
    assert f"test accuracy: {report['test_accuracy']:.4f}" in summary
    assert "filters.png" in summary


def test_report_of_a_missing_or_unfinished_run(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2  # bad input
    (tmp_path / "run" / "stages" / "0-pretrain-0").mkdir(parents=True)
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    assert "0. pretrain-0: not done" in capsys.readouterr().out
