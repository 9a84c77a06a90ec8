"""``distnet report RUN_DIR``: a summary of a run directory, and ``RUN_DIR/report.html``
(``distnet.train.report.page``; also for a run still going or one that failed).
``distnet report RUN_A RUN_B ...``: one page comparing the runs (``compare``).

Reads ``report.json`` (written at the end of a run) or, for a run still going or cut off,
``pipeline.json`` and the stage directories, and prints the stages with their first and
last losses, the test accuracy and the pictures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's options."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (e.g. runs/demo)")
    parser.add_argument("others", nargs="*", metavar="RUN_DIR",
                        help="more run directories: compare them all on one page")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the raw report as JSON")
    parser.add_argument("--no-html", action="store_true", help="do not write report.html")
    parser.add_argument("--out", default="compare.html",
                        help="where the comparison of several runs goes (default: "
                             "compare.html in the current directory)")  # fmt: skip


def _stage_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Stages from the stage directories, when no report/pipeline table was written."""
    from distnet.train.loop.checkpoint import is_complete, read_manifest  # noqa: PLC0415

    rows = []
    stages = run_dir / "stages"
    dirs = (
        sorted(stages.iterdir(), key=lambda p: int(p.name.split("-", 1)[0]))
        if stages.is_dir()
        else []
    )  # noqa: E501
    for d in dirs:
        index, name = d.name.split("-", 1)
        row: dict[str, Any] = {"index": int(index), "name": name, "done": is_complete(d)}
        if row["done"] and (d / "results.json").is_file():
            row.update(json.loads((d / "results.json").read_text()))
        elif is_complete(d / "progress"):
            row["epochs_done"] = read_manifest(d / "progress")["extra"].get("epoch")
        rows.append(row)
    return rows


def load_report(run_dir: str | Path) -> dict[str, Any]:
    """The run's report as a dict (from report.json, else rebuilt from its stages)."""
    run_dir = Path(run_dir)
    if (run_dir / "report.json").is_file():
        return json.loads((run_dir / "report.json").read_text())
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    return {"stages": _stage_rows(run_dir), "unfinished": True}


def _failure(run_dir: Path) -> dict[str, Any] | None:
    """What stopped the run's latest invocation (``history.last_failure``), or None."""
    from distnet.train.report import history  # noqa: PLC0415

    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        info = {}
    return history.last_failure(info, history.read_failures(run_dir))


def format_report(report: dict[str, Any], run_dir: str | Path) -> str:
    """Human-readable lines: stages, losses, accuracy, pictures."""
    lines = [
        f"run {run_dir}"
        + ("  (unfinished: no report.json yet)" if report.get("unfinished") else "")
    ]  # noqa: E501
    failure = _failure(Path(run_dir)) if report.get("unfinished") else None
    if failure:
        lines.append(f"failed: rank {failure['rank']} in {failure.get('stage') or 'set-up'}: "
                     f"{failure.get('error')}")  # fmt: skip
    config = report.get("config")
    if config:
        lines.append("config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    lines.append("stages:")
    for row in report.get("stages", []):
        status = "done" if row.get("done") else "not done"
        if not row.get("done") and row.get("epochs_done"):
            status += f" (checkpoint after epoch {row['epochs_done']})"
        loss = row.get("history", {}).get("loss", [])
        detail = f", {len(loss)} epochs, loss {loss[0]:.4f} -> {loss[-1]:.4f}" if loss else ""
        acc = row.get("history", {}).get("accuracy", [])
        detail += f", train accuracy {acc[-1]:.4f}" if acc else ""
        if "test_reconstruction_error" in row:
            detail += f", test reconstruction error {row['test_reconstruction_error']:.4f}"
        if "seconds" in row:
            detail += f", {row['seconds']:.1f}s"
        lines.append(f"  {row.get('index', '?')}. {row.get('name', '?')}: {status}{detail}")
    if "test_accuracy" in report:
        lines.append(f"test accuracy: {report['test_accuracy']:.4f}  "
                     f"(test loss {report.get('test_loss', float('nan')):.4f})")  # fmt: skip
    if "seconds" in report:
        lines.append(f"total time: {report['seconds']:.1f}s, workers: {report.get('workers', 1)}")
    pictures = report.get("pictures", {})
    if pictures:
        lines.append("pictures:")
        for name, path in pictures.items():
            missing = "" if Path(path).is_file() else "  (missing)"
            lines.append(f"  {name}: {path}{missing}")
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> int:
    """``distnet report RUN_A RUN_B ...``: each run's summary line, and the comparison page."""
    from distnet.train.report.compare import write_comparison  # noqa: PLC0415

    dirs = [args.run_dir, *args.others]
    try:
        path = write_comparison(dirs, args.out)
    except (OSError, ValueError) as e:
        print(f"distnet report: comparison not written: {e}", file=sys.stderr)
        return 1
    print(f"comparison of {len(dirs)} runs: {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Prints the summary; 1 when the directory holds no run. With several run directories,
    writes their comparison instead (``compare``)."""
    if getattr(args, "others", None):
        return compare(args)
    try:
        report = load_report(args.run_dir)
    except FileNotFoundError as e:
        print(f"distnet report: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1) if args.json else format_report(report, args.run_dir))
    if not args.no_html:
        from distnet.train.report.page import write_html_report  # noqa: PLC0415

        try:
            path = write_html_report(args.run_dir)
        except (OSError, ValueError) as e:
            print(f"distnet report: report.html not written: {e}", file=sys.stderr)
            return 1
        if not args.json:
            print(f"report: {path}")
    return 0
