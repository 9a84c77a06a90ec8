"""``distnet bench uneven``: time to accuracy when some workers are slower than the others.

    distnet bench uneven [--engine ray|mpi] [--workers 3] [--slow 2:3] [--change 1:3]
                         [--epochs 8] [--rounds 1] [--model cnn|mlp]
                         [--contenders equal,throughput,ssp2,ssp8,async]
                         (also ssp0, ssp1, ssp4, ssp16, sspauto)
                         [--devices cuda,cpu,cpu] [--json FILE]

A digits job (a small CNN by default: much more compute per parameter sent than an MLP, so
steps are not all communication; each training image also shifted by a pixel, ``--shifts``)
on local Ray workers, rank r slowed by a factor k (``--slow r:k``) the way a slower machine
is: stopped and continued on a 10 ms duty cycle (``throttle.py``; no cgroup is touched, the
JSON says whether one was writable). Contenders, one after the other on one Ray, in an order
that alternates between rounds: ``equal`` (sync allreduce, equal shares), ``throughput``
(sync allreduce, shares following each worker's measured samples/s, rebalanced at every
epoch end), ``ssp2``/``ssp8`` (parameter server, bounded staleness 2 and 8), ``async``
(parameter server), and the ideal: the workers' summed compute rates (measured in the
throughput runs) doing the equal run's samples. Times count from the end of the first epoch
(start-up and warm-up left out) to the end of the first epoch whose training loss /
validation accuracy meets the target; ``speedup_vs_equal`` is the median over rounds of the
equal run's time to the target accuracy over the contender's in the same round. Then
``--change r:k`` runs the throughput contender again with rank r's factor changed to k half
way through, and records the share history.

Checks printed: throughput shares within 10% of the ideal's time to the target accuracy; no
contender's final test accuracy below the equal run's by more than 0.5 points; after the
change, the changed rank's share moves the right way at the next rebalance. With
``--devices cuda,cpu,cpu`` (no throttling) the group's samples/s is compared with a GPU
worker alone plus 0.8 times a CPU worker alone for each CPU worker; without a GPU it
refuses in one line (``uneven_mixed.py``).

``--engine mpi`` runs the same job as a real MPI job on ``--workers`` ranks (``distnet
launch``), ranks slowed by ``DISTNET_SLOW_FACTOR`` (``--slow-by delay``, the default: k - 1
times each step's compute slept after backward) or by the duty cycle aimed at each rank's pid
(``--slow-by throttle``), contenders ``equal`` and ``throughput`` (``[dist] rebalance = true``,
a new split at every epoch end) and the ideal; ssp and async are refused in one line (the
parameter server is Ray's). ``uneven_mpi.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from distnet.bench.throttle import METHOD, cgroup_cpu_writable
from distnet.bench.uneven_mixed import (
    alone_runs,
    gpu_count,
    mixed_verdict,
    no_gpu_line,
    parse_devices,
)
from distnet.bench.uneven_mpi import CONTENDERS as MPI_CONTENDERS
from distnet.bench.uneven_mpi import refuse_contenders
from distnet.bench.uneven_run import JOB, Change, Contender, digits_stores, engine_runs

__all__ = ["CONTENDERS", "DEFAULT", "add_arguments", "gpu_count", "run"]

CONTENDERS = {
    "equal": Contender("equal"),
    "throughput": Contender("throughput", rebalance_every=1),
    "ssp2": Contender("ssp2", "ps", {"mode": "ssp", "staleness": 2, "shards": 1}),
    "ssp8": Contender("ssp8", "ps", {"mode": "ssp", "staleness": 8, "shards": 1}),
    "async": Contender("async", "ps", {"mode": "async", "shards": 1}),
}
DEFAULT = list(CONTENDERS)
# on request: staleness = "auto" and the fixed bounds to compare it with (0, 1, 2, 4, 8, 16)
CONTENDERS |= {
    f"ssp{s}": Contender(f"ssp{s}", "ps", {"mode": "ssp", "staleness": s, "shards": 1})
    for s in ("auto", 0, 1, 4, 16)
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["ray", "mpi"], default="ray",
                        help="mpi: equal and throughput shares only")  # fmt: skip
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--slow", default="2:3", help="RANK:FACTOR[,RANK:FACTOR] slowed ranks")
    parser.add_argument("--change",
                        help="RANK:FACTOR from half way on, in a second throughput run "
                             "('none': no such run; the default with --slow-by delay, "
                             "else 1:3)")  # fmt: skip
    parser.add_argument("--slow-by", choices=["throttle", "delay"],
                        help="throttle: the duty cycle (Ray's only way; MPI: by each rank's "
                             "pid); delay: MPI ranks sleep k - 1 times each step's compute "
                             "(DISTNET_SLOW_FACTOR; the default on MPI)")  # fmt: skip
    parser.add_argument("--contenders",
                        help=f"comma-separated, of {','.join(CONTENDERS)} (default: "
                             f"{','.join(DEFAULT)}; --engine mpi: equal,throughput)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, help="global batch (default: 96 per worker)")
    parser.add_argument(
        "--model",
        choices=["cnn", "mlp"],
        default="cnn",
        help="cnn: much more compute per parameter sent (see the docstring)",
    )
    parser.add_argument("--hidden", default="256,256", help="MLP hidden widths")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam's")
    parser.add_argument("--target-loss", type=float, default=0.5, help="training loss")
    parser.add_argument("--target-accuracy", type=float, default=0.85, help="validation")
    parser.add_argument(
        "--shifts",
        type=int,
        default=4,
        choices=range(5),
        help="one-pixel shifted copies of each training image",
    )
    parser.add_argument("--devices", help="e.g. cuda,cpu,cpu: a mixed group, no throttling")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of every contender, in alternating order (medians)",
    )
    parser.add_argument("--json", help="write the results here")


def parse_factors(text: str, workers: int, what: str) -> dict[int, float]:
    """``"2:3,1:1.5"`` -> {2: 3.0, 1: 1.5}; SystemExit naming ``what`` when malformed."""
    out: dict[int, float] = {}
    for item in filter(None, text.split(",")):
        rank, sep, factor = item.partition(":")
        try:
            r, k = int(rank), float(factor)
        except ValueError:
            r, k = -1, 0.0
        if not sep or not 0 <= r < workers or not k >= 1.0:
            raise SystemExit(
                f"distnet bench uneven: {what} {item!r}: expected RANK:FACTOR with RANK in "
                f"0..{workers - 1} and FACTOR >= 1"
            )
        out[r] = k
    return out


def first_met(curve: list[dict[str, Any]], key: str, target: float, below: bool) -> Any:
    """The first point of ``curve`` whose ``key`` meets ``target`` (None: never)."""
    for p in curve:
        if key in p and (p[key] <= target if below else p[key] >= target):
            return p
    return None


def summarize(run: dict[str, Any], args: argparse.Namespace, n_train: int) -> dict[str, Any]:
    """A contender's numbers from its epoch curve and report (times from epoch 1's end)."""
    curve = run["curve"]
    t1 = curve[0]["t"]
    loss = first_met(curve, "loss", args.target_loss, below=True)
    acc = first_met(curve, "val_accuracy", args.target_accuracy, below=False)
    span = curve[-1]["t"] - t1
    return {
        "time_to_loss_s": None if loss is None else round(loss["t"] - t1, 2),
        "epochs_to_loss": None if loss is None else loss["epoch"],
        "time_to_accuracy_s": None if acc is None else round(acc["t"] - t1, 2),
        "epochs_to_accuracy": None if acc is None else acc["epoch"],
        "samples_per_s": round((len(curve) - 1) * n_train / span, 1) if span > 0 else None,
        "final_accuracy": run["report"].get("test_accuracy"),
        "final_loss": curve[-1].get("loss"),
        "wall_s": round(run["wall_s"], 2),
        "auto_bound": auto_bound_changes(run["report"]),
        "curve": [{k: round(v, 4) for k, v in p.items()} for p in curve],
    }


def auto_bound_changes(report: dict[str, Any]) -> list[list[int]] | None:
    """``staleness = "auto"``: shard 0's bound changes ``[slowest clock, bound]`` (None for
    every other contender)."""
    for stage in report.get("ps_stats") or []:
        shards = stage.get("shards") or [{}]
        auto = shards[0].get("auto_staleness")
        if auto is not None:
            return [list(change) for change in auto["history"]]
    return None


def combine(rows: list[dict[str, Any]], equal: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Medians over rounds (None where a round missed the target), and per round the equal
    run's time to the target accuracy over this one's (the number that load leaves alone)."""
    out: dict[str, Any] = {}
    for key in (
        "time_to_loss_s",
        "epochs_to_loss",
        "time_to_accuracy_s",
        "epochs_to_accuracy",
        "samples_per_s",
        "final_accuracy",
        "final_loss",
        "wall_s",
    ):
        values = [row[key] for row in rows]
        out[key] = None if None in values else round(statistics.median(values), 4)
    if equal is not None:
        pairs = zip(equal, rows, strict=True)
        ratios = [
            e["time_to_accuracy_s"] / r["time_to_accuracy_s"]
            for e, r in pairs
            if e["time_to_accuracy_s"] and r["time_to_accuracy_s"]
        ]
        out["speedup_vs_equal"] = round(statistics.median(ratios), 3) if ratios else None
    out["rounds"] = rows
    return out


def ideal(measured: list[dict[str, Any]], equal: dict[str, Any], n_train: int) -> dict[str, Any]:
    """The summed compute rates (median per rank over the throughput runs' rebalances but the
    first of each, which includes warm-up) doing the equal run's samples to each target."""
    rates = [statistics.median(h["throughput"][r] for h in measured)
             for r in range(len(measured[0]["throughput"]))]  # fmt: skip
    total = sum(rates)

    def seconds(epochs: int | None) -> float | None:
        return None if epochs is None else round((epochs - 1) * n_train / total, 2)

    return {"rates": [round(r, 1) for r in rates], "samples_per_s": round(total, 1),
            "time_to_loss_s": seconds(equal["epochs_to_loss"]),
            "time_to_accuracy_s": seconds(equal["epochs_to_accuracy"])}  # fmt: skip


def share_follow(run: dict[str, Any], change: Change) -> dict[str, Any]:
    """Did rank ``change.rank``'s share move the way its new factor says at the first
    rebalance after the change?"""
    history, at = run["shares"], run["change"]
    if not history or at is None:
        return {"met": False, "why": "no rebalance or no change happened"}
    # rebalance_every 1: one per epoch end; Ray's records count steps, MPI's epochs
    unit = "epoch" if "epoch" in history[0] else "step"
    per_epoch = 1 if unit == "epoch" else history[0]["step"]
    change_step = at["after_epoch"] * per_epoch
    share = [h["batch_sizes"][change.rank] / sum(h["batch_sizes"]) for h in history]
    before = [s for h, s in zip(history, share, strict=True) if h[unit] <= change_step]
    after = [s for h, s in zip(history, share, strict=True) if h[unit] > change_step]
    if not before or not after:
        return {"met": False, "why": "no rebalance before or after the change"}
    slower = change.factor > 1.0
    moved = after[0] < 0.9 * before[-1] if slower else after[0] > 1.1 * before[-1]
    return {"met": bool(moved), "share_before": round(before[-1], 3),
            "share_next_rebalance": round(after[0], 3), "change_step": change_step,
            "history": history}  # fmt: skip


def checks(results: dict[str, Any], ideal_: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    through, equal = results.get("throughput"), results.get("equal")
    if through and ideal_ and ideal_["time_to_accuracy_s"] and through["time_to_accuracy_s"]:
        ratio = through["time_to_accuracy_s"] / ideal_["time_to_accuracy_s"]
        out["throughput_within_10pct_of_ideal"] = {"met": ratio <= 1.1, "ratio": round(ratio, 3)}
    if equal and equal["final_accuracy"] is not None:
        worst = {n: round(100 * (equal["final_accuracy"] - r["final_accuracy"]), 2)
                 for n, r in results.items() if r["final_accuracy"] is not None}  # fmt: skip
        out["accuracy_within_half_point"] = {"met": max(worst.values()) <= 0.5,
                                             "points_below_equal": worst}  # fmt: skip
    return out


def print_table(results: dict[str, Any], ideal_: dict[str, Any] | None) -> None:
    cols = (
        "time_to_loss_s",
        "time_to_accuracy_s",
        "speedup_vs_equal",
        "samples_per_s",
        "final_accuracy",
    )
    print(f"{'contender':18s}" + "".join(f"{c:>19s}" for c in cols))
    rows = dict(results)
    if ideal_:
        rows["ideal"] = {**ideal_, "final_accuracy": None}
    for name, r in rows.items():
        cells = ["-" if r.get(c) is None else f"{r[c]:.4g}" for c in cols]
        print(f"{name:18s}" + "".join(f"{c:>19s}" for c in cells))


def parse_change(args: argparse.Namespace, workers: int) -> Change | None:
    """``--change`` and ``--slow-by`` checked (a delay is fixed when the ranks start, so it
    cannot change half way; the duty cycle is Ray's only way); sets ``args.slow_by``."""
    default = "throttle" if args.engine == "ray" else "delay"
    args.slow_by = args.slow_by or default
    if args.engine == "ray" and args.slow_by != "throttle":
        raise SystemExit("distnet bench uneven: --slow-by delay is for --engine mpi; Ray "
                         "workers are slowed by the duty cycle")  # fmt: skip
    text = args.change or ("none" if args.slow_by == "delay" else "1:3")
    if text == "none" or args.devices:
        return None
    if args.slow_by == "delay":
        raise SystemExit(f"distnet bench uneven: --change {text}: needs --slow-by throttle "
                         "(a delay is set when the ranks start)")  # fmt: skip
    changes = parse_factors(text, workers, "--change")
    if len(changes) != 1:
        raise SystemExit(f"distnet bench uneven: --change {text!r}: one RANK:FACTOR")
    ((rank, factor),) = changes.items()
    return Change(rank, factor)


def contender_names(args: argparse.Namespace) -> list[str]:
    """The contenders to run; SystemExit for an unknown one, and on MPI for one that needs
    the parameter server (one line each)."""
    default = DEFAULT if args.engine == "ray" else list(MPI_CONTENDERS)
    names = [n for n in (args.contenders or ",".join(default)).split(",") if n]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        raise SystemExit(f"distnet bench uneven: --contenders {unknown}: not in {list(CONTENDERS)}")
    refusal = refuse_contenders(names) if args.engine == "mpi" else None
    if refusal:
        raise SystemExit(refusal)
    return names


def slowed_by(args: argparse.Namespace) -> str:
    """How the slowed workers were slowed, in words (the JSON's ``setup``)."""
    if args.slow_by == "delay":
        return ("injected delay: after each backward a rank slowed by k sleeps k - 1 times the "
                "step's compute (DISTNET_SLOW_FACTOR)")  # fmt: skip
    where = "each rank's pid" if args.engine == "mpi" else "each actor's pid"
    return f"throttle: {METHOD}, by {where}"


def run(args: argparse.Namespace) -> int:
    from distnet.data import open_dataset  # noqa: PLC0415
    from distnet.data.holdout import held_out_count  # noqa: PLC0415

    devices = parse_devices(args.devices, args.workers)
    workers = len(devices)
    if args.rounds < 1 or args.epochs < 2:
        raise SystemExit(f"distnet bench uneven: needs >= 1 round and >= 2 epochs (got "
                         f"{args.rounds}, {args.epochs})")  # fmt: skip
    names = contender_names(args)
    refusal = no_gpu_line(devices, gpu_count() if "cuda" in devices else 0, args.devices)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    slow = {} if args.devices else parse_factors(args.slow, workers, "--slow")
    change = parse_change(args, workers)
    root = Path(tempfile.mkdtemp(prefix="distnet-bench-uneven-"))
    train, test = digits_stores(root, args.shifts)
    n = len(open_dataset(train))
    n_train = n - held_out_count(n, 0.2)
    args.batch_size = args.batch_size or 96 * workers
    text = JOB.format(train=train, test=test, batch=args.batch_size, hidden=args.hidden,
                      type=args.model, epochs=args.epochs, lr=args.lr, out="{out}")  # fmt: skip
    factors = [slow.get(r, 1.0) for r in range(workers)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    changed_run = mixed = None
    load_start = [round(x, 2) for x in os.getloadavg()]
    with engine_runs(args.engine, text, root, devices, args.slow_by) as run_one:
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                contender = replace(CONTENDERS[name], name=f"{name}-{r}")
                runs[name].append(run_one(contender, devices, factors))
                print(f"round {r} {name}: {runs[name][-1]['wall_s']:.1f} s", flush=True)
        if change is not None:
            changed = Contender("throughput_change", rebalance_every=1)
            changed_run = run_one(changed, devices, factors, change)
            print(f"throughput with change: {changed_run['wall_s']:.1f} s", flush=True)
        if "cuda" in devices and "cpu" in devices:
            mixed = alone_runs(lambda d: run_one(Contender(f"{d}_alone"), [d], [1.0]))
    rows = {name: [summarize(one, args, n_train) for one in runs[name]] for name in names}
    results = {name: combine(rows[name], rows.get("equal")) for name in names}
    ideal_ = None
    shares = [h for one in runs.get("throughput", []) for h in one["shares"][1:]]
    if shares and "equal" in results:
        ideal_ = ideal(shares, results["equal"], n_train)
    verdict = checks(results, ideal_)
    if changed_run is not None and change is not None:
        verdict["shares_follow_change"] = share_follow(changed_run, change)
        results["throughput_change"] = summarize(changed_run, args, n_train)
    if mixed is not None:
        group = runs["throughput"][0] if runs.get("throughput") else None
        verdict["mixed_group"] = mixed_verdict(group, mixed, devices, n_train)
    out = {
        "setup": {"engine": args.engine, "workers": workers, "devices": devices, "slow": factors,
                  "slowed_by": slowed_by(args), "throttle": METHOD,
                  "cgroup_cpu_writable": cgroup_cpu_writable(), "epochs": args.epochs,
                  "batch_size": args.batch_size, "model": args.model,
                  "hidden": args.hidden if args.model == "mlp" else None, "train_samples": n_train,
                  "target_loss": args.target_loss, "target_accuracy": args.target_accuracy,
                  "change": None if change is None else vars(change),
                  "load_start": load_start, "load": [round(x, 2) for x in os.getloadavg()],
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "contenders": results, "ideal": ideal_, "checks": verdict,
        "share_history": {
            "throughput": [one["shares"] for one in runs.get("throughput", [])],
            "change": None if changed_run is None else changed_run["shares"],
        },
    }  # fmt: skip
    print_table(results, ideal_)
    for name, check in verdict.items():
        shown = {k: v for k, v in check.items() if k != "history"}
        print(f"{name}: {'MET' if check.get('met') else 'NOT MET'} {json.dumps(shown)}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0
