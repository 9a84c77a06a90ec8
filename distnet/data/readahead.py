"""How far the prefetch thread reads ahead: sized from the measured request latency and the
time a window of chunks lasts in training, within a memory bound.

A window (``shuffle_chunks`` chunks, the unit the loader shuffles within) is consumed in
``consume_s`` seconds (the training steps' pace) and its chunks are read in parallel in about
``read_s`` seconds (a request's latency plus transfer and decoding). Reading ``depth`` windows
ahead hides the reads when ``depth * consume_s`` covers ``read_s`` with a margin for jitter:
``depth = ceil(MARGIN * read_s / consume_s)``, at least 1 (the double buffering a local disk
needs), at most what ``DISTNET_READ_AHEAD_MB`` (default 256) of decoded windows allows.

``read_s`` is a request's latency; the readers' chunk rate (chunks delivered per second while
any read is in flight) says how fast the store serves this rank. A store slower than its
latency alone suggests (a throttled or busy server, requests queued behind the connection
pool) takes ``window_chunks / rate`` per window, so the larger of the two estimates sizes
``depth``: the reads then never pause while a window is wanted.

One loader's successive prefetchers (epoch e, then e + 1 started while e ends) share what
was measured (``carry``): the next epoch's first windows are read ahead at the depth the
last one needed, during its last windows, instead of one window at a time while the
first steps of the new epoch wait.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any

MARGIN = 1.5  # request latency on a shared network varies: read ahead 1.5x what the mean needs
EMA = 0.3  # weight of the newest measurement


def read_ahead_bytes() -> int:
    """Memory the windows read ahead may take (decoded), per rank."""
    return int(float(os.environ.get("DISTNET_READ_AHEAD_MB", "256")) * 2**20)


class ReadAhead:
    """Read-ahead depth (windows) and reader threads for one prefetch thread.

    ``chunk_read(s)`` is called by reader threads after each chunk read, ``window_consumed(s)``
    by the prefetch thread after each window; ``depth`` then follows the two.
    """

    def __init__(self, window_chunks: int, window_bytes: int, remote: bool):
        from distnet.data.remote import max_requests  # noqa: PLC0415

        self.window_chunks = window_chunks
        self.max_depth = max(1, read_ahead_bytes() // max(1, window_bytes))
        # a local disk: a few readers (decoding is the work); object storage: as many requests
        # as may be open per rank, since each waits on the network most of its time
        self.workers = (
            min(max_requests(), window_chunks * min(self.max_depth, 4) + 1)
            if remote
            else min(4, window_chunks)
        )
        self.depth = 1  # grows once reads and consumption are measured
        self.read_s: float | None = None  # one chunk read, mean
        self.consume_s: float | None = None  # one window in training, mean
        self.rate: float | None = None  # chunks per second while reads are in flight, mean
        self.depth_max_seen = self.depth
        self._lock = threading.Lock()
        self._in_flight = 0
        self._busy_from = 0.0  # when the readers last went from idle to busy
        self._busy_s = 0.0  # busy time and chunks read since the last rate update
        self._chunks = 0

    def carry(self, prior: ReadAhead | None) -> None:
        """Starts from ``prior``'s measurements and depth (the same loader's last prefetcher)."""
        if prior is None or prior.read_s is None:
            return
        self.read_s, self.consume_s, self.rate = prior.read_s, prior.consume_s, prior.rate
        self.depth = max(1, min(self.max_depth, prior.depth))
        self.depth_max_seen = max(self.depth_max_seen, self.depth)

    @classmethod
    def for_store(cls, dataset: Any, window_chunks: int) -> ReadAhead:
        """The read-ahead for a prefetcher of ``dataset`` reading windows of that many chunks."""
        from distnet.data.remote import is_object_url  # noqa: PLC0415

        sample_bytes = math.prod(dataset.shape[1:]) * dataset.dtype.itemsize
        window_bytes = window_chunks * dataset.chunk_samples * sample_bytes
        return cls(window_chunks, window_bytes, is_object_url(dataset.path))

    @staticmethod
    def _mean(old: float | None, new: float) -> float:
        return new if old is None else (1 - EMA) * old + EMA * new

    def read_started(self) -> None:
        """A reader thread starts a chunk read."""
        with self._lock:
            if self._in_flight == 0:
                self._busy_from = time.perf_counter()
            self._in_flight += 1

    def chunk_read(self, seconds: float) -> None:
        """A reader thread read one chunk in ``seconds`` (after ``read_started``)."""
        with self._lock:
            self.read_s = self._mean(self.read_s, seconds)
            if self._in_flight == 0:  # not announced: no rate to learn from it
                return
            self._chunks += 1
            self._in_flight -= 1
            if self._in_flight == 0:
                self._busy_s += time.perf_counter() - self._busy_from

    def _update_rate(self) -> None:
        with self._lock:
            busy = self._busy_s
            if self._in_flight:
                now = time.perf_counter()
                busy, self._busy_from = busy + now - self._busy_from, now
            if self._chunks and busy > 0:
                self.rate = self._mean(self.rate, self._chunks / busy)
            self._busy_s, self._chunks = 0.0, 0

    def window_read_s(self) -> float:
        """Seconds to read one window: its chunks in parallel (latency), or at the rate
        the store delivered them, whichever is longer."""
        assert self.read_s is not None
        latency_bound = math.ceil(self.window_chunks / self.workers) * self.read_s
        rate_bound = self.window_chunks / self.rate if self.rate else 0.0
        return max(latency_bound, rate_bound)

    def window_consumed(self, seconds: float) -> None:
        """The consumer took ``seconds`` for the window just finished; re-sizes ``depth``."""
        self.consume_s = self._mean(self.consume_s, seconds)
        self._update_rate()
        if self.read_s is None:
            return
        # one window's chunks are read in parallel (FIFO: the oldest window gets the readers)
        need = math.ceil(MARGIN * self.window_read_s() / max(self.consume_s, 1e-6))
        self.depth = max(1, min(self.max_depth, need))
        self.depth_max_seen = max(self.depth_max_seen, self.depth)
