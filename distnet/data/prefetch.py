"""The prefetch thread behind StreamLoader: reads whole chunks, gathers, converts, queues.

A :class:`Prefetcher` produces one rank's batches for what is left of one epoch phase.
It holds no reference to the loader, so a loader that is dropped can still be collected
(and its ``__del__`` stops the thread). Every blocking call polls a stop flag; the
consumer's waits have a deadline; any exception in the thread is handed to the consumer,
after which the thread ends.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from typing import Any

import numpy as np

from distnet import trace
from distnet.data import order
from distnet.data.readahead import ReadAhead
from distnet.data.store import Dataset, DatasetError

POLL_S = 0.05  # how often blocked puts/gets look at the stop flag and the thread


@dataclass(frozen=True)
class Plan:
    """What a Prefetcher produces: rank ``rank``'s batches ``done..steps-1`` of a phase."""

    phase: order.Phase
    steps: int
    done: int
    rank: int
    batch_sizes: Sequence[int]
    seed: int
    epoch: int
    shuffle: bool
    shuffle_chunks: int


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher:
    """A thread filling a queue of ``prefetch`` batches ``(x float32, y)`` for ``plan``."""

    def __init__(
        self,
        dataset: Dataset,
        plan: Plan,
        prefetch: int,
        transform: Callable[[np.ndarray], np.ndarray] | None,
        device: str,
        check_finite: bool,
        read_ahead_from: ReadAhead | None = None,
    ):
        self.dataset, self.plan = dataset, plan
        self.read_ahead_from = read_ahead_from  # the last prefetcher's measurements
        self.transform, self.device, self.check_finite = transform, device, check_finite
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.reads_done = threading.Event()  # every chunk read of the plan submitted
        self._chunk_now = -1
        self.thread = threading.Thread(
            target=self._run, name=f"StreamLoader-rank{plan.rank}", daemon=True
        )
        self.thread.start()

    def get(self, timeout: float) -> tuple[Any, Any]:
        """The next batch; raises the thread's error, or TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.queue.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError(
                        f"{self.dataset.path}: prefetch thread of rank {self.plan.rank} "
                        "ended without a batch"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.dataset.path}: no batch from the prefetch thread of rank "
                        f"{self.plan.rank} in {timeout} s (near chunk {self._chunk_now})"
                    ) from None
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def close(self, timeout: float) -> None:
        """Stops the thread and waits (at most ``timeout`` s) for it to end."""
        self.stop.set()
        while True:  # unblock a producer stuck on a full queue
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=timeout)

    # ----- inside the thread ----------------------------------------------------------------

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def _run(self) -> None:
        from distnet.backend import device_context  # noqa: PLC0415

        try:
            # cupy's current device is per thread and 0 in a new one: without entering the
            # loader's device, every rank's copies (and their memory pool) land on GPU 0
            with device_context(self.device):
                self._produce()
        except DatasetError as exc:
            self._put(_Failure(exc))
        except BaseException as exc:  # noqa: BLE001  (anything must reach the consumer)
            err = RuntimeError(
                f"{self.dataset.path}: prefetch failed near chunk {self._chunk_now} "
                f"(rank {self.plan.rank}): {type(exc).__name__}: {exc}"
            )
            err.__cause__ = exc
            self._put(_Failure(err))

    def _produce(self) -> None:
        for xb, yb in self._raw_batches():
            with trace.span("prepare_batch"):  # a row of its own in the trace
                item = self._finish(xb, yb)
            if not self._put(item):
                return

    def _ids(self) -> Iterator[np.ndarray]:
        """Sample ids of this rank's remaining window pieces, after the batches done."""
        p = self.plan
        lo, hi = order.rank_segment(p.steps, p.batch_sizes, p.rank)
        skip = p.done * p.batch_sizes[p.rank]
        for pos in order.rank_pieces(
            p.phase.stream, lo, hi, p.seed, p.epoch, p.phase.index, p.shuffle
        ):
            if skip >= len(pos):
                skip -= len(pos)
                continue
            pos, skip = pos[skip:], 0
            yield p.phase.stream.ids(pos)

    def _raw_batches(self) -> Iterator[tuple[np.ndarray, Any]]:
        """Batches in the stored dtype. A small pool reads the next windows' chunks while this
        window's batches are gathered (zarr decodes outside the GIL), so reads overlap work.
        How many windows are read ahead follows :class:`ReadAhead` (request latency against
        the time a window lasts)."""
        b, c = self.plan.batch_sizes[self.plan.rank], self.dataset.chunk_samples
        window_chunks = self.plan.shuffle_chunks + 1  # a window may straddle one more chunk
        self.read_ahead = ahead = ReadAhead.for_store(self.dataset, window_chunks)
        carried = self.read_ahead_from is not None and self.read_ahead_from.read_s is not None
        ahead.carry(self.read_ahead_from)  # at the depth the last epoch needed, from the start
        pool = ThreadPoolExecutor(
            max_workers=ahead.workers, thread_name_prefix=f"StreamLoader-read{self.plan.rank}"
        )
        free: list[np.ndarray] = []  # buffers of windows already consumed

        def timed_read(k: int, view: np.ndarray) -> tuple[np.ndarray, Any]:
            ahead.read_started()
            t = time.perf_counter()
            out = self.dataset.read_chunk(k, self.check_finite, view)
            ahead.chunk_read(time.perf_counter() - t)
            return out

        def submit(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Any]]:
            # The window's chunks are decoded straight into one buffer (a free one, or a new
            # one while fewer than read-ahead + 1 exist), laid end to end in chunk order.
            keys = np.unique(ids // c).tolist()
            sizes = [min(c, len(self.dataset) - k * c) for k in keys]
            buf = free.pop() if free else None
            if buf is None or len(buf) < sum(sizes):
                shape = (max(sum(sizes), window_chunks * c), *self.dataset.shape[1:])
                buf = np.empty(shape, self.dataset.dtype)
            start, reads = 0, []
            for k, n in zip(keys, sizes, strict=True):
                view = buf[start : start + n]
                reads.append((k, view, pool.submit(timed_read, k, view)))
                start += n
            return ids, buf, reads

        try:
            it = self._ids()
            pending: collections.deque[Any] = collections.deque()

            def top_up(limit: int | None = None) -> None:
                while len(pending) < (ahead.depth if limit is None else limit):
                    ids = next(it, None)
                    if ids is None:  # every read of the phase is asked for: the next
                        self.reads_done.set()  # epoch's may start (they queue behind ours)
                        return
                    pending.append(submit(ids))

            # Started while the last epoch ends, the first window is read alone: on a server
            # short of throughput, more reads at once would delay the one wanted first.
            first_alone = carried
            top_up(1 if first_alone else None)
            left_x: np.ndarray | None = None
            left_y: Any = None
            while pending and not self.stop.is_set():
                ids, buf, reads = pending.popleft()
                if not first_alone:
                    top_up()  # read ahead: the next windows
                window = self._window(ids, buf, reads)
                if window is None:
                    return
                if first_alone:  # now the rest of the depth the last epoch needed
                    first_alone = False
                    top_up()
                ready = time.perf_counter()
                wx, wy, local = window
                start = 0
                if left_x is not None:  # a batch straddling two windows
                    take = b - len(left_x)
                    xb = np.concatenate([left_x, wx[local[:take]]])
                    yb = None if wy is None else np.concatenate([left_y, wy[local[:take]]])
                    if len(xb) < b:
                        left_x, left_y = xb, yb
                        free.append(buf)
                        continue
                    yield xb, yb
                    start, left_x, left_y = take, None, None
                while start + b <= len(local):
                    sel = local[start : start + b]
                    yield wx[sel], None if wy is None else wy[sel]
                    start += b
                if start < len(local):
                    sel = local[start:]
                    left_x, left_y = wx[sel], None if wy is None else wy[sel]
                free.append(buf)  # every batch above is a copy (fancy indexing)
                if carried:  # a prefetcher started early waited for its epoch to begin:
                    carried = False  # not a measure of the training steps' pace
                else:
                    ahead.window_consumed(time.perf_counter() - ready)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _window(
        self, ids: np.ndarray, wx: np.ndarray, reads: list[Any]
    ) -> tuple[Any, Any, np.ndarray] | None:
        """The window's chunks (decoded end to end into one buffer) and where ``ids`` lie."""
        c = self.dataset.chunk_samples
        ys = []
        wx = wx[: sum(len(v) for _, v, _ in reads)]
        for k, _, fut in reads:
            self._chunk_now = k
            while True:  # poll, so that a stop request is seen during a slow read
                try:
                    ys.append(fut.result(timeout=POLL_S)[1])
                    break
                except FuturesTimeout:
                    if self.stop.is_set():
                        return None
        keys = [k for k, _, _ in reads]
        offsets = np.zeros(len(reads) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(v) for _, v, _ in reads])
        cid = ids // c
        local = offsets[np.searchsorted(keys, cid)] + (ids - cid * c)
        wy = None if ys[0] is None else (ys[0] if len(ys) == 1 else np.concatenate(ys))
        return wx, wy, local

    def _finish(self, x: np.ndarray, y: Any) -> tuple[Any, Any]:
        ds = self.dataset
        out = np.empty(x.shape, dtype=np.float32)
        np.multiply(x, np.float32(ds.scale), out=out)  # one pass: cast and scale together
        if ds.offset != 0.0:
            out += np.float32(ds.offset)
        if self.transform is not None:
            out = self.transform(out)
        if y is not None and y.dtype.kind == "i":
            y = y.astype(np.int64, copy=False)
        if self.device != "cpu":
            from distnet.backend import to_device  # noqa: PLC0415

            out = to_device(out, self.device)
            y = None if y is None else to_device(y, self.device)
        return out, y
