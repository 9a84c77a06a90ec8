"""``distnet report RUN_A RUN_B ...``: one page that compares runs (``compare.html``).

Their curves overlaid (one colour per run: training solid, validation dashed, the learning
rate under them), their settings side by side (the job's keys, each row that differs
highlighted) and their results (status, test and validation accuracy, time). Like
``report.html`` it is one self-contained file with its data embedded as JSON
(``<script type="application/json" id="distnet-compare-data">``).

It is written to the current directory by default, not into any of the runs: a comparison
belongs to none of them, and a run directory holds what its own job wrote.
"""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from typing import Any

from distnet.train.report import history, plots
from distnet.train.report.page import CSS, _img, _table
from distnet.train.report.rundata import gather

RUN_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
              "#8c8c8c", "#ccb974", "#64b5cd")  # fmt: skip


def flat_settings(job: dict[str, Any]) -> dict[str, Any]:
    """A job's sections flattened to ``"section.key" -> value``."""
    return {f"{section}.{key}": value for section, values in sorted(job.items())
            if isinstance(values, dict) for key, value in sorted(values.items())}  # fmt: skip


def settings_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per job key: ``{"key", "values": [one per run, None if absent], "differs"}``;
    keys that differ first, then the rest, each group in key order. The run directory
    (``run.out``) is left out: it always differs."""
    flats = [flat_settings(r["info"].get("job") or r["report"].get("job") or {}) for r in runs]
    keys = sorted({k for f in flats for k in f} - {"run.out"})
    rows = [{"key": k, "values": [f.get(k) for f in flats]} for k in keys]
    for row in rows:
        row["differs"] = len({json.dumps(v, sort_keys=True) for v in row["values"]}) > 1
    return sorted(rows, key=lambda r: (not r["differs"], r["key"]))


def _last(curve: dict[str, Any] | None, key: str) -> float | None:
    values = [v for v in (curve or {}).get(key) or [] if v is not None]
    return float(values[-1]) if values else None


def results(run: dict[str, Any]) -> dict[str, Any]:
    """A run's outcome: status, final test accuracy and loss, the last supervised epoch's
    training and validation loss and accuracy, epochs, total time, workers, engine."""
    report = run["report"]
    supervised = next((c for c in reversed(run["curves"]) if c["kind"] != "pretrain"), None)
    return {"status": run["status"], "test_accuracy": report.get("test_accuracy"),
            "test_loss": report.get("test_loss"),
            "train_loss": _last(supervised, "loss"),
            "train_accuracy": _last(supervised, "accuracy"),
            "val_loss": _last(supervised, "val_loss"),
            "val_accuracy": _last(supervised, "val_accuracy"),
            "epochs": len((supervised or {}).get("epoch") or []),
            "seconds": run["total_seconds"], "workers": run["info"].get("workers"),
            "engine": history.engine_name(run["info"].get("engine"))}  # fmt: skip


def compare_figure(runs: list[dict[str, Any]], labels: list[str]) -> Any:
    """Per stage name (in the first run's order, then others'): loss and accuracy of every
    run overlaid over a small learning-rate axis; the legend under the panels."""
    plt = plots._pyplot()
    stages: list[str] = []
    for run in runs:
        stages += [c["stage"] for c in run["curves"] if c["stage"] not in stages]
    n = max(len(stages), 1)
    ratios = {"height_ratios": [2.4, 2.4, 1], "hspace": 0.12}
    fig, axes = plt.subplots(
        3, n, figsize=(5.0 * n, 6.2), squeeze=False, sharex="col", gridspec_kw=ratios
    )
    handles: list[Any] = []
    for col, stage in enumerate(stages):
        loss_ax, acc_ax, lr_ax = axes[0][col], axes[1][col], axes[2][col]
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            c = next((c for c in run["curves"] if c["stage"] == stage), None)
            if c is None:
                continue
            color = RUN_COLORS[i % len(RUN_COLORS)]
            (line,) = loss_ax.plot(c["epoch"], c["loss"], color=color, marker=".", label=label)
            if not any(h.get_label() == label for h in handles):
                handles.append(line)
            for key, ax in (("val_loss", loss_ax), ("accuracy", acc_ax), ("val_accuracy", acc_ax)):
                if c.get(key):
                    ax.plot(c["epoch"], c[key], color=color,
                            linestyle="--" if key.startswith("val_") else "-")  # fmt: skip
            plots.lr_steps(lr_ax, c, color=color)
        loss_ax.set_title(stage)
        loss_ax.set_ylabel("loss")
        acc_ax.set_ylabel("accuracy")
        plots.style_lr_axis(lr_ax)
        if not acc_ax.get_lines():
            acc_ax.text(0.5, 0.5, "no accuracy (a reconstruction stage)", ha="center",
                        va="center", transform=acc_ax.transAxes, color="0.4",
                        fontsize=8)  # fmt: skip
        for ax in (loss_ax, acc_ax):
            ax.grid(alpha=0.3)
    handles += [plt.Line2D([], [], color="0.3", label="training"),
                plt.Line2D([], [], color="0.3", linestyle="--", label="validation")]  # fmt: skip
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False,
               ncol=min(len(handles), 6), fontsize=8)  # fmt: skip
    return fig


def _run_labels(run_dirs: list[Path]) -> list[str]:
    """Short names: the directories' names, or their paths where names repeat."""
    names = [d.name or str(d) for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def _settings_tables(rows: list[dict[str, Any]], header: list[str]) -> str:
    """The settings that differ (highlighted), then those the same in every run (folded)."""
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"

    def table(id_: str, chosen: list[dict[str, Any]]) -> str:
        body = "".join(
            f"<tr class='{'differs' if r['differs'] else 'same'}'><td>{html.escape(r['key'])}"
            "</td>" + "".join(f"<td>{html.escape(json.dumps(v))}</td>" for v in r["values"])
            + "</tr>"
            for r in chosen
        )  # fmt: skip
        return f"<table id='{id_}'>{head}{body}</table>"

    differ = [r for r in rows if r["differs"]]
    same = [r for r in rows if not r["differs"]]
    return ((table("settings", differ) if differ else "")
            + f"<details><summary>{len(same)} setting(s) the same in every run</summary>"
            + table("settings-same", same) + "</details>")  # fmt: skip


def render_comparison(runs: list[dict[str, Any]], labels: list[str]) -> str:
    """The comparison page (a str of HTML) for gathered runs."""
    swatch = '<span style="color:{}">&#9632;</span> '
    header = ["", *(swatch.format(RUN_COLORS[i % len(RUN_COLORS)]) + html.escape(label)
                    for i, label in enumerate(labels))]  # fmt: skip
    rows = settings_rows(runs)
    settings = _settings_tables(rows, header)
    outcome = [results(r) for r in runs]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2%}"

    def num(v: float | None, fmt: str = ".4f") -> str:
        return "-" if v is None else format(v, fmt)

    result_rows = [
        ["status", *(o["status"] for o in outcome)],
        ["test accuracy", *(pct(o["test_accuracy"]) for o in outcome)],
        ["validation accuracy (last epoch)", *(pct(o["val_accuracy"]) for o in outcome)],
        ["training accuracy (last epoch)", *(pct(o["train_accuracy"]) for o in outcome)],
        ["test loss", *(num(o["test_loss"]) for o in outcome)],
        ["validation loss (last epoch)", *(num(o["val_loss"]) for o in outcome)],
        ["training loss (last epoch)", *(num(o["train_loss"]) for o in outcome)],
        ["epochs (supervised)", *(o["epochs"] for o in outcome)],
        ["total time", *("-" if o["seconds"] is None else f"{o['seconds']:.1f} s"
                         for o in outcome)],
        ["workers", *(o["workers"] or "?" for o in outcome)],
        ["engine", *(o["engine"] for o in outcome)],
    ]  # fmt: skip
    table = _table([], result_rows).replace("<table>", "<table id='results'>", 1)
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"
    table = table.replace("<table id='results'>", f"<table id='results'>{head}", 1)
    n_diff = sum(r["differs"] for r in rows)
    shown = {"runs": [r["run_dir"] for r in runs], "labels": labels, "settings": rows,
             "results": outcome, "curves": [r["curves"] for r in runs]}  # fmt: skip
    blob = json.dumps(shown, default=str).replace("</", "<\\/")
    figure = plots.png_bytes(compare_figure(runs, labels))
    css = CSS + "tr.differs td{background:#fff3cd}tr.differs td:first-child{font-weight:600}"
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>distnet: {len(runs)} runs compared</title><style>{css}</style></head><body>"
            f"<h1>{len(runs)} runs compared</h1><p class='note'>written "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}; each run's own page is its report.html</p>"
            "<h2>Results</h2>" + table + "<h2>Curves</h2>"
            + _img(figure, "curves of every run", "colour: run; solid: training, dashed: "
                   "validation; under each stage: its learning rate; where runs coincide the last "
                   "one drawn hides the others")
            + f"<h2>Settings</h2><p class='note'>{n_diff} setting(s) differ</p>" + settings
            + f'<script type="application/json" id="distnet-compare-data">{blob}</script>'
            "</body></html>")  # fmt: skip


def write_comparison(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Writes the comparison of ``run_dirs`` to ``out`` (atomically); returns its path.
    Raises ``FileNotFoundError`` or ``ValueError`` naming a directory that is not a run."""
    from distnet.train.jobs.runguard import RUN_MARKERS  # noqa: PLC0415

    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such run directory")
        if not any((d / marker).exists() for marker in RUN_MARKERS):
            raise ValueError(f"{d}: not a run directory (it has none of {', '.join(RUN_MARKERS)})")
    runs = [gather(d)[0] for d in dirs]
    page = render_comparison(runs, _run_labels(dirs))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
