"""The parts of ``distnet bench uneven`` that need no engine: the mixed group's gain over a
GPU worker alone, the checks on ``--devices`` before anything starts, and, for ``--engine
mpi``, the contenders refused, each rank's device, and rank 0's lines read into the epoch curve
and the share history."""

from __future__ import annotations

import argparse

import pytest

from distnet.bench.uneven import contender_names, share_follow
from distnet.bench.uneven_mixed import mixed_gain, mixed_verdict, no_gpu_line, parse_devices
from distnet.bench.uneven_mpi import (
    RankOutput,
    device_for_rank,
    mpi_job_text,
    refuse_contenders,
)
from distnet.bench.uneven_run import Change, EpochCurve


def test_mixed_gain_against_the_gpu_alone_plus_0_8_of_each_cpu_worker() -> None:
    # GPU alone 1000 samples/s, a CPU worker alone 100: the target is 1000 + 0.8 * 2 * 100
    met = mixed_gain(group=1170.0, gpu=1000.0, cpu=100.0, cpu_workers=2)
    assert met["met"] and met["target"] == 1160.0
    assert met["gain_samples_per_s"] == 170.0 and met["cpu_yield"] == 0.85
    missed = mixed_gain(group=1150.0, gpu=1000.0, cpu=100.0, cpu_workers=2)
    assert not missed["met"] and missed["cpu_yield"] == 0.75
    slower = mixed_gain(group=900.0, gpu=1000.0, cpu=100.0, cpu_workers=1)
    assert not slower["met"] and slower["cpu_yield"] == -1.0  # CPU workers held the GPU back
    with pytest.raises(ValueError):
        mixed_gain(group=1.0, gpu=1.0, cpu=1.0, cpu_workers=0)


def test_mixed_verdict_reads_rates_from_the_epoch_curves() -> None:
    def run(seconds_per_epoch: float, accuracy: float) -> dict:
        curve = [{"t": 10.0 + e * seconds_per_epoch, "epoch": e + 1} for e in range(4)]
        return {"curve": curve, "report": {"test_accuracy": accuracy}}

    # 1000 samples per epoch: group 1 s an epoch, GPU alone 1.25 s, a CPU worker alone 5 s
    alone = {"cuda": run(1.25, 0.97), "cpu": run(5.0, 0.96)}
    verdict = mixed_verdict(run(1.0, 0.975), alone, ["cuda", "cpu", "cpu"], n_train=1000)
    assert verdict["group_samples_per_s"] == 1000.0 and verdict["gpu_alone"] == 800.0
    assert verdict["target"] == 800.0 + 0.8 * 2 * 200.0 and verdict["met"] is False
    assert verdict["group_accuracy"] == 0.975 and verdict["gpu_alone_accuracy"] == 0.97
    assert mixed_verdict(None, alone, ["cuda", "cpu"], 1000)["met"] is False


def test_devices_are_checked_before_anything_starts() -> None:
    assert parse_devices(None, 3) == ["cpu", "cpu", "cpu"]
    assert parse_devices("cuda,cpu,cpu", 3) == ["cuda", "cpu", "cpu"]
    with pytest.raises(SystemExit, match="'gpu'.*not cpu/cuda"):
        parse_devices("gpu,cpu", 2)
    with pytest.raises(SystemExit, match=">= 2 workers"):
        parse_devices("cuda", 1)
    line = no_gpu_line(["cuda", "cpu", "cpu"], 0, "cuda,cpu,cpu")
    assert line is not None and "\n" not in line
    assert "no GPU found: --devices cuda,cpu,cpu needs cupy and a CUDA device" in line
    assert no_gpu_line(["cuda", "cpu", "cpu"], 1, "cuda,cpu,cpu") is None  # ready to run
    assert no_gpu_line(["cpu", "cpu"], 0, None) is None


def test_mpi_refuses_the_parameter_server_contenders_in_one_line() -> None:
    assert refuse_contenders(["equal", "throughput"]) is None
    line = refuse_contenders(["equal", "ssp2", "async"])
    assert line is not None and "\n" not in line and "ssp2,async" in line and "Ray" in line

    def names(engine: str, contenders: str | None) -> list[str]:
        return contender_names(argparse.Namespace(engine=engine, contenders=contenders))

    assert names("mpi", None) == ["equal", "throughput"]
    assert names("ray", None) == ["equal", "throughput", "ssp2", "ssp8", "async"]
    with pytest.raises(SystemExit, match="--engine mpi runs equal,throughput only"):
        names("mpi", "equal,sspauto")


def test_each_rank_takes_its_device_and_the_job_gets_an_mpi_section() -> None:
    assert [device_for_rank(["cuda", "cpu", "cpu"], r) for r in range(3)] == ["cuda", "cpu", "cpu"]
    with pytest.raises(SystemExit, match="rank 2"):
        device_for_rank(["cuda", "cpu"], 2)
    through = mpi_job_text("[run]\nout = 'x'", "throughput-1")
    assert 'engine = "mpi"' in through and "rebalance = true" in through
    assert "rebalance_every = 1" in through
    assert "rebalance = false" in mpi_job_text("[run]", "equal-0")
    assert "rebalance = false" in mpi_job_text("[run]", "cuda_alone")


def test_rank_zero_lines_become_the_curve_and_the_share_history() -> None:
    output = RankOutput(EpochCurve())
    lines = [
        "[0] [stage 1/1] train: running",
        "[0]     [train] epoch 1/3 step 1  loss=2.3017  4 samples/s",  # within an epoch
        "[0] rebalance: samples/s [2000.0, 700.5], batch split [64, 64] -> [94, 34] "
        "(fixed ms per step [0.00, 0.00])",
        "[0]     epoch   1/3  loss=1.6623 accuracy=0.4752 val_accuracy=0.7161  60 samples/s",
        "[1]     epoch   1/3  loss=9.0 val_accuracy=0.1",  # another rank's: not the curve
        "[0] rebalance: samples/s [2100.0, 690.0], batch split [94, 34] kept "
        "(fixed ms per step [0.50, 1.25])",
        "[0]     epoch   2/3  loss=0.5982 accuracy=0.8134 val_accuracy=0.8627  1,926 samples/s",
    ]
    for line in lines:
        output(line)
    assert [p["epoch"] for p in output.curve.points] == [1, 2]
    assert output.curve.points[1]["val_accuracy"] == 0.8627
    assert output.curve.points[0]["t"] <= output.curve.points[1]["t"]
    first, second = output.shares
    assert first == {"epoch": 1, "throughput": [2000.0, 700.5], "fixed_s": [0.0, 0.0],
                     "batch_sizes": [94, 34], "kept": False}  # fmt: skip
    assert second["epoch"] == 2 and second["kept"] and second["batch_sizes"] == [94, 34]
    assert second["fixed_s"] == [0.0005, 0.00125]


def test_share_follow_reads_mpi_history_by_epoch() -> None:
    def at(epoch: int, sizes: list[int]) -> dict:
        return {"epoch": epoch, "throughput": [1.0, 1.0], "batch_sizes": sizes}

    history = [at(1, [64, 64]), at(2, [70, 58]), at(3, [100, 28])]
    run = {"shares": history, "change": {"after_epoch": 2}}
    follow = share_follow(run, Change(1, 3.0))  # rank 1 slowed after epoch 2
    assert follow["met"] and follow["share_before"] == round(58 / 128, 3)
    assert follow["share_next_rebalance"] == round(28 / 128, 3)
    run["shares"] = [at(1, [64, 64]), at(2, [70, 58]), at(3, [70, 58])]
    assert not share_follow(run, Change(1, 3.0))["met"]
