"""Shared by the resume scripts: run a job under MPI, either stopped on every rank after the
second epoch of its supervised stage ("finetune", or an MLP's "train") was checkpointed
(MODE "crash") or to the end ("full", "resume")."""

import sys
from collections.abc import Callable
from typing import Any

from distnet.train.jobs.job import run_job
from distnet.train.loop import pipeline as pipeline_mod


class Crash(Exception):
    pass


def run_or_crash(job: dict, comm: Any, mode: str, log: Callable[[str], None]) -> tuple[dict, Any]:
    """``(report, model)`` of the job's run (the model of its first pipeline). In MODE
    "crash" every rank stops at the same point, after the checkpoint, and the process exits 0."""
    models = []
    real_init = pipeline_mod.Pipeline.__init__

    def recording_init(self, run_dir, model, *args, **kwargs):
        models.append(model)
        real_init(self, run_dir, model, *args, **kwargs)

    pipeline_mod.Pipeline.__init__ = recording_init
    if mode != "crash":
        return run_job(job, log=log), models[0]
    real_end = pipeline_mod._EpochCheckpoint.on_epoch_end

    def crashing_end(self, epoch, logs):
        real_end(self, epoch, logs)
        if self.ctx.name in ("finetune", "train") and epoch + 1 == 2:
            raise Crash  # every rank, at the same point, after the checkpoint

    pipeline_mod._EpochCheckpoint.on_epoch_end = crashing_end
    try:
        run_job(job, log=lambda line: None)
    except Crash:
        comm.barrier()
        comm.print0("crashed as planned")
        sys.exit(0)
    raise AssertionError("the planned crash did not happen")
