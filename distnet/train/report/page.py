"""``RUN_DIR/report.html``: one self-contained page about a run (pictures embedded as base64
PNG; opens from disk with no server and no network).

``rundata.gather(run_dir)`` collects what the run directory holds into plain data;
``render`` turns it into HTML. The data drawn is also embedded as JSON
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

from distnet.train.report import history, plots
from distnet.train.report.rundata import PICTURES, gather

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
.status.failed{background:#fde2e1}
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
            ["engine", history.engine_name(info.get("engine", report.get("engine", "?")))],
            ["strategy", history.strategy_name(info)],
            ["global batch size",
             job.get("data", {}).get("batch_size", config.get("batch_size", "?"))],
            ["seed", job.get("run", {}).get("seed", config.get("seed", "?"))]]  # fmt: skip
    if data.get("total_seconds") is not None:
        runs = len(data["invocations"])
        rows.append(["total time", f"{data['total_seconds']:.1f} s"
                     + (f" over {runs} invocations" if runs > 1 else "")])  # fmt: skip
    acc = report.get("test_accuracy")
    top = (f'<p>final test accuracy: <span class="big" id="test-accuracy">{acc:.2%}</span> '
           f"(test loss {report.get('test_loss', float('nan')):.4f})</p>" if acc is not None
           else '<p class="note">no test accuracy (the run has not finished).</p>')  # fmt: skip
    if config.get("validation_samples"):
        rows.append(["validation", f"{config['validation_samples']} samples held out of the "
                     "training store (validation curves below)"])  # fmt: skip
    return "<h2>Job</h2>" + top + _table(["", ""], rows)


def _trained(stage: dict[str, Any]) -> str:
    """Each run's part of a stage (``trained.json``), e.g. "0-2: MPI × 2; 2-4: Ray × 3"."""
    segments = (stage.get("trained") or {}).get("segments", [])
    return "; ".join(f"{seg.get('from_epoch')}-{seg.get('to_epoch', '?')}: "
                     f"{history.engine_name(seg.get('engine', '?'))} × {seg.get('workers', '?')}"
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
    runs = data.get("invocations") or []
    if len(runs) > 1:
        out += "<h3>Invocations</h3>" + _table(
            ["started", "engine", "workers", "time", "outcome", "command"],
            [[r["started"] or "?", r["engine"], r["workers"] or "?",
              "-" if r["seconds"] is None else f"{r['seconds']:.1f} s", r["outcome"], r["argv"]]
             for r in runs])  # fmt: skip
    return out


def _failure_section(data: dict[str, Any]) -> str:
    """Why a failed run stopped: the first rank's error, its stage, its traceback's end."""
    f = data.get("failure")
    if not f:
        return ""
    others = sorted({int(g["rank"]) for g in data.get("failures", [])} - {int(f["rank"])})
    also = f"; ranks {others} stopped after it" if others else ""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(f.get("time", 0))))
    return (f"<h2 id='failure'>Why it stopped</h2><p>rank <b>{html.escape(str(f['rank']))}"
            f"</b> in stage <b>{html.escape(str(f.get('stage') or 'set-up'))}</b> at {when}"
            f"{also}:</p><pre class='error'>{html.escape(str(f.get('error', '?')))}</pre>"
            f"<details><summary>traceback</summary><pre>{html.escape(f.get('traceback', ''))}"
            "</pre></details>")  # fmt: skip


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
    places = last.get("ranks", [])
    # the parameter-server round (Ray's ps and hybrid strategies: the worker's last push, its
    # clock), shown where some rank has one
    rounds = any(place.get("round") for place in places)
    rows, stacks = [], []
    for place in places:
        seq = place.get("seq")
        collective = "unknown" if seq is None else f"#{seq} {place.get('op')}" if seq else "none"
        rows.append([place.get("rank"), collective, *([place.get("round") or "none"] * rounds)])
        stacks.append(f"<p>rank {html.escape(str(place.get('rank')))}:</p>"
                      f"<pre>{html.escape(str(place.get('stack', '')))}</pre>")  # fmt: skip
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("time", 0)))
    return (f"<h2 id='stall'>Where the ranks were (stall)</h2><p>{html.escape(last['message'])}"
            f" <span class='note'>({when}; {len(stalls)} stall report(s))</span></p>"
            + _table(["rank", "last collective", *["last ps round"] * rounds], rows)
            + "".join(stacks))  # fmt: skip


def render(data: dict[str, Any], events: list[dict[str, Any]]) -> str:
    """The page (a str of HTML) for gathered data and trace events."""
    parts = [f"<h1>distnet run {html.escape(data['run_dir'])}</h1>",
             f'<p><span class="status{" failed" if data.get("failure") else ""}" '
             f'id="run-status">{html.escape(data["status"])}</span> '
             f"<span class='note'>report written {time.strftime('%Y-%m-%d %H:%M:%S')}</span></p>",
             _job_section(data), _failure_section(data), _stall_section(data),
             _stages_section(data), "<h2>Loss curves</h2>",
             _img(plots.plot_curves(data["curves"]), "loss curves",
                  "under each panel: the learning rate of every epoch; dashed red: where a "
                  "stage resumed")]  # fmt: skip
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
