"""``RUN_DIR/report.html``: one self-contained page about a run (pictures embedded as base64
PNG; opens from disk with no server and no network).

``gather(run_dir)`` collects what the run directory holds (``run.json``, ``report.json`` or
the stage checkpoints, ``metrics/rank-*.jsonl``, the pictures, ``trace.json``) into plain
data; ``render`` turns it into HTML. The data drawn is also embedded as JSON
(``<script type="application/json" id="distnet-report-data">``) so that tools and tests can
read exactly what the plots show. Works on a finished run, on one still running (a
snapshot) and on one that failed (what it had).
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from pathlib import Path
from typing import Any

from distnet.train.report import plots
from distnet.train.metrics import read_metrics
from distnet.train.report.summary import load_report

RUNNING_IF_WRITTEN_WITHIN_S = 120.0


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _status(run_dir: Path, report: dict[str, Any]) -> str:
    if not report.get("unfinished"):
        return "finished"
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
    return {
        "run_dir": str(run_dir), "status": _status(run_dir, report), "info": info,
        "report": {k: v for k, v in report.items() if k not in ("job",)},
        "curves": curves(report, metrics), "workers": workers(metrics),
        "staleness": staleness(metrics, report.get("ps_stats")),
        "confusion_matrix": report.get("confusion_matrix"),
        "pictures": pictures, "layer_pictures": [str(p) for p in layers],
        "trace": {"events": len(events),
                  "ranks": sorted({e["pid"] for e in events if e.get("ph") == "X"})},
        "resumes": [{"stage": s.get("name"), "epoch": s["resumed_from_epoch"]}
                    for s in report.get("stages", []) if s.get("resumed_from_epoch")],
        "stalls": _read_stalls(run_dir),
    }, events  # fmt: skip


def _read_stalls(run_dir: Path) -> list[dict[str, Any]]:
    """The stall reports (``distnet.parallel.stall``) in ``stall.json``; [] if none."""
    try:
        stalls = json.loads((run_dir / "stall.json").read_text())
    except (OSError, ValueError):
        return []
    return stalls if isinstance(stalls, list) else []


# -- HTML --------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}

h1{font-size:1.5em}
h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}

table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}

th{background:#f4f4f4}
td.n{text-align:right;font-variant-numeric:tabular-nums}

.big{font-size:1.6em;font-weight:600}
.note{color:#666;font-size:.9em}

figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figcaption{font-size:.85em;color:#555}

img{max-width:100%;image-rendering:pixelated}
.status{padding:.2em .5em;background:#eef;border-radius:4px}
pre{background:#f7f7f7;padding:.5em;overflow-x:auto;font-size:.85em}
"""


def _img(png: bytes, alt: str, caption: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">{cap}</figure>'
    )


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f'<td class="n">{v:,.4g}</td>'
        if isinstance(v, int):
            return f'<td class="n">{v:,}</td>'
        return f"<td>{html.escape(str(v))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    head = f"<tr>{head}</tr>" if any(header) else ""
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _job_section(data: dict[str, Any]) -> str:
    info, report = data["info"], data["report"]
    job = info.get("job") or {}
    config = report.get("config") or {}
    model = config.get("model") or (f"{job.get('model', {}).get('type', '?')} hidden "
                                    f"{job.get('model', {}).get('hidden', '?')}")  # fmt: skip
    devices = info.get("devices") or []
    rows = [["model", model],
            ["data", f"train {job.get('data', {}).get('train', config.get('train', '?'))}, "
                     f"test {job.get('data', {}).get('test', '-')}"],
            ["workers", f"{info.get('workers', report.get('workers', '?'))} "
                        f"({', '.join(sorted(set(devices))) or 'cpu'})"],
            ["engine", info.get("engine", report.get("engine", "?"))],
            ["strategy", info.get("strategy", "allreduce")],
            ["global batch size",
             job.get("data", {}).get("batch_size", config.get("batch_size", "?"))],
            ["seed", job.get("run", {}).get("seed", config.get("seed", "?"))]]  # fmt: skip
    if "seconds" in report:
        rows.append(["total time", f"{report['seconds']:.1f} s"])
    acc = report.get("test_accuracy")
    top = (f'<p>final test accuracy: <span class="big" id="test-accuracy">{acc:.2%}</span> '
           f"(test loss {report.get('test_loss', float('nan')):.4f})</p>" if acc is not None
           else '<p class="note">no test accuracy yet (the run has not finished).</p>')  # fmt: skip
    return "<h2>Job</h2>" + top + _table(["", ""], rows)


def _trained(stage: dict[str, Any]) -> str:
    """Each run's part of a stage (``trained.json``), e.g. "0-2: MPICommunicator × 2; 2-4: ..."."""
    segments = (stage.get("trained") or {}).get("segments", [])
    return "; ".join(f"{seg.get('from_epoch')}-{seg.get('to_epoch', '?')}: "
                     f"{seg.get('engine', '?')} × {seg.get('workers', '?')}"
                     for seg in segments) or "-"  # fmt: skip


def _stages_section(data: dict[str, Any]) -> str:
    rows = []
    for s in data["report"].get("stages", []):
        loss = (s.get("history") or {}).get("loss") or []
        status = "done" if s.get("done") else (f"checkpoint after epoch {s['epochs_done']}"
                                               if s.get("epochs_done") else "not done")  # fmt: skip
        rows.append([s.get("name", "?"), status, len(loss),
                     f"{loss[0]:.4f} → {loss[-1]:.4f}" if loss else "-",
                     f"{s['seconds']:.1f} s" if "seconds" in s else "-",
                     s.get("resumed_from_epoch") or "-", _trained(s)])  # fmt: skip
    out = "<h2>Stages</h2>" + _table(
        ["stage", "status", "epochs", "loss first → last", "time", "resumed from epoch",
         "trained (epochs: engine × workers)"], rows,
    )  # fmt: skip
    for r in data["resumes"]:
        out += (f'<p class="resume">{html.escape(str(r["stage"]))} resumed from its checkpoint '
                f"after epoch {r['epoch']} (marked on its curve).</p>")  # fmt: skip
    return out


def _workers_section(data: dict[str, Any]) -> str:
    rows = data["workers"]
    if not rows:
        return "<h2>Workers</h2><p class='note'>no per-rank metrics in metrics/.</p>"
    table = _table(["rank", "steps", "samples/s"] + list(plots.COLORS), [
        [r["rank"], r["steps"], r["samples_per_s"],
         *(f"{r['seconds_by_part'][k]:.2f} s ({r['shares'][k]:.0%})" for k in plots.COLORS)]
        for r in rows])  # fmt: skip
    note = (
        "<p class='note'>Communication is time blocked in allreduce (or push/pull). "
        "Waiting for others is estimated per logging interval: the rank whose "
        "communication took least reached the collectives last and waited for no one; "
        "the rest of another rank's communication time was spent waiting.</p>"
    )
    return "<h2>Workers</h2>" + _img(plots.plot_workers(rows), "per-worker time") + table + note


def _stall_section(data: dict[str, Any]) -> str:
    """Where every rank was at the last stall report, for a run that did not finish."""
    stalls = data.get("stalls") or []
    if not stalls or data["status"] == "finished":
        return ""
    last = stalls[-1]
    rows, stacks = [], []
    for place in last.get("ranks", []):
        seq = place.get("seq")
        collective = "unknown" if seq is None else f"#{seq} {place.get('op')}" if seq else "none"
        rows.append([place.get("rank"), collective])
        stacks.append(f"<p>rank {html.escape(str(place.get('rank')))}:</p>"
                      f"<pre>{html.escape(str(place.get('stack', '')))}</pre>")  # fmt: skip
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("time", 0)))
    return (f"<h2 id='stall'>Where the ranks were (stall)</h2><p>{html.escape(last['message'])}"
            f" <span class='note'>({when}; {len(stalls)} stall report(s))</span></p>"
            + _table(["rank", "last collective"], rows) + "".join(stacks))  # fmt: skip


def render(data: dict[str, Any], events: list[dict[str, Any]]) -> str:
    """The page (a str of HTML) for gathered data and trace events."""
    parts = [f"<h1>distnet run {html.escape(data['run_dir'])}</h1>",
             f'<p><span class="status" id="run-status">{html.escape(data["status"])}</span> '
             f"<span class='note'>report written {time.strftime('%Y-%m-%d %H:%M:%S')}</span></p>",
             _job_section(data), _stall_section(data), _stages_section(data),
             "<h2>Loss curves</h2>",
             _img(plots.plot_curves(data["curves"]), "loss curves",
                  "dotted: learning-rate changes; dashed red: where a stage resumed")]  # fmt: skip
    parts.append("<h2>What the network learned</h2>")
    for name, caption in PICTURES:
        if name in data["pictures"]:
            parts.append(_img(Path(data["pictures"][name]).read_bytes(), name, caption))
    for path in data["layer_pictures"]:
        parts.append(_img(Path(path).read_bytes(), Path(path).stem, Path(path).stem))
    if data["confusion_matrix"]:
        parts.append(_img(plots.plot_confusion(data["confusion_matrix"]), "confusion matrix",
                          "confusion matrix of the test set"))  # fmt: skip
    parts.append(_workers_section(data))
    if data["staleness"]:
        parts += [
            "<h2>Parameter server: staleness</h2>",
            _img(plots.plot_staleness(data["staleness"]), "staleness histograms"),
        ]
    if events:
        parts += [
            "<h2>Timeline</h2>",
            _img(plots.plot_timeline(events), "timeline", "a quarter second of the trace"),
            f"<p class='note'>{data['trace']['events']} events from ranks "
            f"{data['trace']['ranks']}: open <code>trace.json</code> in "
            "https://ui.perfetto.dev or chrome://tracing for all of it.</p>",
        ]
    blob = json.dumps(data, default=str).replace("</", "<\\/")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>distnet report: {html.escape(data['run_dir'])}</title><style>{CSS}</style>"
            f"</head><body>{''.join(parts)}"
            f'<script type="application/json" id="distnet-report-data">{blob}</script>'
            "</body></html>")  # fmt: skip


def write_html_report(run_dir: str | Path) -> Path:
    """Writes ``run_dir/report.html`` (atomically) and returns its path."""
    run_dir = Path(run_dir)
    data, events = gather(run_dir)
    page = render(data, events)
    out = run_dir / "report.html"
    tmp = run_dir / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
