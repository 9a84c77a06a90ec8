"""How far the prefetch thread reads ahead: sized from the measured request latency and the
time a window of chunks lasts in training, within a memory bound.

A window (``shuffle_chunks`` chunks, the unit the loader shuffles within) is consumed in
``consume_s`` seconds (the training steps' pace) and its chunks are read in parallel in about
``read_s`` seconds (a request's latency plus transfer and decoding). Reading ``depth`` windows
ahead hides the reads when ``depth * consume_s`` covers ``read_s`` with a margin for jitter:
``depth = ceil(MARGIN * read_s / consume_s)``, at least 1 (the double buffering a local disk
needs), at most what ``DISTNET_READ_AHEAD_MB`` (default 256) of decoded windows allows.
"""

from __future__ import annotations

import math
import os
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
        self.depth_max_seen = self.depth

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

    def chunk_read(self, seconds: float) -> None:
        """A reader thread read one chunk in ``seconds``."""
        self.read_s = self._mean(self.read_s, seconds)

    def window_consumed(self, seconds: float) -> None:
        """The consumer took ``seconds`` for the window just finished; re-sizes ``depth``."""
        self.consume_s = self._mean(self.consume_s, seconds)
        if self.read_s is None:
            return
        # one window's chunks are read in parallel (FIFO: the oldest window gets the readers)
        window_read_s = math.ceil(self.window_chunks / self.workers) * self.read_s
        need = math.ceil(MARGIN * window_read_s / max(self.consume_s, 1e-6))
        self.depth = max(1, min(self.max_depth, need))
        self.depth_max_seen = max(self.depth_max_seen, self.depth)
