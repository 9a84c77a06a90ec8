"""What ``report.html`` shows, as plain data: ``gather(run_dir)`` collects what the run
directory holds (``run.json``, ``report.json`` or the stage checkpoints,
``metrics/rank-*.jsonl``, ``failures/``, the pictures, ``trace.json``); ``page.render`` turns
it into HTML and ``compare`` lays several runs' side by side. Works on a finished run, on one
still running (a snapshot) and on one that failed (what it had).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from distnet.train.loop.metrics import read_metrics
from distnet.train.report import history
from distnet.train.report.summary import load_report

RUNNING_IF_WRITTEN_WITHIN_S = 120.0


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _status(run_dir: Path, report: dict[str, Any], failure: dict[str, Any] | None) -> str:
    if not report.get("unfinished"):
        return "finished"
    if failure is not None:
        if failure.get("interrupted"):
            return f"interrupted (rank {failure['rank']}: {failure.get('error')})"
        return f"failed: rank {failure['rank']} in {failure.get('stage') or 'set-up'}"
    newest = max((p.stat().st_mtime for p in run_dir.glob("metrics/*.jsonl")), default=0.0)
    if time.time() - newest < RUNNING_IF_WRITTEN_WITHIN_S:
        return "running (a snapshot)"
    return "unfinished (stopped or failed; showing what it had)"


def _stage_kind(name: str) -> tuple[str, int | None]:
    if name.startswith("pretrain-") and name.split("-", 1)[1].isdigit():
        return "pretrain", int(name.split("-", 1)[1])
    return "train", None


def curves(report: dict[str, Any], metrics: dict[int, list[dict[str, Any]]]) -> list[dict]:
    """Per stage: epochs (1-based) with loss, lr, accuracy, validation values, from rank 0's
    epoch records (the last record of an epoch wins: a resumed run repeats the epochs after
    its checkpoint), else from the stage's saved history."""
    records = metrics.get(0) or next(iter(metrics.values()), [])
    by_stage: dict[str, dict[int, dict[str, Any]]] = {}
    resumed: dict[str, list[int]] = {}
    for r in records:
        if r.get("event") == "epoch":
            by_stage.setdefault(r["stage"], {})[int(r["epoch"])] = r
        elif r.get("event") == "resume":
            resumed.setdefault(r["stage"], []).append(int(r["epoch"]))
    names = [s.get("name") for s in report.get("stages", [])]
    names += [n for n in by_stage if n not in names]
    out = []
    for name in names:
        kind, layer = _stage_kind(str(name))
        curve: dict[str, Any] = {"stage": name, "kind": kind, "layer": layer, "source": "metrics"}
        curve["resumed_at"] = resumed.get(name, [])
        epochs = by_stage.get(name)
        if epochs:
            rows = [epochs[e] for e in sorted(epochs)]
            curve["epoch"] = [int(r["epoch"]) + 1 for r in rows]
            keys = {k for r in rows for k in r} - {"event", "rank", "stage", "t", "epoch", "step"}
            for k in sorted(keys):
                curve[k] = [r.get(k) for r in rows]
        else:
            row = next((s for s in report.get("stages", []) if s.get("name") == name), {})
            history = row.get("history") or {}
            if not history.get("loss"):
                continue
            curve.update({k: list(v) for k, v in history.items()}, source="stage history")
            curve["epoch"] = list(range(1, len(history["loss"]) + 1))
        out.append(curve)
    return out


def workers(metrics: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per rank: seconds, samples/s, and the split of step time.

    Waiting for other workers is estimated from the communication times: records of one
    stage end at the same step on every rank, and over such an interval the rank that
    reached the collectives last waited for no one, so its communication time is the
    transfer itself; what another rank spent beyond it, it spent waiting for the others.
    """
    steps = {rank: [r for r in rs if r.get("event") == "steps"] for rank, rs in metrics.items()}
    steps = {rank: rs for rank, rs in steps.items() if rs}
    by_key: dict[tuple[str, int, int], dict[int, float]] = {}
    for rank, rs in steps.items():
        seen: dict[tuple[str, int], int] = {}
        for r in rs:  # a resumed run repeats step numbers: count the repeats
            nth = seen[(r["stage"], int(r["step"]))] = (
                seen.get((r["stage"], int(r["step"])), -1) + 1
            )
            by_key.setdefault((r["stage"], int(r["step"]), nth), {})[rank] = float(r["comm_s"])
    waited = dict.fromkeys(steps, 0.0)
    for comms in by_key.values():
        if len(comms) == len(steps) > 1:
            least = min(comms.values())
            for rank, c in comms.items():
                waited[rank] += c - least
    rows = []
    for rank in sorted(steps):
        rs = steps[rank]
        total = {k: sum(float(r.get(k, 0.0)) for r in rs)
                 for k in ("seconds", "samples", "compute_s", "comm_s", "input_wait_s",
                           "checkpoint_s")}  # fmt: skip
        wait = min(waited[rank], total["comm_s"])
        parts = {"compute": total["compute_s"], "communication": total["comm_s"] - wait,
                 "input wait": total["input_wait_s"], "waiting for others": wait,
                 "checkpoint": total["checkpoint_s"]}  # fmt: skip
        seconds = max(total["seconds"], 1e-12)
        rows.append({"rank": rank, "steps": sum(int(r["steps"]) for r in rs),
                     "samples": int(total["samples"]), "seconds": total["seconds"],
                     "samples_per_s": total["samples"] / seconds, "seconds_by_part": parts,
                     "shares": {k: v / seconds for k, v in parts.items()}})  # fmt: skip
    return rows


def staleness(
    metrics: dict[int, list[dict[str, Any]]], ps_stats: list[dict[str, Any]] | None = None
) -> dict[str, dict[int, int]]:
    """Histograms {worker: {staleness: count}} from records with a ``staleness`` field and
    from the parameter server's own counts (``report.json``'s ``ps_stats``, one entry per
    stage, each with per-shard histograms per worker)."""
    hists: dict[str, dict[int, int]] = {}
    for stage in ps_stats or []:
        for shard in stage.get("shards", []):
            for w, counts in enumerate(shard.get("staleness", [])):
                hist = hists.setdefault(str(w), {})
                for k, c in counts.items():
                    hist[int(k)] = hist.get(int(k), 0) + int(c)
    for rank, rs in metrics.items():
        for r in rs:
            if "staleness" not in r:
                continue
            values = r["staleness"] if isinstance(r["staleness"], list) else [r["staleness"]]
            hist = hists.setdefault(str(r.get("worker", rank)), {})
            for v in values:
                hist[int(v)] = hist.get(int(v), 0) + 1
    return hists


def trace_events(run_dir: Path) -> list[dict[str, Any]]:
    """The merged trace's events; merges per-rank files first when only those exist."""
    from distnet import trace  # noqa: PLC0415

    merged = run_dir / "trace.json"
    parts = sorted((run_dir / "trace").glob("trace-rank-*.json"))
    if parts and (
        not merged.is_file() or merged.stat().st_mtime < max(p.stat().st_mtime for p in parts)
    ):
        trace.merge(run_dir / "trace", merged)
    return _read_json(merged).get("traceEvents", [])


PICTURES = (("filters", "first-layer filters after pretraining"),
            ("filters-final", "first-layer filters after fine-tuning"))  # fmt: skip


def gather(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(everything the page shows as plain data, the trace's events); see the module
    docstring. Raises ``FileNotFoundError`` for a directory that is not there."""
    run_dir = Path(run_dir)
    report = load_report(run_dir)
    metrics = read_metrics(run_dir)
    info = _read_json(run_dir / "run.json")
    pictures = {name: str(run_dir / f"{name}.png") for name, _ in PICTURES
                if (run_dir / f"{name}.png").is_file()}  # fmt: skip
    layers = sorted(run_dir.glob("reconstructions-layer*.png"),
                    key=lambda p: int(p.stem.removeprefix("reconstructions-layer")))  # fmt: skip
    if not layers and (run_dir / "reconstructions.png").is_file():
        layers = [run_dir / "reconstructions.png"]
    events = trace_events(run_dir)
    records = metrics.get(0) or next(iter(metrics.values()), [])
    failures = history.read_failures(run_dir)
    runs = history.invocations(info, records, failures, report)
    failure = history.last_failure(info, failures) if report.get("unfinished") else None
    return {
        "run_dir": str(run_dir), "status": _status(run_dir, report, failure), "info": info,
        "failure": failure, "failures": failures, "invocations": runs,
        "total_seconds": history.total_seconds(runs),
        "report": {k: v for k, v in report.items() if k not in ("job",)},
        "curves": curves(report, metrics), "workers": workers(metrics),
        "staleness": staleness(metrics, report.get("ps_stats")),
        "confusion_matrix": report.get("confusion_matrix"),
        "pictures": pictures, "layer_pictures": [str(p) for p in layers],
        "trace": {"events": len(events),
                  "ranks": sorted({e["pid"] for e in events if e.get("ph") == "X"})},
        "resumes": history.resumes(records, report),
        "stalls": _read_stalls(run_dir),
    }, events  # fmt: skip


def _read_stalls(run_dir: Path) -> list[dict[str, Any]]:
    """The stall reports (``distnet.parallel.stall``) in ``stall.json``; [] if none."""
    try:
        stalls = json.loads((run_dir / "stall.json").read_text())
    except (OSError, ValueError):
        return []
    return stalls if isinstance(stalls, list) else []
