"""Pipelines of stages: named, resumable units of work over one model.

A stage (e.g. ``pretrain-0``, ``pretrain-1``, ``finetune``) runs ``fn(ctx) -> results``.
When it finishes, the pipeline commits a checkpoint of the whole model plus the stage's
results to ``run_dir/stages/<index>-<name>/``. Running the pipeline again skips every stage
whose checkpoint is complete, loads the model from the last one, and resumes an unfinished
stage from its last epoch checkpoint (``ctx.restore`` / ``ctx.epoch_checkpoint``), so a run
that was killed ends with the same parameters as one that never stopped.

Only the writer rank (rank 0) writes, and with a communicator only rank 0 reads: it decides
which stages are done and broadcasts the checkpoints it resumes from (model, optimiser, RNG,
callback states), so the other ranks' run directories may be node-local and empty.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distnet.train.loop.callbacks import Callback
from distnet.train.loop.checkpoint import (
    apply_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from distnet.train.loop.stagerecord import RECORD, epochs_trained, finished, read_record


@dataclass
class Stage:
    """A named unit of work; ``fn(ctx)`` returns JSON-serialisable results."""

    name: str
    fn: Callable[[StageContext], dict[str, Any]]
    # what the stage trains (``distnet.train.jobs.runguard.stage_plan``): with settings, the
    # pipeline records them and each run's segment of epochs in trained.json, and a finished
    # stage that aimed at fewer than ``epochs`` is reopened to continue
    epochs: int | None = None
    settings: dict[str, Any] | None = None


@dataclass
class StageContext:
    """What a running stage gets: its index, name and directory, and resume helpers."""

    index: int
    name: str
    dir: Path
    model: Any
    writer: bool = True
    resumed_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    comm: Any = None  # a Communicator: rank 0 reads checkpoints and broadcasts them
    # resume(ctx, optimizer, epoch) -> epoch, collective: called by restore() after the
    # epoch checkpoint; may load a later state of the same epoch (RayRankEngine.resume_stage)
    resume: Callable[[StageContext, Any, int], int] | None = None

    @property
    def progress_dir(self) -> Path:
        return self.dir / "progress"

    def restore(self, optimizer: Any = None) -> int:
        """Loads the stage's last epoch checkpoint (model, optimiser, RNG) if there is one.

        Returns:
            the epoch to continue from (0 when starting fresh); pass it as ``initial_epoch``.
        """
        found = read_checkpoint(self.progress_dir, self.comm)  # collective with a comm
        if found is not None:
            info = apply_checkpoint(self.progress_dir, *found, self.model, optimizer)
            self.resumed_epoch = int(info["epoch"])
            self.extra = {k: v for k, v in info.items() if k not in ("epoch", "manifest")}
        if self.resume is not None:  # an engine's mid-epoch state (Ray: after a lost worker)
            self.resumed_epoch = int(self.resume(self, optimizer, self.resumed_epoch))
        return self.resumed_epoch

    def own_epoch_state(self, epoch: int) -> tuple[dict[str, Any], float | None] | None:
        """This rank's own read of the stage's epoch checkpoint, no collective: its callbacks'
        states (``extra``) and learning rate when it is the one of ``epoch``, else None. (A Ray
        worker that joins a running group mid-epoch takes them from there.)"""
        found = read_checkpoint(self.progress_dir)
        if found is None or int(found[0]["extra"].get("epoch", -1)) != int(epoch):
            return None
        info = apply_checkpoint(self.progress_dir, *found, restore_rng=False)
        extra = {k: v for k, v in info.items() if k not in ("epoch", "manifest")}
        lr = (found[0].get("optimizer") or {}).get("lr")
        return extra, None if lr is None else float(lr)

    def epoch_checkpoint(self, optimizer: Any = None, every: int = 1) -> Callback:
        """A callback that commits model + optimiser + RNG after every ``every`` epochs."""
        return _EpochCheckpoint(self, optimizer, every)


class _EpochCheckpoint(Callback):
    """Commits the stage's progress each epoch; ``history`` spans resumed runs too."""

    runs_last = True

    def __init__(self, ctx: StageContext, optimizer: Any, every: int):
        self.ctx, self.opt, self.every = ctx, optimizer, every
        self.history: dict[str, list[float]] = {
            k: list(v) for k, v in ctx.extra.get("history", {}).items()
        }
        # the other callbacks' states saved with the checkpoint being resumed (plateau and
        # early-stopping counters, best weights): without them a resumed run cuts the
        # learning rate at other epochs than one that never stopped
        self._pending: dict[str, dict[str, Any]] | None = None
        if "callbacks" in ctx.extra:
            self._pending = {k: dict(v) for k, v in ctx.extra["callbacks"].items()}
            for name, value in ctx.extra.items():
                if name.startswith("callback") and "/" in name:
                    owner, key = name.split("/", 1)
                    for k, state in self._pending.items():
                        if k.split(":", 1)[0] == owner[len("callback") :]:
                            state[key] = value

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any]) -> None:
        # here, not in on_train_begin: every callback has reset itself by now
        if self._pending is not None:
            for i, c in enumerate(self.loop.callbacks):
                state = self._pending.get(f"{i}:{type(c).__name__}")
                if state is not None and c is not self:
                    c.load_state_dict(state)
            self._pending = None

    def _callback_states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(JSON states by "index:Class", arrays by "callback<index>/<key>")."""
        states, arrays = {}, {}
        for i, c in enumerate(self.loop.callbacks):
            state = {} if c is self else c.state_dict()
            if state:
                states[f"{i}:{type(c).__name__}"] = {
                    k: v for k, v in state.items() if not hasattr(v, "shape")
                }
                arrays.update(
                    {f"callback{i}/{k}": v for k, v in state.items() if hasattr(v, "shape")}
                )
        return states, arrays

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))
        if (epoch + 1) % self.every != 0:
            return
        # collective: sharded state is gathered with every rank taking part
        opt = (self.opt or self.optimizer).gathered_state()
        if self.ctx.writer:  # the others wait in the next collective: not a stall
            states, arrays = self._callback_states()
            with _writing(self.ctx.comm, "writing a checkpoint"):
                save_checkpoint(
                    self.ctx.progress_dir, self.ctx.model, opt,
                    epoch=epoch + 1, step=self.loop.step, stage=self.ctx.index,
                    history=self.history, callbacks=states, **arrays,
                )  # fmt: skip


def _writing(comm: Any, what: str) -> AbstractContextManager[Any]:
    """The writer's files as declared work (``Communicator.working``: the other ranks wait for
    it in their next collective, which the stall check must not take for a stall)."""
    return comm.working(what) if comm is not None else nullcontext()


class Pipeline:
    """Runs stages in order over ``model``, skipping those already complete in ``run_dir``.

    Args:
        run_dir: where stage checkpoints and ``pipeline.json`` (the stage table) go.
        model: the model every stage trains (its whole state is checkpointed per stage).
        stages: the stages, in order.
        writer: whether this process writes (rank 0 in a distributed run).
        log: called with one line per event (stage start, skip, end).
        comm: the run's communicator, when distributed: rank 0 alone then reads the run
            directory and broadcasts what it finds (the others' may be empty).
        resume: passed to every ``StageContext`` (see its ``resume`` field).
        record: what this run trains with besides the stages' settings (engine, workers,
            devices, ``[dist]``): kept per segment of epochs in each stage's trained.json.
        stands_in: this process takes a lost writer's place in a running run: the segment
            that run started is its own (no new one begins), it closes it when it commits.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        model: Any,
        stages: list[Stage],
        writer: bool = True,
        log: Callable[[str], None] | None = print,
        comm: Any = None,
        resume: Callable[[StageContext, Any, int], int] | None = None,
        record: dict[str, Any] | None = None,
        stands_in: bool = False,
    ):
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"Pipeline: stage names must be unique, got {names}")
        self.run_dir, self.model, self.stages = Path(run_dir), model, stages
        self.writer, self.log = writer, log or (lambda line: None)
        self.comm, self.resume, self.record = comm, resume, record or {}
        self.stands_in = stands_in

    def stage_dir(self, index: int) -> Path:
        return self.run_dir / "stages" / f"{index}-{self.stages[index].name}"

    def status(self) -> list[dict[str, Any]]:
        """One row per stage: name, whether it is done, and its results when done."""
        rows = []
        for i, stage in enumerate(self.stages):
            done = finished(self.stage_dir(i), stage.epochs)
            row: dict[str, Any] = {"index": i, "name": stage.name, "done": done}
            if done:
                row.update(json.loads((self.stage_dir(i) / "results.json").read_text()))
            trained = read_record(self.stage_dir(i))
            if trained is not None:  # what it was trained with, run by run
                row["trained"] = trained
            rows.append(row)
        return rows

    def run(self) -> list[dict[str, Any]]:
        """Runs every stage not yet complete; returns the stage table (see ``status``)."""
        if self.writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        done = [finished(self.stage_dir(i), s.epochs) for i, s in enumerate(self.stages)]
        if self.comm is not None and self.comm.size > 1:
            done = self.comm.broadcast_object(done, root=0)  # rank 0's run directory decides
        # only a prefix of finished stages counts: a later one was trained on other weights
        first_todo = done.index(False) if False in done else len(done)
        if first_todo > 0:
            load_checkpoint(self.stage_dir(first_todo - 1), self.model, comm=self.comm)
        if self.writer:
            # later stages will train on new weights: their old results and progress
            # checkpoints would otherwise be resumed over the re-trained earlier stage
            for i in range(first_todo + 1, len(self.stages)):
                if self.stage_dir(i).exists():
                    name = f"[stage {i + 1}/{len(self.stages)}] {self.stages[i].name}"
                    self.log(f"{name}: discarding its earlier run (an earlier stage runs again)")
                    shutil.rmtree(self.stage_dir(i))
        for i, stage in enumerate(self.stages):
            if i < first_todo:
                self.log(f"[stage {i + 1}/{len(self.stages)}] {stage.name}: done, skipped")
                continue
            ctx = StageContext(
                i, stage.name, self.stage_dir(i), self.model, self.writer, comm=self.comm,
                resume=self.resume,
            )  # fmt: skip
            self.log(f"[stage {i + 1}/{len(self.stages)}] {stage.name}: running")
            if self.writer and not self.stands_in:
                self._record_segment(i)
            start = time.perf_counter()
            results = dict(stage.fn(ctx) or {})
            results["seconds"] = round(time.perf_counter() - start, 3)
            results["resumed_from_epoch"] = ctx.resumed_epoch
            if self.writer:  # the others wait in the next stage's first collective
                with _writing(self.comm, "writing the stage's checkpoint"):
                    self._commit(i, results)
            self.log(f"[stage {i + 1}/{len(self.stages)}] {stage.name}: done "
                     f"in {results['seconds']:.1f}s")  # fmt: skip
        table = self.status() if self.writer else []
        if self.writer:
            text = json.dumps({"stages": table}, indent=1)
            (self.run_dir / "pipeline.json").write_text(text)
        return table

    def _record_segment(self, index: int, end: bool = False) -> None:
        """trained.json of a stage: its settings and epochs (see ``runguard``), and one segment
        per run that trained it: [from_epoch, to_epoch) with this run's ``record``."""
        stage, d = self.stages[index], self.stage_dir(index)
        if stage.settings is None:
            return
        trained = read_record(d) or {"segments": []}
        segments = trained["segments"]
        reached = epochs_trained(d)
        if end:
            segments[-1]["to_epoch"] = reached
        else:
            if segments and segments[-1].get("to_epoch") is None:  # a run cut off: it got here
                segments[-1]["to_epoch"] = reached
            segments.append({"from_epoch": reached, "to_epoch": None, **self.record,
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S")})  # fmt: skip
        trained.update(settings=stage.settings, epochs=stage.epochs)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(trained, indent=1, default=str))
        os.replace(tmp, d / RECORD)

    def _commit(self, index: int, results: dict[str, Any]) -> None:
        d = self.stage_dir(index)
        d.mkdir(parents=True, exist_ok=True)
        if self.stages[index].epochs is not None:  # what a later run compares its epochs with
            results["epochs"] = self.stages[index].epochs
        self._record_segment(index, end=True)
        # results first: the checkpoint's manifest is the commit point of the whole stage
        tmp = d / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, d / "results.json")
        save_checkpoint(d, self.model, stage=index, name=self.stages[index].name)
