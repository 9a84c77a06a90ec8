"""A job's data, checked before the first step: the stores against each other and the batch.

``check_data(job, world_size)`` opens the job's stores (metadata only) and refuses, with one
line naming the store, the array and what is wrong (``JobError``, exit 2 from the CLI):

- a training store without integer labels ``y`` or without ``num_classes``;
- a test store whose samples have another shape than the training store's, or another dtype
  with values on another scale (uint8 and float32 stores meet as float32 through their
  ``scale``/``offset``), that has no integer labels, or whose labels may reach past the
  model's classes;
- a global batch that does not split into equal shares of at least one sample per rank, or
  that is larger than the training store (every step would repeat samples to fill it).

Label ranges come from the ``num_classes`` attribute (the converters write it; reading a chunk
refuses a label outside ``0..num_classes-1``, so the attribute bounds every label): no store
is read whole. A test store without the attribute has its labels read, ``y`` alone and chunk
by chunk, when it holds at most ``MAX_LABELS_READ`` of them; a larger one is left to the
per-chunk check of evaluation.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from distnet.data import open_dataset
from distnet.train.jobs.jobspec import JobError

MAX_LABELS_READ = 1 << 22  # 32 MB of int64 labels: a few reads, well under a second


def planned_world_size(job: dict[str, Any], ray_workers: int | None = None) -> int:
    """The ranks the job will run on, known before any engine starts: the Ray workers
    (``ray_workers``), the launcher's size for MPI (its environment), else 1."""
    if job["dist"]["engine"] == "ray":
        return int(ray_workers or 1)
    if job["dist"]["engine"] == "local":
        return 1
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _labels(ds: Any, role: str) -> Any:
    """The store's integer labels array; JobError when it has none."""
    y = ds.y
    if y is None or np.dtype(y.dtype).kind not in "iu":
        what = "no array 'y'" if y is None else f"array 'y' holds {y.dtype} targets"
        raise JobError(f"{ds.path}: {role} store has {what}; a job needs integer class labels")
    return y


def label_bound(ds: Any) -> int | None:
    """1 + the largest label the store may hold: its ``num_classes``, else its labels' maximum
    read chunk by chunk when there are at most MAX_LABELS_READ; None when unknown."""
    if ds.num_classes is not None:
        return int(ds.num_classes)
    if len(ds) > MAX_LABELS_READ:
        return None
    top = -1
    for i in range(ds.num_chunks):
        labels = ds.array_chunk("y", i)
        if labels.size:
            if int(labels.min()) < 0:
                raise JobError(f"{ds.path}: array 'y' chunk {i}: negative label {labels.min()}")
            top = max(top, int(labels.max()))
    return top + 1


def _value_range(ds: Any) -> tuple[float, float]:
    """The float range of a store's samples: uint8's from its scale and offset, float32's from
    its first chunk (one read)."""
    if ds.dtype == np.uint8:
        ends = sorted((ds.offset, ds.offset + 255 * ds.scale))
        return ends[0], ends[1]
    x, _ = ds.read_chunk(0)
    values = ds.to_float(x)
    return float(values.min()), float(values.max())


def _same_scale(train: Any, test: Any) -> None:
    """Stores of different dtypes meet as float32 through their scale/offset: refuses a pair
    whose values lie on different scales (a float32 store of raw 0..255 pixels beside a uint8
    one scaled to 0..1 would be evaluated on inputs the model never saw)."""
    (t_lo, t_hi), (lo, hi) = _value_range(train), _value_range(test)
    span = max(t_hi - t_lo, 1e-12)
    if lo < t_lo - span or hi > t_hi + span:
        raise JobError(
            f"{test.path}: array 'x' ({test.dtype}, scale {test.scale}) has values in "
            f"[{lo:g}, {hi:g}], the training store's ({train.dtype}, scale {train.scale}) lie in "
            f"[{t_lo:g}, {t_hi:g}]: set the store's scale/offset attributes or convert it again"
        )


def check_data(job: dict[str, Any], world_size: int) -> Any:
    """Checks the job's stores and batch for ``world_size`` ranks (see the module docstring);
    returns the opened training store. Raises JobError or DatasetError (one line each)."""
    d = job["data"]
    train = open_dataset(d["train"])
    _labels(train, "the training")
    if train.num_classes is None:
        raise JobError(f"{train.path}: the store has no num_classes (labels needed)")
    batch, n = int(d["batch_size"]), len(train)
    if batch % world_size:
        raise JobError(f"[data] batch_size {batch} does not split over {world_size} ranks "
                       f"(give a multiple of {world_size})")  # fmt: skip
    if batch > n:
        raise JobError(f"[data] batch_size {batch} is larger than the training store "
                       f"{train.path} ({n} samples): every step would repeat samples to fill "
                       f"the batch; give at most {n}")  # fmt: skip
    if d["test"]:
        test = open_dataset(d["test"])
        if test.shape[1:] != train.shape[1:]:
            raise JobError(f"{test.path}: array 'x' samples are {test.shape[1:]}, the training "
                           f"store's are {train.shape[1:]}")  # fmt: skip
        if test.dtype != train.dtype:
            _same_scale(train, test)
        _labels(test, "the test")
        bound = label_bound(test)
        if bound is not None and bound > train.num_classes:
            raise JobError(
                f"{test.path}: array 'y' has labels up to {bound - 1} ({bound} classes), "
                f"but the training store {train.path} has {train.num_classes} (the model's outputs)"
            )
    return train
