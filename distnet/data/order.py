"""The sample order of a sharded epoch, as pure functions of (seed, epoch, layout, ranks).

An epoch is a *stream*: the chunks in a permuted order (from seed and epoch), laid end to
end. Rank r of W takes one contiguous segment of the stream, of ``steps * b_r`` positions,
where ``b_r`` is its batch size and ``steps`` is the same for every rank (the stream padded
by wrapping around, or cut with ``drop_last``). So each rank reads only its own chunks (plus
at most one shared at each end of its segment), every rank yields the same number of
batches (an allreduce where one rank runs out hangs the others), and the segments together
cover the stream exactly once. Inside a segment, samples are shuffled within windows of
``shuffle_chunks`` chunks; a window's shuffle is keyed by its absolute stream position.

Resuming with another world size starts a new *phase*: the positions no rank had consumed
yet, in stream order, become the stream of the rest of the epoch, and the new ranks split
that. ``history`` records where each earlier phase ended and its batch sizes, so a loader
can rebuild the phase it is in from a few integers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


def rank_batch_sizes(
    local_batch_size: int, world_size: int, rank_weights: Sequence[float] | None = None
) -> list[int]:
    """Per-rank batch sizes summing to ``local_batch_size * world_size``, in proportion to
    weights (equal without them). See ``split_global_batch``."""
    if local_batch_size < 1 or world_size < 1:
        raise ValueError(
            f"local_batch_size and world_size must be >= 1, got {local_batch_size}, {world_size}"
        )
    if rank_weights is None:
        return [local_batch_size] * world_size
    return split_global_batch(local_batch_size * world_size, world_size, rank_weights)


def split_global_batch(
    global_batch_size: int, world_size: int, rank_weights: Sequence[float] | None = None
) -> list[int]:
    """Per-rank batch sizes summing to ``global_batch_size``, in proportion to weights.

    Without weights the split is equal and must be exact. With weights each rank gets at
    least one sample; the rest is split by largest remainder.
    """
    if world_size < 1 or global_batch_size < world_size:
        raise ValueError(
            f"global_batch_size {global_batch_size} cannot give each of {world_size} ranks "
            "at least one sample"
        )
    if rank_weights is None:
        if global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} does not split evenly over "
                f"{world_size} ranks (give rank_weights, or a multiple of {world_size})"
            )
        return [global_batch_size // world_size] * world_size
    w = np.asarray(rank_weights, dtype=np.float64)
    if w.shape != (world_size,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"rank_weights must be {world_size} positive numbers, got {rank_weights}")
    spare = global_batch_size - world_size
    raw = w / w.sum() * spare
    sizes = np.floor(raw).astype(np.int64)
    left = spare - int(sizes.sum())
    sizes[np.argsort(-(raw - sizes), kind="stable")[:left]] += 1
    return [int(s) + 1 for s in sizes]


def _rng(seed: int, epoch: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *keys])


@dataclass(frozen=True)
class Stream:
    """Positions 0..n-1 of one phase of an epoch, mapped to sample indices.

    Phase 0 is implicit (chunks in ``chunk_order`` laid end to end, so it costs O(chunks)
    memory whatever N is); later phases hold an explicit ``index`` array of sample ids.
    ``bounds`` are the shuffle-window edges: 0 = bounds[0] < ... < bounds[-1] = n.
    """

    n: int
    bounds: np.ndarray
    chunk_order: np.ndarray | None = None  # phase 0: permuted chunk ids
    chunk_starts: np.ndarray | None = None  # phase 0: stream position where each begins
    chunk_samples: int = 1
    index: np.ndarray | None = None  # later phases: sample id at each position

    def ids(self, pos: np.ndarray) -> np.ndarray:
        """Sample indices at stream positions ``pos`` (int64, same shape)."""
        if self.index is not None:
            return self.index[pos]
        j = np.searchsorted(self.chunk_starts, pos, side="right") - 1
        return self.chunk_order[j] * self.chunk_samples + (pos - self.chunk_starts[j])


def base_stream(
    num_samples: int,
    chunk_samples: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    shuffle_chunks: int,
) -> Stream:
    """Phase 0 of an epoch: chunks permuted from (seed, epoch) when ``shuffle``."""
    k = -(-num_samples // chunk_samples)
    order = _rng(seed, epoch).permutation(k) if shuffle else np.arange(k)
    sizes = np.full(k, chunk_samples, dtype=np.int64)
    if k:
        sizes[-1] = num_samples - (k - 1) * chunk_samples  # the short last chunk
    starts = np.concatenate([[0], np.cumsum(sizes[order])]).astype(np.int64)
    bounds = np.unique(np.concatenate([starts[:: max(1, shuffle_chunks)], [num_samples]]))
    return Stream(num_samples, bounds, order.astype(np.int64), starts[:-1], chunk_samples)


def explicit_stream(index: np.ndarray, window: int) -> Stream:
    """A later phase: sample ids ``index`` in order, shuffle windows of ``window`` positions."""
    n = len(index)
    bounds = np.unique(np.concatenate([np.arange(0, n, max(1, window)), [n]]))
    return Stream(n, bounds.astype(np.int64), index=np.asarray(index, dtype=np.int64))


def steps_per_epoch(n: int, global_batch: int, drop_last: bool) -> int:
    """Batches every rank yields for a stream of ``n`` positions."""
    return n // global_batch if drop_last else -(-n // global_batch)


def rank_segment(steps: int, batch_sizes: Sequence[int], rank: int) -> tuple[int, int]:
    """Padded stream positions [start, stop) of ``rank``: ``steps * batch_sizes[rank]`` long."""
    off = int(sum(batch_sizes[:rank]))
    return steps * off, steps * (off + int(batch_sizes[rank]))


def rank_pieces(
    stream: Stream, start: int, stop: int, seed: int, epoch: int, phase: int, shuffle: bool
) -> Iterator[np.ndarray]:
    """Stream positions (each < n) of padded segment [start, stop), one array per window piece.

    Positions >= n wrap around to the start of the stream (the padding). Each piece is
    shuffled with a generator keyed by its absolute start, so any rank computes any piece.
    """
    n, p = stream.n, start
    while p < stop and n:
        base, q = divmod(p, n)
        edge = stream.bounds[np.searchsorted(stream.bounds, q, side="right")]
        end = min(stop, base * n + int(edge))
        pos = np.arange(q, q + (end - p), dtype=np.int64)
        if shuffle:
            pos = _rng(seed, epoch, phase, p).permutation(pos)
        yield pos
        p = end


@dataclass(frozen=True)
class Phase:
    """The phase a loader is in: its stream, and how many global samples preceded it."""

    stream: Stream
    index: int
    seen_before: int


def current_phase(
    num_samples: int,
    chunk_samples: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    shuffle_chunks: int,
    drop_last: bool,
    history: Sequence[Sequence[int]],
) -> Phase:
    """Replays ``history`` ([[seen_at_phase_end, b_0, b_1, ...], ...]) to the current phase."""
    stream = base_stream(num_samples, chunk_samples, seed, epoch, shuffle, shuffle_chunks)
    seen_before = 0
    for i, (seen_end, *sizes) in enumerate(history):
        g = sum(sizes)
        steps = steps_per_epoch(stream.n, g, drop_last)
        done, rem = divmod(seen_end - seen_before, g)
        if rem or not 0 <= done <= steps:
            raise ValueError(f"resume history entry {i} is inconsistent: {list(history[i])}")
        left = []
        for r, b in enumerate(sizes):
            lo, hi = rank_segment(steps, sizes, r)
            pos = np.concatenate(
                [np.empty(0, np.int64), *rank_pieces(stream, lo, hi, seed, epoch, i, shuffle)]
            )
            # Skip what rank r consumed; keep real positions only (pad wraps are duplicates).
            real = pos[done * b :][np.arange(lo + done * b, hi) < stream.n]
            left.append(real)
        remaining = np.sort(np.concatenate([np.empty(0, np.int64), *left]))
        window = shuffle_chunks * chunk_samples
        stream = explicit_stream(stream.ids(remaining), window)
        seen_before = seen_end
    return Phase(stream, len(history), seen_before)
