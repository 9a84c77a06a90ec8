"""``distnet bench elastic``: what one worker death costs a Ray job, mid-epoch resume vs the
epoch redone from its checkpoint (the fallback, and what the engine did before).

    distnet bench elastic [--data STORE] [--samples 16000] [--workers 2] [--epochs 2]
                          [--strategy allreduce|ps] [--mode sync|async|ssp] [--rounds 3]
                          [--json FILE]

Each round runs the same MLP job three times on one local Ray, in an order that alternates
between rounds: undisturbed, rank 1 killed half way through epoch 1 with mid-epoch resume,
and the same kill with ``mid_epoch_resume=False``. The cost of a death is the killed job's
wall time minus the undisturbed one's of the same round (noisy: Ray's start-up varies by
seconds on a busy machine), and, less noisy, ``after_death_s``: from the driver seeing the
death to the job's end (replacement, set-up, the steps redone and those left). The JSON has
both (median, min, max over rounds) and ``ratio_rollback_vs_mid_epoch`` of ``after_death_s``.
With ``--strategy ps --mode async`` (or ssp) "mid_epoch" is the survivors going on while a
replacement joins the running server (``rayengine/standin.py``), and "rollback" the group
restarted from the epoch checkpoint (``survivors_go_on=False``: what async did before).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

JOB = """
[data]
train = "{train}"
batch_size = {batch}

[model]
type = "mlp"
hidden = [{hidden}]

[finetune]
epochs = {epochs}
optimizer = "sgd"
lr = 0.05
momentum = 0.9

[run]
out = "{out}"
log_every = 1000
pictures = false
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="a distnet store (default: Fashion-MNIST's, else digits)")
    parser.add_argument("--samples", type=int, default=16000, help="first N samples of it")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--strategy", choices=["allreduce", "ps"], default="allreduce")
    parser.add_argument("--mode", choices=["sync", "async", "ssp"], default="sync",
                        help="parameter-server mode (--strategy ps)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the results here")


def _store(args: argparse.Namespace, root: Path) -> str:
    """A store of the first ``--samples`` samples (written once into ``root``)."""
    from distnet.data import convert_digits, write_dataset  # noqa: PLC0415
    from distnet.train.jobs.samples import read_store  # noqa: PLC0415

    source = args.data
    if source is None and Path("/work/fmnist/zarr/train").exists():
        source = "/work/fmnist/zarr/train"
    if source is None:
        convert_digits(root / "digits", test_fraction=0.25, seed=0, chunk_samples=64)
        return str(root / "digits" / "train")
    x, y = read_store(source)
    n = min(args.samples, len(x))
    x = x[:n].reshape(n, -1).astype("float32") / (255.0 if x.dtype.kind == "u" else 1.0)
    write_dataset(str(root / "subset"), x, y[:n], chunk_samples=256)
    return str(root / "subset")


def _seconds(job_text: str, root: Path, name: str, options: Any) -> tuple[float, dict]:
    from distnet.parallel.rayengine import RayJob  # noqa: PLC0415
    from distnet.train.jobs.load import load_job  # noqa: PLC0415
    from distnet.train.jobs.rayjob import run_rank  # noqa: PLC0415

    out = root / name
    path = root / f"{name}.toml"
    path.write_text(job_text.replace("{out}", str(out)))
    job = load_job(path)
    t0 = time.perf_counter()
    report = RayJob(options, log=lambda line: None, task=run_rank).run(job)
    return time.perf_counter() - t0, report


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from distnet.data import open_dataset  # noqa: PLC0415
    from distnet.parallel.rayengine import RayOptions, start_ray, worker_specs  # noqa: PLC0415

    root = Path(tempfile.mkdtemp(prefix="distnet-bench-elastic-"))
    train = _store(args, root)
    steps = -(-len(open_dataset(train)) // args.batch_size)
    kill_at = steps + steps // 2  # half way through epoch 1
    text = JOB.format(train=train, batch=args.batch_size, hidden=args.hidden,
                      epochs=args.epochs, out="{out}")  # fmt: skip
    ps = {"mode": args.mode, "shards": 2, "staleness": 2} if args.strategy == "ps" else {}
    started = start_ray(None, num_cpus=max(4, args.workers))
    modes = ["undisturbed", "mid_epoch", "rollback"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    recoveries: dict[str, list[Any]] = {"mid_epoch": [], "rollback": []}
    after: dict[str, list[float]] = {"mid_epoch": [], "rollback": []}
    try:
        for r in range(args.rounds):
            order = modes if r % 2 == 0 else modes[::-1]
            for mode in order:
                options = RayOptions(
                    workers=worker_specs(args.workers), strategy=args.strategy, ps=ps,
                    fail_at_step={} if mode == "undisturbed" else {1: kill_at},
                    mid_epoch_resume=mode != "rollback", survivors_go_on=mode != "rollback",
                )  # fmt: skip
                seconds, report = _seconds(text, root, f"{mode}-{r}", options)
                times[mode].append(seconds)
                if mode != "undisturbed":
                    recoveries[mode].append(report["recoveries"])
                    after[mode].append(seconds - report["recoveries"][0]["at_s"])
                print(f"round {r} {mode}: {seconds:.1f} s", flush=True)
    finally:
        if started:
            import ray  # noqa: PLC0415

            ray.shutdown()
    cost = {m: [t - u for t, u in zip(times[m], times["undisturbed"], strict=True)]
            for m in ("mid_epoch", "rollback")}  # fmt: skip
    ratios = [b / a for a, b in zip(after["mid_epoch"], after["rollback"], strict=True) if a > 0]
    result = {
        "setup": {"store": train, "steps_per_epoch": steps, "kill_at_step": kill_at,
                  "workers": args.workers, "strategy": args.strategy, "epochs": args.epochs,
                  "mode": args.mode if args.strategy == "ps" else None,
                  "rounds": args.rounds},
        "seconds": {m: _stats(v) for m, v in times.items()},
        "death_cost_s": {m: _stats(v) for m, v in cost.items()},
        "after_death_s": {m: _stats(v) for m, v in after.items()},
        "ratio_rollback_vs_mid_epoch": _stats(ratios) if ratios else None,
        "recoveries": recoveries,
    }  # fmt: skip
    shown = ("seconds", "death_cost_s", "after_death_s", "ratio_rollback_vs_mid_epoch")
    print(json.dumps({k: result[k] for k in shown}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0
