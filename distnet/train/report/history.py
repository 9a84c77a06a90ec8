"""A run's history across its invocations: every start of the run directory (``run.json``'s
``invocations``), how long each ran, every resume, and why a failed one stopped
(``failures/rank-K.json``, written by each rank that raised: ``metrics.write_failure``).

Everything here reads plain data (the metrics records, ``run.json``) and returns plain data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

ENGINES = {"MPICommunicator": "MPI", "LocalCommunicator": "local (one process)",
           "RayCommunicator": "Ray", "RaySubgroup": "Ray"}  # fmt: skip
"""Engine names by the communicator class a run recorded (``run.json``'s ``engine``)."""


def engine_name(recorded: Any) -> str:
    """The engine's name for a recorded communicator class name (anything else as given)."""
    return ENGINES.get(str(recorded), str(recorded))


def strategy_name(info: dict[str, Any]) -> str:
    """The synchronisation strategy in words, e.g. "allreduce" or "ps (async, 2 shards)"."""
    dist = (info.get("job") or {}).get("dist") or {}
    strategy = info.get("strategy") or dist.get("strategy") or "allreduce"
    if strategy in ("ps", "hybrid"):
        mode = dist.get("mode", "sync")
        bound = f" {dist.get('staleness')}" if mode == "ssp" else ""
        return f"{strategy} ({mode}{bound}, {dist.get('shards', 1)} shard(s))"
    return str(strategy)


def read_failures(run_dir: Path) -> list[dict[str, Any]]:
    """Every rank's failure record, earliest first; [] when no rank recorded one."""
    out = []
    for path in sorted((run_dir / "failures").glob("rank-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "rank" in record:
            out.append(record)
    return sorted(out, key=lambda r: float(r.get("time", 0.0)))


def first_failure(failures: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The failure that stopped the run: the earliest error that is not an interruption (the
    others' errors, peers gone or stopped, came after it), else the earliest record."""
    errors = [f for f in failures if not f.get("interrupted")]
    return (errors or failures or [None])[0]


def last_failure(info: dict[str, Any], failures: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The failure that stopped the latest invocation (records of earlier ones, which a
    resume went on from, do not count); None when it recorded none."""
    runs = info.get("invocations") or ([info] if info else [])
    start = _start(runs[-1]) if runs else None
    slack = _slack(runs[-1]) if runs else 0.0
    mine = [f for f in failures if start is None or float(f.get("time", 0.0)) >= start - slack]
    return first_failure(mine)


def _start(invocation: dict[str, Any]) -> float | None:
    if invocation.get("started_t") is not None:
        return float(invocation["started_t"])
    try:  # run directories from before started_t: local time to the second
        return time.mktime(time.strptime(str(invocation["started"]), "%Y-%m-%dT%H:%M:%S"))
    except (KeyError, ValueError):
        return None


def _slack(invocation: dict[str, Any]) -> float:
    """How far a start time may be off: none for ``started_t`` (the exact time), a second for
    the older ``started`` text. A failure less than a second before the next start is the
    earlier invocation's (a resume started at once after a crash)."""
    return 0.0 if invocation.get("started_t") is not None else 1.0


def invocations(
    info: dict[str, Any],
    records: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    report: dict[str, Any],
) -> list[dict[str, Any]]:
    """Each start of the run directory: engine, workers, start, seconds (its own total when it
    finished, else to its last metrics record) and outcome ("finished", "failed: rank K in
    STAGE", "interrupted", "stopped ..." or "running or stopped")."""
    runs = info.get("invocations") or ([info] if info else [])
    starts = [_start(r) for r in runs]
    slacks = [_slack(r) for r in runs]
    ends = [*starts[1:], None][: len(starts)]
    end_slacks = [*slacks[1:], 0.0][: len(slacks)]
    out = []
    for i, (run, start, end) in enumerate(zip(runs, starts, ends, strict=True)):

        def within(
            t: float,
            start: float | None = start,
            end: float | None = end,
            slack: float = slacks[i],
            end_slack: float = end_slacks[i],
        ) -> bool:
            return (start is None or t >= start - slack) and (end is None or t < end - end_slack)

        times = [float(r["t"]) for r in records if "t" in r and within(float(r["t"]))]
        seconds = (max(times) - start) if times and start is not None else None
        last = i == len(runs) - 1
        mine = [f for f in failures if within(float(f.get("time", 0.0)))]
        if run.get("seconds") is not None:  # it finished (``RunObserver.finished``)
            outcome, seconds = "finished", float(run["seconds"])
        elif last and not report.get("unfinished"):
            outcome = "finished"
            seconds = report.get("seconds", seconds)
        elif mine:
            first = first_failure(mine) or {}
            outcome = (
                "interrupted"
                if first.get("interrupted")
                else (f"failed: rank {first.get('rank')} in {first.get('stage') or 'set-up'}")
            )
        else:
            outcome = "running or stopped" if last else "stopped (no failure recorded)"
        out.append({"started": run.get("started"), "engine": engine_name(run.get("engine")),
                    "workers": run.get("workers"), "strategy": run.get("strategy"),
                    "argv": " ".join(map(str, run.get("argv") or [])), "seconds": seconds,
                    "outcome": outcome})  # fmt: skip
    return out


def total_seconds(runs: list[dict[str, Any]]) -> float | None:
    """The time of every invocation together (None when none has a time)."""
    times = [r["seconds"] for r in runs if r.get("seconds") is not None]
    return float(sum(times)) if times else None


def resumes(records: list[dict[str, Any]], report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every resume of a stage from its checkpoint, in order (rank 0's ``resume`` records;
    the stages' ``resumed_from_epoch`` for a run without metrics)."""
    found = [{"stage": r.get("stage"), "epoch": r.get("epoch"), "t": r.get("t")}
             for r in records if r.get("event") == "resume"]  # fmt: skip
    if found:
        return found
    return [{"stage": s.get("name"), "epoch": s["resumed_from_epoch"], "t": None}
            for s in report.get("stages", []) if s.get("resumed_from_epoch")]  # fmt: skip
