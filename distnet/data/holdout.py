"""A validation split held out of a training store: its last samples.

``hold_out(ds, fraction)`` gives a view of ``ds`` that ends before its last
``round(fraction * len(ds))`` samples (what the loader trains on) and the range of the held-out
ones (what validation reads). The split depends on the store alone, so it is the same on
every rank, on every engine and in every resumed run, and no held-out sample is ever in a
training batch. The converters write samples in a shuffled order (``convert.stratified_split``
permutes each split), so the tail of a store is a fair sample of it.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from distnet.data.store import Dataset


class TrainingPart(Dataset):
    """The first ``n`` samples of a store, as a ``Dataset`` (a view: nothing is copied).

    Chunks keep the store's boundaries; the chunk holding sample ``n`` is read whole and cut.
    """

    def __init__(self, ds: Dataset, n: int):  # noqa: D107  (no Dataset.__init__: a view)
        if not 0 < n <= len(ds):
            raise ValueError(f"{ds.path}: a training part of {n} samples of {len(ds)}")
        self.__dict__.update(copy.copy(ds.__dict__))
        self.whole, self.n = ds, int(n)
        self.num_chunks = -(-self.n // self.chunk_samples)

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, ...]:
        """(n, *sample_shape)."""
        return (self.n, *self.whole.shape[1:])

    def read_chunk(
        self, i: int, check_finite: bool = False, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Chunk ``i`` of the view: x (n_i, *sample_shape), y (n_i, ...) or None."""
        if not 0 <= i < self.num_chunks:
            raise IndexError(f"{self.path}: chunk {i} out of range 0..{self.num_chunks - 1}")
        start, stop = self.chunk_bounds(i)
        if stop - start == min(self.chunk_samples, len(self.whole) - start):
            return self.whole.read_chunk(i, check_finite, out)
        x, y = self.whole.read_chunk(i, check_finite)  # the chunk the split cuts
        x, y = x[: stop - start], (None if y is None else y[: stop - start])
        if out is not None:
            out[...] = x
            x = out
        return x, y


def held_out_count(n: int, fraction: float) -> int:
    """How many of ``n`` samples ``fraction`` holds out (at least 1 for fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction {fraction} is not in [0, 1)")
    return 0 if fraction == 0 else max(1, round(fraction * n))


def hold_out(ds: Dataset, fraction: float) -> tuple[Dataset, range]:
    """(the training part of ``ds``, the sample indices held out for validation)."""
    v = held_out_count(len(ds), fraction)
    if v == 0:
        return ds, range(len(ds), len(ds))
    if v >= len(ds):
        raise ValueError(f"{ds.path}: holding out {v} of {len(ds)} samples leaves none to train")
    return TrainingPart(ds, len(ds) - v), range(len(ds) - v, len(ds))


def read_range(ds: Dataset, samples: range) -> tuple[np.ndarray, Any]:
    """x (len(samples), *sample_shape) as float32 and y of a contiguous range of ``ds``."""
    if not len(samples):
        return np.zeros((0, *ds.shape[1:]), np.float32), None
    first, last = samples[0] // ds.chunk_samples, (samples[-1]) // ds.chunk_samples
    xs, ys = zip(*(ds.read_chunk(i) for i in range(first, last + 1)), strict=True)
    skip = samples[0] - first * ds.chunk_samples
    x = np.concatenate(xs)[skip : skip + len(samples)]
    y = None if ys[0] is None else np.concatenate(ys)[skip : skip + len(samples)]
    return ds.to_float(x), y
