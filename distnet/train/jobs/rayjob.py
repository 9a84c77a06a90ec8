"""Jobs on the Ray engine: what each Ray worker runs (``run_rank``), and ``run_ray_job``.

The engine (``distnet.parallel.rayengine``) places the workers, joins them into a group with a
``RayCommunicator``, replaces lost ones and hosts a task; running a *job* belongs to this
layer, so the task is defined here and handed down (the engine never imports ``train``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distnet.parallel.rayengine import RayOptions, RayRankEngine, WorkerLostError, run_on_ray
from distnet.parallel.rayengine.errors import (
    RankFailed,
    describe,
    is_consequence,
    may_restart,
    root_cause,
)


def run_rank(
    comm: Any, generation: int, job: dict[str, Any], spec: dict[str, Any], log: Any
) -> dict[str, Any]:
    """One Ray worker's part of ``job``: every stage, the same code as an MPI rank runs, with
    this worker's device, batch share and optimiser wrapping (``spec``); returns its report.
    An error of its own ends it as ``RankFailed`` (naming this rank, the stage and the root
    cause, see ``errors.describe``)."""
    from distnet.train.jobs.console import keep_console  # noqa: PLC0415
    from distnet.train.jobs.job import run_job  # noqa: PLC0415

    engine = RayRankEngine(spec, comm, generation)
    # with parameter servers the page is drawn here, once their stats are in report.json
    engine.draws_report = spec.get("strategy") in ("ps", "hybrid")
    failed = False
    try:
        with keep_console(Path(job["run"]["out"]), comm.rank, user_console=False) as note:
            report = run_job(
                job, lambda line: (note(line), log(line)), engine=engine,
                trace=bool(spec.get("trace")), progress="lines",
            )  # fmt: skip
    except WorkerLostError:  # a peer died: keep what the next run resumes from
        engine.after_failure()
        raise
    except Exception as e:
        if may_restart(e):  # the driver runs the job again (a lost shard): it must see why
            raise
        failed = True
        raise RankFailed(comm.rank, engine.stage, describe(e), is_consequence(root_cause(e))) from e
    finally:  # rank 0 stops the shards of a failed run's servers (after the carry was taken)
        engine.close(failed)
    report["shares"] = engine.shares
    report["steps"] = engine.steps
    report["resumed_mid_epoch"] = engine.resumed
    if engine.ps_stats:
        report["ps_stats"] = engine.ps_stats
    if engine.nodes is not None:  # strategy "hybrid": the ranks of each node
        report["nodes"] = engine.nodes
    path = Path(job["run"]["out"]) / "report.json"
    if comm.rank == 0 and path.exists():  # the run's report shows the shares too
        saved = json.loads(path.read_text())
        saved.update(shares=engine.shares, strategy=spec.get("strategy", "allreduce"))
        if engine.ps_stats:
            saved["ps_stats"] = engine.ps_stats
        if engine.nodes is not None:
            saved["nodes"] = engine.nodes
        path.with_suffix(".tmp").write_text(json.dumps(saved, indent=1, default=str))
        path.with_suffix(".tmp").replace(path)
        if engine.draws_report and job["run"]["report"]:  # with the servers' histograms
            from distnet.train.report.page import write_html_report  # noqa: PLC0415

            try:
                report["html"] = str(write_html_report(path.parent))
            except Exception as e:  # noqa: BLE001  (the run itself succeeded; say why, go on)
                log(f"report.html not written: {type(e).__name__}: {e}")
    return report


def run_ray_job(
    job: dict[str, Any], options: RayOptions, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Runs a loaded job on Ray workers; returns rank 0's report (``rank`` 0)."""
    return run_on_ray(job, options, run_rank, log)
