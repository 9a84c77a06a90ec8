"""StreamLoader: a rank's shard of a store, shuffled, prefetched by a background thread.

The order is the pure function in :mod:`distnet.data.order`; this module reads whole
chunks, gathers a window's shuffled samples, converts them to float32 batches and hands
them over through a bounded queue. Every wait has a timeout, and a failure in the thread
(a corrupt chunk, a transform that raises) reaches the consumer as an exception naming the
store, array and chunk, after which the thread has ended.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from distnet import backend
from distnet.data import order
from distnet.data.prefetch import Plan, Prefetcher
from distnet.data.readahead import ReadAhead
from distnet.data.store import Dataset, open_dataset


def _batch_sizes(
    local: int | None,
    global_: int | None,
    legacy: Any,
    world_size: int,
    rank_weights: Sequence[float] | None,
) -> list[int]:
    """Every rank's batch size from exactly one of local_batch_size / global_batch_size."""
    if legacy is not None:
        # refused, not mapped: a DeprecationWarning is hidden by default, and a user who
        # wrote batch_size=256 meaning the global batch would train silently on N x 256
        raise TypeError(
            "StreamLoader: batch_size= is gone (it was per rank, while job files and scripts "
            "mean the global batch); pass local_batch_size= (per rank) or "
            "global_batch_size= (summed over ranks)"
        )
    if (local is None) == (global_ is None):
        raise TypeError("StreamLoader: give exactly one of local_batch_size, global_batch_size")
    if global_ is not None:
        return order.split_global_batch(int(global_), world_size, rank_weights)
    return order.rank_batch_sizes(int(local), world_size, rank_weights)  # type: ignore[arg-type]


class StreamLoader:
    """Yields ``(x, y)`` batches of this rank's shard: x float32 (b, *sample_shape) on
    ``device``, y int64 (b,) labels, float32 targets, or None for a store without ``y``.

    Batch sizes (give one of the two; Horovod users know why the names matter):
    ``local_batch_size`` is per rank (the global batch is ``local_batch_size * world_size``);
    ``global_batch_size`` is the sum over all ranks, split equally (it must divide) or in
    proportion to ``rank_weights``. ``self.local_batch_size`` is this rank's share and
    ``self.global_batch_size`` the total. ``batch_size=`` is refused: it meant per rank here
    and global in job files. All ranks yield ``len(loader)`` batches.
    ``transform(x) -> x`` runs in the prefetch thread on the float32 numpy batch.
    ``timeout`` bounds every wait for a batch, in seconds. With ``prefetch_next_epoch``
    the thread for epoch e + 1 starts while epoch e ends (its order is known in advance), at
    the read-ahead depth epoch e needed, so a training loop does not stall at each epoch
    start; ``close()`` stops it.
    """

    def __init__(
        self,
        dataset: Dataset | str,
        local_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        shuffle_chunks: int = 4,
        prefetch: int = 2,
        device: str = "cpu",
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        rank_weights: Sequence[float] | None = None,
        check_finite: bool = False,
        timeout: float = 300.0,
        prefetch_next_epoch: bool = True,
        storage_options: dict[str, Any] | None = None,
        *,
        global_batch_size: int | None = None,
        batch_size: Any = None,
    ):
        self.dataset = (
            open_dataset(dataset, storage_options) if isinstance(dataset, str) else dataset
        )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if seed < 0 or shuffle_chunks < 1 or prefetch < 1 or timeout <= 0:
            raise ValueError("need seed >= 0, shuffle_chunks >= 1, prefetch >= 1, timeout > 0")
        self.rank, self.world_size = rank, world_size
        self.batch_sizes = _batch_sizes(
            local_batch_size, global_batch_size, batch_size, world_size, rank_weights
        )
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.shuffle_chunks, self.prefetch = shuffle_chunks, prefetch
        # 'cuda' is resolved here, in the caller's thread: the prefetch thread enters it
        self.device, self.transform = backend.resolve_device(device), transform
        self.check_finite, self.timeout = check_finite, timeout
        self.epoch = 0
        self.samples_seen = 0  # global samples consumed this epoch (all ranks, pad included)
        self._history: list[list[int]] = []
        self.prefetch_next_epoch = prefetch_next_epoch
        self._gen: weakref.ref[Iterator[Any]] | None = None
        self._spare: tuple[tuple[Any, ...], Prefetcher] | None = None
        self._read_ahead: ReadAhead | None = None  # the last prefetcher's, measured
        self._stats = {
            "batches": 0,
            "wait_s": 0.0,
            "wait_max_s": 0.0,
            "first_wait_s": 0.0,
            "elapsed_s": 0.0,
        }
        self._iter_start: float | None = None

    # ----- order and resume state -------------------------------------------------------

    def _phase(self) -> order.Phase:
        return order.current_phase(
            len(self.dataset),
            self.dataset.chunk_samples,
            self.seed,
            self.epoch,
            self.shuffle,
            self.shuffle_chunks,
            self.drop_last,
            self._history,
        )

    # every size derives from ``batch_sizes`` (one list, rank i's share at i): one source
    @property
    def local_batch_size(self) -> int:
        """This rank's samples per batch."""
        return self.batch_sizes[self.rank]

    @property
    def global_batch_size(self) -> int:
        """Samples per step summed over all ranks."""
        return sum(self.batch_sizes)

    global_batch = global_batch_size  # the older name

    @property
    def batch_size(self) -> int:
        """Old name of ``local_batch_size`` (read only: set ``batch_sizes`` to re-split)."""
        return self.local_batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if int(value) != self.local_batch_size:
            raise AttributeError(
                f"StreamLoader.batch_size is this rank's share of batch_sizes "
                f"{self.batch_sizes}; assign batch_sizes to change the split"
            )

    @property
    def batch_share(self) -> float:
        """This rank's fraction of every global batch (from ``rank_weights``; the last batch
        is padded to full size, so it holds for every step): what ``fit`` passes on to a
        distributed optimiser as the weight of this rank's gradient."""
        return self.local_batch_size / self.global_batch_size

    def __len__(self) -> int:
        """Batches this rank yields in a whole epoch (the same on every rank)."""
        return order.steps_per_epoch(len(self.dataset), self.global_batch, self.drop_last)

    def steps_remaining(self) -> int:
        """Batches the next iteration yields (fewer than ``len`` after a mid-epoch resume)."""
        ph = self._phase()
        steps = order.steps_per_epoch(ph.stream.n, self.global_batch, self.drop_last)
        return steps - (self.samples_seen - ph.seen_before) // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order to yield. The same epoch as now keeps the position
        (so a resumed job calling ``set_epoch`` continues mid-epoch), unless it was finished."""
        if epoch != self.epoch or self.steps_remaining() == 0:
            self.epoch, self.samples_seen, self._history = int(epoch), 0, []

    def state_dict(self) -> dict[str, Any]:
        """A few integers: where this epoch stands, identical on every rank."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            "world_size": self.world_size,
            "batch_sizes": list(self.batch_sizes),
            "history": [list(h) for h in self._history],
            # the order depends on these too; a resume under others would serve other samples
            "shuffle": self.shuffle,
            "shuffle_chunks": self.shuffle_chunks,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes at the next sample. With other batch sizes or world size, what is left of
        the epoch is re-partitioned among this loader's ranks."""
        for key in ("shuffle", "shuffle_chunks", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"StreamLoader.load_state_dict: the state was saved with {key}="
                    f"{state[key]!r}, this loader has {key}={getattr(self, key)!r}; the rest "
                    "of the epoch would not be the samples the saved run had left"
                )
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.samples_seen = int(state["samples_seen"])
        history = [list(map(int, h)) for h in state.get("history", [])]
        old = [
            int(b) for b in state.get("batch_sizes", [self.local_batch_size] * state["world_size"])
        ]
        if len(old) != int(state["world_size"]):
            raise ValueError(f"state has world_size {state['world_size']} but batch_sizes {old}")
        seen_before = history[-1][0] if history else 0
        if old != self.batch_sizes and self.samples_seen > seen_before:
            history.append([self.samples_seen, *old])  # a new phase starts here
        self._history = history
        ph = self._phase()  # validates the history
        steps = order.steps_per_epoch(ph.stream.n, self.global_batch, self.drop_last)
        done, rem = divmod(self.samples_seen - ph.seen_before, self.global_batch)
        if rem or done > steps:
            raise ValueError(
                f"samples_seen {self.samples_seen} does not fit this epoch's "
                f"batches of {self.global_batch}"
            )

    # ----- iteration ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        self._close_iteration()  # one live iteration per loader: a new one ends the old
        if self.steps_remaining() == 0 and self.samples_seen > 0:
            self.set_epoch(self.epoch + 1)  # a finished epoch rolls on to the next one
        gen = self._iterate()
        # A weak reference: a `for` loop left by `break` drops the generator, which closes
        # it at once and so stops its thread (a strong one would make a cycle with self).
        self._gen = weakref.ref(gen)
        return gen

    def _close_iteration(self) -> None:
        gen = None if self._gen is None else self._gen()
        if gen is not None:
            gen.close()  # runs _iterate's finally: stop, drain, join
        self._gen = None

    def _key(self, epoch: int, samples_seen: int, history: list[list[int]]) -> tuple[Any, ...]:
        # everything the order depends on: a spare prefetch made under other settings (a
        # load_state_dict with another seed, say) must not be served
        settings = (self.seed, self.shuffle, self.shuffle_chunks, self.drop_last,
                    tuple(self.batch_sizes), self.rank, self.world_size)  # fmt: skip
        return (epoch, samples_seen, tuple(map(tuple, history)), settings)

    def _prefetcher(self, epoch: int, ph: order.Phase, steps: int, done: int) -> Prefetcher:
        plan = Plan(
            ph,
            steps,
            done,
            self.rank,
            self.batch_sizes,
            self.seed,
            epoch,
            self.shuffle,
            self.shuffle_chunks,
        )
        return Prefetcher(
            self.dataset, plan, self.prefetch, self.transform, self.device, self.check_finite,
            read_ahead_from=self._read_ahead,
        )  # fmt: skip

    def _iterate(self) -> Iterator[tuple[Any, Any]]:
        ph = self._phase()
        steps = order.steps_per_epoch(ph.stream.n, self.global_batch, self.drop_last)
        done = (self.samples_seen - ph.seen_before) // self.global_batch
        if done >= steps:
            return
        key = self._key(self.epoch, self.samples_seen, self._history)
        spare, self._spare = self._spare, None
        if spare is not None and spare[0] == key:
            producer = spare[1]  # started while the last epoch ended: no stall at the start
        else:
            if spare is not None:
                spare[1].close(self.timeout)
            producer = self._prefetcher(self.epoch, ph, steps, done)
        self._iter_start = time.perf_counter()
        spare_started = False
        try:
            for i in range(done, steps):
                t0 = time.perf_counter()
                item = producer.get(self.timeout)
                wait = time.perf_counter() - t0
                s = self._stats
                if s["batches"] == 0:
                    s["first_wait_s"] = wait
                s["batches"] += 1
                s["wait_s"] += wait
                s["wait_max_s"] = max(s["wait_max_s"], wait)
                self.samples_seen += self.global_batch
                # the next epoch's first reads start once this epoch's last ones are asked for,
                # or the windows read ahead and one more before its end (whichever is first),
                # so that on a slow network they are over before its first batch is wanted
                if (self.prefetch_next_epoch and not spare_started
                        and (i == steps - 1 or producer.reads_done.is_set()
                             or steps - 1 - i <= self._spare_lead(producer))):  # fmt: skip
                    self._read_ahead = getattr(producer, "read_ahead", self._read_ahead)
                    self._start_spare()
                    spare_started = True
                yield item
        finally:
            producer.close(self.timeout)
            ahead = getattr(producer, "read_ahead", None)
            if ahead is not None:  # how far the reads ran ahead, for bench and stats
                self._read_ahead = ahead  # the next prefetcher starts from its measurements
                s = self._stats
                s["read_ahead_depth"] = max(s.get("read_ahead_depth", 0), ahead.depth_max_seen)
                s["chunk_read_s"] = ahead.read_s or 0.0
            self._stats["elapsed_s"] += time.perf_counter() - self._iter_start
            self._iter_start = None

    def _spare_lead(self, producer: Prefetcher) -> int:
        """Batches before the end of the epoch at which the next epoch's prefetch starts:
        those of the windows read ahead and one more, so that its first window is read while
        the server has time to spare, not only while this epoch's last reads are running."""
        ahead = getattr(producer, "read_ahead", None)
        if ahead is None:
            return 0
        window = self.shuffle_chunks * self.dataset.chunk_samples
        return -(-(ahead.depth + 1) * window // self.local_batch_size)

    def _start_spare(self) -> None:
        # Guess that the next iteration is the next epoch from its start (what both
        # set_epoch(e + 1) and a plain re-iteration do); if it is not, the guess is dropped.
        nxt = self.epoch + 1
        ph = order.current_phase(
            len(self.dataset),
            self.dataset.chunk_samples,
            self.seed,
            nxt,
            self.shuffle,
            self.shuffle_chunks,
            self.drop_last,
            [],
        )
        steps = order.steps_per_epoch(ph.stream.n, self.global_batch, self.drop_last)
        if steps:
            self._spare = (self._key(nxt, 0, []), self._prefetcher(nxt, ph, steps, 0))

    def close(self) -> None:
        """Stops the prefetch threads (a running iteration's and a next-epoch one)."""
        self._close_iteration()
        if self._spare is not None:
            self._spare[1].close(self.timeout)
            self._spare = None

    def __enter__(self) -> StreamLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ----- stall accounting -----------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """How long the consumer waited for batches: totals since creation or ``reset_stats``.

        ``wait_fraction`` is wait / elapsed iteration time; ``steady_wait_fraction`` leaves
        out the first batch of the run (thread start and first chunk reads).
        """
        s = dict(self._stats)
        if self._iter_start is not None:
            s["elapsed_s"] += time.perf_counter() - self._iter_start
        el = s["elapsed_s"]
        s["wait_fraction"] = s["wait_s"] / el if el > 0 else 0.0
        steady = s["wait_s"] - s["first_wait_s"]
        s["steady_wait_fraction"] = (
            steady / (el - s["first_wait_s"]) if el > s["first_wait_s"] else 0.0
        )
        s["wait_mean_s"] = s["wait_s"] / s["batches"] if s["batches"] else 0.0
        return s

    def reset_stats(self) -> None:
        """Zeroes the wait counters (e.g. after a warm-up)."""
        self._stats = {k: type(v)(0) for k, v in self._stats.items()}
        if self._iter_start is not None:
            self._iter_start = time.perf_counter()
