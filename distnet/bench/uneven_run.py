"""One run of ``distnet bench uneven``: a digits MLP job on local Ray workers, some of them
slowed (``throttle.py``), with rank 0's epoch lines stamped with the wall time where they
were printed (not where the driver fetched them, up to half a second later).

``run_contender`` starts the workers, throttles them by rank as soon as the driver knows
their pids, optionally changes one factor half way through (``change``), and returns the
epoch curve (time, epoch, logged metrics), the share history and rank 0's report.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distnet.bench.throttle import DutyCycleThrottle

JOB = """
[data]
train = "{train}"
test = "{test}"
batch_size = {batch}
validation_fraction = 0.2

[model]
type = "{type}"
hidden = [{hidden}]
activation = "relu"
layers = ["conv 16 3 pad=1", "relu", "conv 32 3 pad=1", "relu", "maxpool 2", "dense 64", "relu"]

[finetune]
epochs = {epochs}
optimizer = "adam"
lr = {lr}
weight_decay = 0.0
schedule = "cosine"

[run]
out = "{out}"
log_every = 1
pictures = false
"""


# an epoch's end ("    epoch   3/8  loss=... val_accuracy=..."), not a progress line within
# one ("    [train] epoch 3/8 step 40  loss=...")
def digits_stores(root: Path, shifts: int) -> tuple[str, str]:
    """Digits' training part, each image also shifted by one pixel in up to 4 directions
    (``shifts``: more samples per epoch, so large batches still give many steps), and its
    test part; both in [0, 1]."""
    import numpy as np  # noqa: PLC0415

    from distnet.data import convert_digits, write_dataset  # noqa: PLC0415
    from distnet.train.jobs.samples import read_store  # noqa: PLC0415

    convert_digits(str(root / "digits"), test_fraction=0.25, seed=0, chunk_samples=64)
    x, y = read_store(str(root / "digits" / "train"))
    images = np.asarray(x, dtype=np.float32).reshape(len(x), 8, 8) / 16.0  # into [0, 1]
    moved = [images]
    for axis, step in [(1, 1), (1, -1), (2, 1), (2, -1)][:shifts]:
        shifted = np.roll(images, step, axis=axis)
        edge = [slice(None)] * 3
        edge[axis] = 0 if step > 0 else -1
        shifted[tuple(edge)] = 0.0  # shifted in, not wrapped round
        moved.append(shifted)
    order = np.random.default_rng(0).permutation(len(moved) * len(x))
    xs = np.concatenate(moved)[order]  # (n, 8, 8): an MLP flattens, a CNN sees one channel
    ys = np.concatenate([np.asarray(y)] * len(moved))[order]
    write_dataset(str(root / "train"), xs, ys, chunk_samples=128)
    x_test, y_test = read_store(str(root / "digits" / "test"))
    x_test = np.asarray(x_test, np.float32).reshape(-1, 8, 8) / 16.0
    write_dataset(str(root / "test"), x_test, y_test)
    return str(root / "train"), str(root / "test")


# an epoch's end
EPOCH_LINE = re.compile(r"^\s*epoch\s+(\d+)/(\d+)\s+(?!step)(.*)$")


def timed_rank(
    comm: Any, generation: int, job: dict[str, Any], spec: dict[str, Any], log: Any
) -> dict[str, Any]:
    """``run_rank`` whose progress lines start with the wall time they were printed at."""
    from distnet.train.jobs.rayjob import run_rank  # noqa: PLC0415

    return run_rank(comm, generation, job, spec, lambda line: log(f"{time.time():.4f} {line}"))


@dataclass
class Contender:
    """One way to run the job: the engine's strategy and options."""

    name: str
    strategy: str = "allreduce"
    ps: dict[str, Any] = field(default_factory=dict)
    rebalance_every: int = 0  # 0: equal shares all along


@dataclass
class Change:
    """Half way through (after epoch ``epochs // 2``), rank ``rank``'s factor becomes ``factor``."""

    rank: int
    factor: float


class EpochCurve:
    """The driver's log: keeps rank 0's stamped epoch lines, calls ``on_epoch(epoch, total)``."""

    def __init__(self, on_epoch: Any = None) -> None:
        self.points: list[dict[str, Any]] = []  # {"t", "epoch", metric: value}
        self.on_epoch = on_epoch

    def __call__(self, line: str) -> None:
        stamp, _, rest = line.partition(" ")
        match = EPOCH_LINE.search(rest)
        if match is None:
            return
        try:
            t = float(stamp)
            pairs = (kv.split("=", 1) for kv in match.group(3).split() if "=" in kv)
            metrics = {k: float(v) for k, v in pairs}
        except ValueError:
            return  # not one of timed_rank's lines
        epoch, total = int(match.group(1)), int(match.group(2))
        self.points.append({"t": t, "epoch": epoch, **metrics})
        if self.on_epoch is not None:
            self.on_epoch(epoch, total)


def _throttle_when_placed(
    ray_job: Any, throttle: DutyCycleThrottle, factors: list[float], done: threading.Event
) -> None:
    """Sets each rank's factor once the driver knows the workers' pids (actor i is rank i)."""
    while not done.is_set():
        info = list(ray_job.worker_info)
        if len(info) >= len(factors):
            for rank, factor in enumerate(factors):
                throttle.set_factor(info[rank]["pid"], factor)
            return
        done.wait(0.02)


def run_contender(
    contender: Contender,
    job_text: str,
    root: Path,
    specs: list[Any],
    factors: list[float],
    change: Change | None = None,
) -> dict[str, Any]:
    """Runs the job once as ``contender`` with ranks slowed by ``factors`` (one per worker);
    returns {"curve", "shares", "report", "wall_s", "change"}."""
    from distnet.parallel.rayengine import RayJob, RayOptions  # noqa: PLC0415
    from distnet.train.jobs.load import load_job  # noqa: PLC0415

    out = root / contender.name
    path = root / f"{contender.name}.toml"
    path.write_text(job_text.replace("{out}", str(out)))
    options = RayOptions(
        workers=specs, strategy=contender.strategy, ps=contender.ps,
        rebalance_every=contender.rebalance_every,
    )  # fmt: skip
    ray_job = RayJob(options, log=lambda line: None, task=timed_rank)
    throttle = DutyCycleThrottle()
    changed: dict[str, Any] = {}

    def on_epoch(epoch: int, total: int) -> None:
        if change is not None and not changed and epoch >= total // 2 and ray_job.worker_info:
            throttle.set_factor(ray_job.worker_info[change.rank]["pid"], change.factor)
            changed.update(rank=change.rank, factor=change.factor, after_epoch=epoch,
                           t=time.time())  # fmt: skip

    curve = EpochCurve(on_epoch)
    ray_job.log = curve
    done = threading.Event()
    attach = threading.Thread(
        target=_throttle_when_placed, args=(ray_job, throttle, factors, done), daemon=True
    )
    t0 = time.perf_counter()
    with throttle:
        attach.start()
        try:
            report = ray_job.run(load_job(path))
        finally:
            done.set()
            attach.join(timeout=5.0)
    return {"curve": curve.points, "shares": report.get("shares", []), "report": report,
            "wall_s": time.perf_counter() - t0, "change": changed or None}  # fmt: skip


Runner = Callable[..., dict[str, Any]]  # (contender, devices, factors, change=None) -> a run


@contextlib.contextmanager
def engine_runs(
    engine: str, text: str, root: Path, devices: list[str], slow_by: str = "throttle"
) -> Iterator[Runner]:
    """A function that runs the job once on ``engine`` (a local Ray started for the duration,
    or ``distnet launch`` per run); ``slow_by`` (MPI): "throttle" or "delay"."""
    if engine == "mpi":
        from distnet.bench.uneven_mpi import run_mpi_contender  # noqa: PLC0415

        def on_mpi(contender: Contender, devs: list[str], factors: list[float],
                   change: Change | None = None) -> dict[str, Any]:  # fmt: skip
            return run_mpi_contender(contender, text, root, devs, factors, change, slow_by)

        yield on_mpi
        return
    from distnet.parallel.rayengine import WorkerSpec, start_ray  # noqa: PLC0415

    def on_ray(contender: Contender, devs: list[str], factors: list[float],
               change: Change | None = None) -> dict[str, Any]:  # fmt: skip
        specs = [WorkerSpec(d, 1.0, 1.0 if d == "cuda" else 0.0) for d in devs]
        return run_contender(contender, text, root, specs, factors, change)

    workers = len(devices)
    started = start_ray(None, num_cpus=max(4, workers + 2), num_gpus=devices.count("cuda"))
    try:
        yield on_ray
    finally:
        if started:
            import ray  # noqa: PLC0415

            ray.shutdown()
