"""``distnet bench chaos``: a real parameter-server job while a random process is SIGKILLed every
N seconds, against the undisturbed run of the same seed.

    distnet bench chaos --strategy ps --mode sync|async|ssp --kill-every 10 --duration 120
                        [--replicas 2] [--seed 0] [--kinds worker,shard,rank0] [--json FILE]

The job: an MLP 65-32-10 on scikit-learn's digits (the 64 pixels and each sample's id, which
the workers' sample logs record), 3 Ray workers, 2 shards, SGD with momentum on the shards,
as many epochs as fill about ``--duration`` seconds undisturbed (measured by a one-epoch run
first; ``--epochs`` sets them). It runs twice on one local Ray: undisturbed, then with a
process killed every ``--kill-every`` seconds from the first step until ``--duration`` after
it (``chaos_kill.py``: a worker other than rank 0, rank 0, a shard replica; seeded). Then:

- each kill: what, when, ``recovery_s`` (until every rank finished a step again) and
  ``first_step_s`` (until any did); median and max;
- what the engine did: the report's recoveries (``survivors went on``: no restart;
  ``group restarted``: resumed mid-epoch or from the epoch's checkpoint) and the worker steps
  or epochs that were computed twice;
- the ledger of the final server of every stage (``check_ledgers``: every push a worker was
  acknowledged held exactly once by every shard, 0 lost, 0 doubled);
- samples lost or counted twice: each epoch's sample uses from the logs against the
  undisturbed run's;
- the final accuracy on the held-out digits of both runs; sync: the largest difference of the
  final parameters (equal to float tolerance, ``PARAMS_RTOL``/``PARAMS_ATOL``); async/ssp:
  the accuracy within 0.5 points.

A kind of kill the engine does not survive without a group restart (a shard without
replicas: ``--replicas 1``; the last live replica of a shard) shows as a restart in the
recoveries; a job that fails outright is reported as such (``job_error``), not raised.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from distnet.bench import chaos_counts as counts
from distnet.bench.chaos_kill import KINDS, ChaosMonkey

PARAMS_RTOL, PARAMS_ATOL = 1e-4, 1e-5  # sync: the chaos run's parameters vs undisturbed
ACCURACY_POINTS = 0.5  # async/ssp: accuracy within this many percentage points

JOB = """
[data]
train = "{train}"
batch_size = 48

[model]
type = "mlp"
hidden = [32]
activation = "tanh"

[finetune]
epochs = {epochs}
optimizer = "sgd"
lr = 0.05
momentum = 0.9
weight_decay = 0.0

[run]
out = "{out}"
seed = {seed}
log_every = 100000
pictures = false
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distnet bench chaos``."""
    parser.add_argument("--strategy", choices=["ps"], default="ps")
    parser.add_argument("--mode", choices=["sync", "async", "ssp"], default="sync")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between kills")
    parser.add_argument(
        "--duration", type=float, default=120.0,
        help="seconds of killing (and about the undisturbed job's length)",
    )  # fmt: skip
    parser.add_argument("--replicas", type=int, choices=[1, 2], default=2, help="per shard")
    parser.add_argument("--seed", type=int, default=0, help="the job's and the kills' seed")
    parser.add_argument("--kinds", default="worker,shard,rank0",
                        help=f"what may be killed, of {','.join(KINDS)}")  # fmt: skip
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--staleness", type=int, default=2, help="ssp's bound")
    parser.add_argument("--epochs", type=int, default=0,
                        help="epochs of both runs (0: as many as fill --duration)")  # fmt: skip
    parser.add_argument("--json", help="write the results to this file")


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3),
            "n": len(values)}  # fmt: skip


class Runner:
    """Runs the job on one local Ray, each run in its own output and sample-log directory."""

    def __init__(self, args: argparse.Namespace, root: Path, train: str) -> None:
        self.args, self.root, self.train = args, root, train

    def job(self, name: str, epochs: int) -> dict[str, Any]:
        from distnet.train.jobs.job import load_job  # noqa: PLC0415

        path = self.root / f"{name}.toml"
        path.write_text(JOB.format(train=self.train, epochs=epochs, out=self.root / name,
                                   seed=self.args.seed))  # fmt: skip
        return load_job(path)

    def options(self, name: str) -> Any:
        from distnet.parallel.rayengine import RayOptions, worker_specs  # noqa: PLC0415

        a = self.args
        ps = {"mode": a.mode, "shards": a.shards, "replicas": a.replicas,
              "staleness": a.staleness if a.mode == "ssp" else 0}  # fmt: skip
        return RayOptions(
            workers=worker_specs(a.workers), strategy="ps", ps=ps, rebalance_every=0,
            sample_log=str(self.root / f"{name}-samples"), max_failures=1000,
        )  # fmt: skip

    def run(self, name: str, epochs: int, monkey: bool = False) -> dict[str, Any]:
        """One run; returns its report (``job_error`` instead when it failed), wall seconds
        and, with ``monkey``, the kills."""
        from distnet.parallel.rayengine import RayJob  # noqa: PLC0415
        from distnet.train.jobs.rayjob import run_rank  # noqa: PLC0415

        job = self.job(name, epochs)
        rj = RayJob(self.options(name), log=lambda line: None, task=run_rank)
        killer = None
        if monkey:
            a = self.args
            killer = ChaosMonkey(
                rj, self.root / f"{name}-samples", kinds=a.kinds, every_s=a.kill_every,
                duration_s=a.duration, seed=a.seed, workers=a.workers,
            )  # fmt: skip
            killer.start()
        t0 = time.perf_counter()
        try:
            report: dict[str, Any] = rj.run(job)
        except Exception as e:  # noqa: BLE001 (reported: what the chaos did is the result)
            import traceback  # noqa: PLC0415

            where = traceback.format_exc().splitlines()[-12:]
            report = {"job_error": f"{type(e).__name__}: {e}", "job_error_trace": where,
                      "recoveries": rj.recoveries, "failures": rj.failures}  # fmt: skip
        seconds = time.perf_counter() - t0
        if killer is not None:
            killer.over.set()
            killer.join(timeout=30)
        return {"job": job, "report": report, "seconds": round(seconds, 2),
                "kills": killer.events if killer else [],
                "killer_error": killer.error if killer else None}  # fmt: skip


def _epoch_seconds(runner: Runner) -> float:
    """One undisturbed epoch's seconds, first step to last (the sample log's times)."""
    calib = runner.run("calibrate", 1)
    if "job_error" in calib["report"]:
        raise RuntimeError(f"the undisturbed one-epoch run failed: {calib['report']['job_error']}")
    times = [json.loads(line)["time"]
             for f in (runner.root / "calibrate-samples").glob("*.jsonl")
             for line in f.read_text().splitlines()]  # fmt: skip
    return max(max(times) - min(times), 0.1)


def _ledgers(report: dict[str, Any]) -> dict[str, Any]:
    stages = [s.get("ledger") for s in report.get("ps_stats") or []]
    checks = [s for s in stages if s]
    if not checks:  # the last generation trained no stage (a kill after the training ended)
        return {"ok": None, "note": "no stage's server ended in the last generation"}
    return {
        "ok": all(c["ok"] for c in checks),
        "missing": sum(c["missing"] for c in checks),
        "doubled": sum(c["doubled"] for c in checks),
        "acknowledged": sum(c["acknowledged"] for c in checks),
        "servers": checks,
    }


def run(args: argparse.Namespace) -> int:
    """The two runs and the report; exit 0 (the numbers are the result), 2 on bad options."""
    from distnet.parallel.rayengine import start_ray  # noqa: PLC0415

    args.kinds = [k for k in str(args.kinds).split(",") if k]
    if not args.kinds or any(k not in KINDS for k in args.kinds) or args.workers < 2:
        print(f"distnet bench chaos: --kinds of {','.join(KINDS)}, --workers >= 2")
        return 2
    root = Path(tempfile.mkdtemp(prefix="distnet-bench-chaos-"))
    train, test = counts.write_id_stores(root / "data")
    runner = Runner(args, root, train)
    started = start_ray(None, num_cpus=max(4, args.workers + 1))
    try:
        epochs = args.epochs
        if epochs <= 0:
            epochs = max(2, min(1000, math.ceil(args.duration / _epoch_seconds(runner))))
        print(f"chaos: {epochs} epochs, {args.workers} workers, {args.shards} shards x "
              f"{args.replicas} replica(s), mode {args.mode}", flush=True)  # fmt: skip
        calm = runner.run("undisturbed", epochs)
        if "job_error" in calm["report"]:
            raise RuntimeError(f"the undisturbed run failed: {calm['report']['job_error']}")
        print(f"chaos: undisturbed run {calm['seconds']:.1f} s", flush=True)
        chaos = runner.run("chaos", epochs, monkey=True)
    finally:
        if started:
            import ray  # noqa: PLC0415

            ray.shutdown()
    result = _result(args, root, test, epochs, calm, chaos)
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


def _result(args: argparse.Namespace, root: Path, test: str, epochs: int,
            calm: dict[str, Any], chaos: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    import os  # noqa: PLC0415

    report = chaos["report"]
    recoveries = report.get("recoveries") or []
    want = counts.epoch_samples(root / "undisturbed-samples", [])["epochs"]
    size = max((sum(c.values()) for c in want.values()), default=0)
    got = counts.epoch_samples(root / "chaos-samples", recoveries, size)
    samples = counts.compare_samples(got["epochs"], want, got["unlogged"])
    kills = chaos["kills"]
    done = [k for k in kills if not k.get("skipped")]
    result: dict[str, Any] = {
        "benchmark": "chaos",
        "setup": {"strategy": "ps", "mode": args.mode, "workers": args.workers,
                  "shards": args.shards, "replicas": args.replicas, "epochs": epochs,
                  "kill_every_s": args.kill_every, "duration_s": args.duration,
                  "seed": args.seed, "kinds": args.kinds, "root": str(root),
                  "load_average": [round(v, 2) for v in os.getloadavg()]},
        "seconds": {"undisturbed": calm["seconds"], "chaos": chaos["seconds"]},
        "kills": kills,
        "recovery_s": _stats([k["recovery_s"] for k in done if k.get("recovery_s") is not None]),
        "first_step_s": _stats([k["first_step_s"] for k in done if "first_step_s" in k]),
        "job_error": report.get("job_error"),
        "killer_error": chaos["killer_error"],
        "generations": report.get("generation"),
        "recoveries": recoveries,
        "group_restarts": sum(r.get("kind") == "group restarted" for r in recoveries),
        "redone": {"worker_steps": got["redone_worker_steps"], "epochs": got["epochs_redone"]},
        "ledger": _ledgers(report) if "job_error" not in report else None,
        "samples": samples if "job_error" not in report else None,
        "failures": report.get("failures"),
    }  # fmt: skip
    if "job_error" not in report:
        a, b = counts.final_model(calm["job"]), counts.final_model(chaos["job"])
        acc = {"undisturbed": counts.accuracy(a, test), "chaos": counts.accuracy(b, test)}
        pa, pb = counts.final_params(a), counts.final_params(b)
        result["accuracy"] = acc
        result["accuracy_points_apart"] = round(100 * abs(acc["chaos"] - acc["undisturbed"]), 3)
        result["params_max_abs_diff"] = float(np.max(np.abs(pa - pb)))
        same = bool(np.allclose(pb, pa, rtol=PARAMS_RTOL, atol=PARAMS_ATOL))
        near = result["accuracy_points_apart"] <= ACCURACY_POINTS
        result["params_equal"] = same
        result["as_undisturbed"] = same if args.mode == "sync" else near
    return result


def _print(r: dict[str, Any]) -> None:
    s = r["setup"]
    print(f"chaos, ps {s['mode']}: {len(r['kills'])} kill(s) over {s['duration_s']:.0f} s "
          f"(load average {s['load_average']})")  # fmt: skip
    for k in r["kills"]:
        rec = k.get("recovery_s")
        how = k.get("skipped") or ("not recovered" if rec is None else f"recovered {rec:.2f} s")
        print(f"  {k['at_s']:7.1f} s  {k.get('what') or k['kind']:<18} {how}")
    for name in ("recovery_s", "first_step_s"):
        if r[name]:
            print(f"  {name}: median {r[name]['median']:.2f}, max {r[name]['max']:.2f}")
    print(f"  group restarts: {r['group_restarts']}, redone: {r['redone']}")
    if r["job_error"]:
        print(f"  the job failed: {r['job_error'].splitlines()[0]}")
        return
    led = r["ledger"]
    if led["ok"] is None:
        print(f"  ledger: none to check ({led['note']})")
    else:
        print(f"  ledger: ok {led['ok']}, {led['acknowledged']} acknowledged pushes, "
              f"{led['missing']} lost, {led['doubled']} doubled")  # fmt: skip
    sm = r["samples"]
    print(f"  sample uses against the undisturbed run: {sm['lost']} missing ({sm['unlogged']} of "
          f"them trained by a killed worker that died before logging them), {sm['doubled']} "
          "counted twice")  # fmt: skip
    acc = r["accuracy"]
    print(f"  accuracy: {100 * acc['chaos']:.2f} % vs undisturbed {100 * acc['undisturbed']:.2f} %"
          f"; parameters max |diff| {r['params_max_abs_diff']:.2e}"
          f" ({'as undisturbed' if r['as_undisturbed'] else 'NOT as undisturbed'})")  # fmt: skip
