"""The batches of one epoch for ``fit``: from arrays (shuffled, and sharded over ranks when the
optimiser is distributed) or from a loader, each with this rank's share of the global batch.

Arrays under a distributed optimiser: every rank draws the same permutation from
(seed, epoch), cuts it into global batches of ``batch_size`` and takes its own contiguous part
of each one (sizes differ by at most one sample), so the ranks see disjoint parts of the data
set, the same number of batches, and together every sample once per epoch. A rank's share of
a step is its sample count over the global batch's: the weighted average of the ranks'
gradients is then the gradient of the global batch. A rank whose part of a short last batch is
empty still takes part in the reduction, with share 0.

Loaders shard themselves; their ``batch_share`` (``StreamLoader``: this rank's batch size over
the global batch, from ``rank_weights``) is the one source of each rank's share.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from distnet import backend

Batch = tuple[Any, Any, float | None]  # (x, y, this rank's share of the global batch or None)


def epoch_batches(
    x: Any,
    y: Any,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    size: int = 1,
) -> tuple[Iterator[Batch], int]:
    """(x, y, share) batches of one epoch and how many there are (-1: unknown).

    Args:
        x: inputs (N, ...) or a loader of (x, y) batches; y: targets (N, ...) or None.
        batch_size: the global batch (all ranks together) for arrays.
        rank, size: this rank and the number of ranks sharing the arrays (1: not sharded).
    The order depends on (seed, epoch) only, so a run resumed at an epoch boundary sees the
    same batches. Shares are None when training is not distributed.
    """
    if not hasattr(x, "shape"):  # a loader
        if y is not None:
            raise TypeError("fit: with a loader for x, y must be None (the loader yields it)")
        if hasattr(x, "set_epoch"):
            x.set_epoch(epoch)
        n_batches = len(x) if hasattr(x, "__len__") else -1
        share = getattr(x, "batch_share", None) if size > 1 else None
        return ((xb, yb, share) for xb, yb in x), n_batches
    n = len(x)
    if y is not None and len(y) != n:
        raise ValueError(f"fit: x has {n} samples but y has {len(y)}")
    if batch_size < 1:
        raise ValueError(f"fit: batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    starts = range(0, n, batch_size)

    def gen() -> Iterator[Batch]:
        for s in starts:
            idx = order[s : s + batch_size]
            share = None
            if size > 1:
                global_n = len(idx)
                idx = np.array_split(idx, size)[rank]
                share = len(idx) / global_n
            if backend.is_gpu_array(x):
                idx = backend.to_device(idx, backend.device_of(x))
            yield x[idx], (None if y is None else y[idx]), share

    return gen(), len(starts)
