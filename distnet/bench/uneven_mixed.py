"""``distnet bench uneven --devices cuda,cpu,cpu``: a group of GPU and CPU workers against
each kind of worker alone, on either engine.

``parse_devices`` checks the list before anything starts and ``no_gpu_line`` is the one line a
machine without a GPU gets (exit 2): nothing is started there. With a GPU the benchmark runs
the group (the throughput contender, no throttling), then a GPU worker alone and a CPU worker
alone (``alone_runs``), and ``mixed_gain`` compares the group's samples/s with the GPU
worker's plus 0.8 times the CPU workers' (issue 22's target).

On Ray each worker is an actor with its own device (``WorkerSpec``); on MPI every rank runs
the same command, so each rank picks its entry of the list by its rank
(``distnet.bench.uneven_mpi``: ``--set run.device=...``); a GPU rank beside CPU ranks stages
its gradients through host memory (``DistributedOptimizer._setup_gpu``: no NCCL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DEVICES = ("cpu", "cuda")
CPU_WEIGHT = 0.8  # the target: the group >= the GPU alone + 0.8 x each CPU worker alone


def gpu_count() -> int:
    """GPUs cupy sees (0 without cupy or a driver)."""
    try:
        import cupy  # noqa: PLC0415

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no cupy, no driver, no device: all mean none here
        return 0


def parse_devices(text: str | None, workers: int) -> list[str]:
    """``"cuda,cpu,cpu"`` -> ["cuda", "cpu", "cpu"] (None: ``workers`` CPU workers); SystemExit
    in one line for a name that is not cpu/cuda or fewer than 2 workers."""
    devices = [d.strip() for d in text.split(",")] if text else ["cpu"] * workers
    bad = [d for d in devices if d not in DEVICES]
    if bad:
        raise SystemExit(f"distnet bench uneven: --devices {text}: {bad} not cpu/cuda")
    if len(devices) < 2:
        raise SystemExit(f"distnet bench uneven: needs >= 2 workers (got {len(devices)})")
    return devices


def no_gpu_line(devices: list[str], gpus: int, text: str | None) -> str | None:
    """The one-line refusal when ``devices`` asks for more GPU workers than ``gpus`` (None:
    ready to run)."""
    wanted = devices.count("cuda")
    if wanted == 0 or gpus > 0:
        return None
    return (f"distnet bench uneven: no GPU found: --devices {text} needs cupy and a CUDA device "
            f"(cupy is missing or sees no device); without --devices the CPU-only runs need "
            f"neither")  # fmt: skip


def curve_rate(run: dict[str, Any], n_train: int) -> float:
    """Samples/s of a run from its epoch curve: the epochs after the first over their time."""
    curve = run["curve"]
    return (len(curve) - 1) * n_train / max(curve[-1]["t"] - curve[0]["t"], 1e-9)


def mixed_gain(group: float, gpu: float, cpu: float, cpu_workers: int) -> dict[str, Any]:
    """The gain of adding ``cpu_workers`` CPU workers to one GPU worker, from samples/s of the
    group, the GPU worker alone and one CPU worker alone: met when ``group >= gpu + 0.8 *
    cpu * cpu_workers``; ``cpu_yield`` is the fraction of the CPU workers' own rate the group
    gained (1: every CPU sample added; 0.8: the target; < 0: the group is slower than the GPU
    worker alone)."""
    if min(group, gpu, cpu) < 0 or cpu_workers < 1:
        raise ValueError(f"rates >= 0 and >= 1 CPU worker: {group}, {gpu}, {cpu}, {cpu_workers}")
    target = gpu + CPU_WEIGHT * cpu * cpu_workers
    cpu_sum = cpu * cpu_workers
    return {"met": group >= target, "group_samples_per_s": round(group, 1),
            "gpu_alone": round(gpu, 1), "cpu_alone": round(cpu, 1), "cpu_workers": cpu_workers,
            "target": round(target, 1), "gain_samples_per_s": round(group - gpu, 1),
            "cpu_yield": round((group - gpu) / cpu_sum, 3) if cpu_sum > 0 else None}  # fmt: skip


def alone_runs(run_one: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """A GPU worker alone and a CPU worker alone (equal shares, one worker each):
    ``run_one(device)`` runs the engine's job on one worker."""
    return {device: run_one(device) for device in ("cuda", "cpu")}


def mixed_verdict(
    group: dict[str, Any] | None, alone: dict[str, Any], devices: list[str], n_train: int
) -> dict[str, Any]:
    """``mixed_gain`` of the group's run against the runs alone, with their accuracies."""
    if group is None:
        return {"met": False, "why": "run the throughput contender for the mixed group"}
    gain = mixed_gain(curve_rate(group, n_train), curve_rate(alone["cuda"], n_train),
                      curve_rate(alone["cpu"], n_train), devices.count("cpu"))  # fmt: skip
    return {**gain, "group_accuracy": group["report"].get("test_accuracy"),
            "gpu_alone_accuracy": alone["cuda"]["report"].get("test_accuracy")}  # fmt: skip
