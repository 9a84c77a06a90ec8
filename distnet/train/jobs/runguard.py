"""The run-directory guard: a job run again in its run directory trains what it says, or stops.

Every stage records what it is trained with in ``stages/<i>-<name>/trained.json``::

    {"settings": {"finetune.lr": 0.003, "model.hidden": [64], ...},   # what changes its weights
     "epochs": 8,                                                     # the epochs it aims at
     "segments": [{"from_epoch": 0, "to_epoch": 5, "engine": ..., "workers": 2, ...},
                  {"from_epoch": 5, "to_epoch": 8, ...}]}             # one per invocation

Before any engine starts, ``check_run_dir(job)`` compares the job with the records of the
stages that have started (an epoch checkpoint or a finished stage):

- a changed setting of such a stage is refused with one line naming the keys (old -> new)
  and the way out (``--restart``: ``restart(job)`` empties the run directory);
- more epochs continue the stage from its last epoch (as Keras's ``initial_epoch``): the
  pipeline reopens a finished stage whose ``results.json`` aims at fewer epochs than the job,
  and the run ends with the parameters of a run that had the larger count from the start.
  Fewer epochs than a stage has already trained are refused; so is any change of epochs of a
  started stage under the ``cosine`` schedule, whose curve depends on the total (continuing
  it would not give the run that had the new total from the start);
- everything else (``[run] log_every``, ``pictures``, ``report``, ``device``,
  ``on_nonfinite``, the test store, ``[dist]``, ``[pretrain] cache_codes``) does not change
  what a stage computes and is accepted; ``[dist]`` and the device are recorded per segment.

A stage after the first one that (re)runs is discarded by the pipeline, so it is not checked.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from distnet.train.jobs.jobspec import JobError
from distnet.train.loop.checkpoint import is_complete
from distnet.train.loop.lrcallbacks import floor
from distnet.train.loop.stagerecord import committed_epochs, epochs_trained, finished, read_record

# what a run writes first in its run directory: --restart empties only a directory holding one
RUN_MARKERS = ("stages", "run.json", "pipeline.json", "report.json")


def stage_names(job: dict[str, Any]) -> list[str]:
    """The job's stage names in order: ``pretrain-K`` per hidden layer of a stacked autoencoder,
    then ``finetune``; ``train`` alone for an mlp or a cnn."""
    if job["model"]["type"] != "stacked_autoencoder":
        return ["train"]
    return [f"pretrain-{k}" for k in range(len(job["model"]["hidden"]))] + ["finetune"]


def _layer(value: Any, k: int) -> Any:
    return value[k] if isinstance(value, list) else value


def stage_plan(job: dict[str, Any], name: str) -> tuple[dict[str, Any], int]:
    """(settings, epochs) of stage ``name``: every key whose value changes the weights the stage
    produces, as ``"section.key" -> value`` (a [pretrain] list resolved to this layer's entry),
    and the epochs it trains."""
    d, m, pre, ft = job["data"], job["model"], job["pretrain"], job["finetune"]
    settings: dict[str, Any] = {
        "data.train": _where(d["train"]), "data.batch_size": d["batch_size"],
        "data.shuffle_chunks": d["shuffle_chunks"], "run.seed": job["run"]["seed"],
        "data.validation_fraction": d["validation_fraction"],
        "model.type": m["type"],
    }  # fmt: skip
    if m["type"] == "cnn":
        settings["model.layers"] = m["layers"]
    else:
        settings.update({"model.hidden": m["hidden"], "model.activation": m["activation"]})
    if m["type"] == "stacked_autoencoder":
        settings["model.tied_weights"] = m["tied_weights"]
    elif m["type"] == "mlp":
        settings["model.dropout"] = m["dropout"]
    if name.startswith("pretrain-"):
        k = int(name.split("-", 1)[1])
        settings.update({f"pretrain.{key}": _layer(pre[key], k) for key in ("lr", "corruption")})
        settings.update({f"pretrain.{key}": pre[key]
                         for key in ("loss", "sparsity_target", "sparsity_weight")})  # fmt: skip
        return settings, int(_layer(pre["epochs"], k))
    keys = ["optimizer", "lr", "weight_decay", "schedule"]
    keys += ["momentum"] if ft["optimizer"] == "sgd" else []
    keys += {"plateau": ["plateau_patience", "plateau_factor"], "cosine": [],
             "step": ["step_epochs", "step_factor"]}[ft["schedule"]]  # fmt: skip
    settings.update({f"finetune.{key}": ft[key] for key in keys})
    settings["finetune.lr_min"] = floor(ft)  # what the schedule used (absent: its default)
    return settings, int(ft["epochs"])


def _where(path: str | None) -> str | None:
    """A store's location as recorded: absolute for local paths (the same store however the
    job file or --set spelled it), URLs as written."""
    return path if path is None or "://" in path else os.path.abspath(path)


def _show(value: Any) -> str:
    return json.dumps(value)


def _stage_changes(job: dict[str, Any], name: str, d: Path, record: dict[str, Any]) -> dict:
    """Refused changes of one started stage: key -> "key old -> new[: why]"."""
    settings, epochs = stage_plan(job, name)
    old = record["settings"]
    diffs = {k: f"{k} {_show(old.get(k))} -> {_show(v)}"
             for k, v in settings.items() if old.get(k, v) != v}  # fmt: skip
    diffs.update({k: f"{k} {_show(v)} -> (not used)" for k, v in old.items() if k not in settings})
    key = "pretrain.epochs" if name.startswith("pretrain-") else "finetune.epochs"
    aimed = int(record.get("epochs", epochs))
    reached = max(epochs_trained(d), committed_epochs(d) or 0)
    if epochs < reached:
        diffs[key] = f"{key} {aimed} -> {epochs} (stage {name} has trained {reached} epochs)"
    elif epochs != aimed and settings.get("finetune.schedule") == "cosine":
        diffs[key] = (f"{key} {aimed} -> {epochs} (the cosine schedule's curve depends on the "
                      f"total, so stage {name} cannot continue to another total)")  # fmt: skip
    return diffs


def check_run_dir(job: dict[str, Any]) -> list[str]:
    """Refuses (JobError, one line) a job whose started stages in its run directory were trained
    with other settings; returns lines to log for the stages that go on to more epochs."""
    out = Path(job["run"]["out"])
    root = out / "stages"
    if not root.is_dir():
        return []
    names = stage_names(job)
    dirs = {p.name: p for p in root.iterdir() if p.is_dir()}
    changed: dict[str, str] = {}  # by key: one entry however many stages share the key
    stages: list[str] = []
    notes: list[str] = []
    for i, name in enumerate(names):
        d = dirs.pop(f"{i}-{name}", None)
        record = read_record(d) if d is not None else None
        if d is None or record is None or not (is_complete(d) or epochs_trained(d)):
            break  # never started: this stage and every later one run afresh
        diffs = _stage_changes(job, name, d, record)
        if diffs:
            changed.update(diffs)
            state = "finished" if is_complete(d) else f"at epoch {epochs_trained(d)}"
            stages.append(f"{name}, {state}")
        epochs = stage_plan(job, name)[1]
        if not finished(d, epochs):
            if is_complete(d) and not diffs:
                notes.append(f"stage {name}: {committed_epochs(d)} epochs trained, "
                             f"continuing to {epochs}")  # fmt: skip
            break  # the pipeline runs this stage again and discards the later ones
    if not changed:  # stages the job no longer has (its model changed shape or type)
        first = stage_plan(job, names[0])[0]
        current = {f"{i}-{name}" for i, name in enumerate(names)}
        for dir_name, d in sorted(dirs.items()):
            record = None if dir_name in current else read_record(d)
            if record is None or not (is_complete(d) or epochs_trained(d)):
                continue
            old = record["settings"]
            diffs = {k: f"{k} {_show(v)} -> {_show(first[k])}"
                     for k, v in old.items() if k in first and first[k] != v}  # fmt: skip
            changed.update(diffs or {dir_name: f"stage {dir_name} is not in the job any more"})
            stages.append(dir_name)
    if changed:
        raise JobError(
            f"{out} holds stages trained with other settings ({'; '.join(stages)}): "
            f"{', '.join(changed.values())}; pass --restart to start the run directory afresh "
            "(or --out for another one)"
        )
    return notes


def restart(job: dict[str, Any], keep: list[str | os.PathLike]) -> list[str]:
    """Empties the job's run directory for ``--restart``: removes everything in it except the
    entries that hold the job's data stores or ``keep`` (the job file); returns what it
    removed. Nothing of the earlier run stays (stages, codes, metrics, reports, pictures)."""
    out = Path(job["run"]["out"]).resolve()
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if not any((out / name).exists() for name in RUN_MARKERS):  # not ours: never empty it
        raise JobError(f"--restart: {out} holds no distnet run (none of {', '.join(RUN_MARKERS)})"
                       "; give the run directory, or remove it yourself")  # fmt: skip
    precious = [Path(p).resolve() for p in keep]
    precious += [Path(p).resolve() for p in (job["data"]["train"], job["data"]["test"])
                 if p and "://" not in p]  # fmt: skip
    removed = []
    for entry in sorted(out.iterdir()):
        if any(p == entry or entry in p.parents for p in precious):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def planned(job: dict[str, Any], stages: list[Any]) -> list[Any]:
    """``stages`` (``Pipeline`` stages named as ``stage_names``) with their settings and epochs
    from the job, so that the pipeline records them and reopens a stage given more epochs."""
    for stage in stages:
        stage.settings, stage.epochs = stage_plan(job, stage.name)
    return stages


def segment(job: dict[str, Any], comm: Any, device: str) -> dict[str, Any]:
    """What this run trains with besides the stages' settings, kept per segment of epochs:
    engine, workers, device, non-finite policy and the ``[dist]`` keys not at their defaults."""
    from distnet.train.jobs.jobspec import defaults  # noqa: PLC0415

    dist = {k: v for k, v in job["dist"].items() if v != defaults()["dist"][k]}
    return {"engine": type(comm).__name__, "workers": comm.size, "device": str(device),
            "on_nonfinite": job["run"]["on_nonfinite"], "dist": dist}  # fmt: skip


def preflight(job: dict[str, Any], job_path: str, restart_dir: bool, log: Any = print) -> Any:
    """What ``distnet train`` checks before any engine starts; returns the Ray engine's options
    for a Ray job (None otherwise). In the process that owns the run directory (the only one,
    or rank 0 of a launched job: the others wait in their engine's start, which the launcher
    stops when this one exits), ``--restart`` empties the run directory, else the guard
    compares it with the job; then the data for the planned ranks (``check_data``)."""
    from distnet.parallel.rayengine import options_from_job  # noqa: PLC0415
    from distnet.train.jobs.datacheck import check_data, planned_world_size  # noqa: PLC0415
    from distnet.train.loop.callbacks import process_rank  # noqa: PLC0415

    options = options_from_job(job) if job["dist"]["engine"] == "ray" else None
    if process_rank() != 0:
        return options
    if restart_dir:
        removed = restart(job, keep=[job_path])
        if removed:
            log(f"--restart: removed {', '.join(removed)} from {job['run']['out']}")
    else:
        for line in check_run_dir(job):
            log(line)
    check_data(job, planned_world_size(job, options and len(options.workers)))
    return options
