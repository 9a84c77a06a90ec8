"""A run's final parameters, and the one-process run they must equal.

``final_params`` rebuilds the job's model and loads the last stage checkpoint (parameters in
the model's order, comparable with ``reference_params``); ``checkpoint_arrays`` reads the
arrays of that checkpoint as saved (no model built: any job, any engine).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import numpy as np

from distnet import backend
from distnet.core.functional import cross_entropy
from distnet.data import StreamLoader
from distnet.train import load_checkpoint, read_manifest
from distnet.train.jobs.job import _make_optimizer, build_model


def _last_stage(out: Path | str) -> Path:
    stages = sorted(glob.glob(str(Path(out) / "stages" / "*")))
    assert stages, f"no stage checkpoint under {out}"
    return Path(stages[-1])


def final_model(job: dict, out: Path | str | None = None, features: int = 64, classes: int = 10):
    """The job's model (``features`` inputs, ``classes`` outputs) holding the parameters of
    the last stage checkpoint under ``out`` (default: the job's ``run.out``)."""
    backend.seed(0)
    model = build_model(job, features, classes)
    load_checkpoint(_last_stage(job["run"]["out"] if out is None else out), model)
    return model


def flat(model_or_arrays: Any) -> np.ndarray:
    """A model's parameters in order, or a dict of arrays in key order, as one flat array."""
    if isinstance(model_or_arrays, dict):
        return np.concatenate([model_or_arrays[k].ravel() for k in sorted(model_or_arrays)])
    return np.concatenate([np.asarray(p.data).ravel() for p in model_or_arrays.parameters()])


def final_params(
    job: dict, out: Path | str | None = None, features: int = 64, classes: int = 10
) -> np.ndarray:
    """``final_model``'s parameters as one flat array (the model's order)."""
    return flat(final_model(job, out, features, classes))


def checkpoint_arrays(out: Path | str, prefix: str = "model/") -> dict[str, np.ndarray]:
    """The arrays whose key starts with ``prefix`` (default: the model's) of the last stage's
    committed checkpoint under ``out``, from the file its manifest names (an interrupt between
    the commit and the removal of the previous arrays file leaves both)."""
    stage = _last_stage(out)
    with np.load(stage / read_manifest(stage)["arrays"], allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files if k.startswith(prefix)}


def reference_params(
    job: dict,
    epochs: int,
    workers: int,
    sizes_per_epoch: list[list[int]] | None = None,
    features: int = 64,
    classes: int = 10,
    count_skipped: bool = False,
) -> np.ndarray | tuple[np.ndarray, int]:
    """One process, one optimiser, on the union of every rank's batch (the global batch):
    the parameters a synchronous data-parallel run of ``workers`` ranks must end with. A
    global batch holding a non-finite sample is skipped, as every engine skips it.
    ``sizes_per_epoch[e]``: the ranks' batch sizes in epoch e (None: equal shares);
    ``count_skipped``: return (parameters, number of steps skipped)."""
    from distnet.parallel.shares import set_batch_sizes  # noqa: PLC0415

    backend.seed(job["run"]["seed"])
    net = build_model(job, features, classes)
    opt = _make_optimizer(job["finetune"], net)
    per_rank = job["data"]["batch_size"] // workers
    loaders = [
        StreamLoader(job["data"]["train"], per_rank, rank=r, world_size=workers,
                     seed=job["run"]["seed"], shuffle_chunks=job["data"]["shuffle_chunks"])
        for r in range(workers)
    ]  # fmt: skip
    skipped = 0
    for epoch in range(epochs):
        for ld in loaders:
            if sizes_per_epoch is not None:
                set_batch_sizes(ld, sizes_per_epoch[epoch])
            ld.set_epoch(epoch)
        for batches in zip(*loaders, strict=True):
            x = np.concatenate([b[0] for b in batches])
            y = np.concatenate([b[1] for b in batches])
            if not np.isfinite(x).all():
                skipped += 1
                continue
            opt.zero_grad()
            cross_entropy(net(x), y).backward()
            opt.step()
    for ld in loaders:
        ld.close()
    return (flat(net), skipped) if count_skipped else flat(net)
