"""The loader's read-ahead depth follows the measured read time, chunk rate and step pace,
within its memory bound (``distnet.data.readahead``), and carries over from one epoch to the
next: the next epoch's first windows are read during the last one's end, and its batches are
exactly those of a loader that reads nothing ahead."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from helpers.data import labelled_store

from distnet.data import StreamLoader, open_dataset, readahead
from distnet.data.readahead import ReadAhead

pytestmark = pytest.mark.timeout(120)


def test_depth_covers_the_read_time_with_a_margin(monkeypatch):
    monkeypatch.setenv("DISTNET_OBJECT_REQUESTS", "16")
    ahead = ReadAhead(window_chunks=5, window_bytes=10 * 2**20, remote=True)
    assert ahead.depth == 1 and ahead.workers == 16
    ahead.chunk_read(0.05)  # 50 ms a chunk, all 5 in parallel
    ahead.window_consumed(1.0)  # a window lasts 1 s of training: one ahead is plenty
    assert ahead.depth == 1
    for _ in range(20):  # a slow network: a chunk takes 2.5 s, a window lasts 0.5 s
        ahead.chunk_read(2.5)
        ahead.window_consumed(0.5)
    assert ahead.depth == 8  # ceil(1.5 * 2.5 / 0.5)
    assert ahead.depth_max_seen >= ahead.depth


def test_memory_bounds_the_depth(monkeypatch):
    monkeypatch.setenv("DISTNET_READ_AHEAD_MB", "40")
    ahead = ReadAhead(window_chunks=5, window_bytes=10 * 2**20, remote=True)
    assert ahead.max_depth == 4
    for _ in range(10):
        ahead.chunk_read(10.0)
        ahead.window_consumed(0.1)
    assert ahead.depth == 4


def test_a_local_store_keeps_few_readers():
    ahead = ReadAhead(window_chunks=5, window_bytes=2**20, remote=False)
    assert ahead.workers == 4 and ahead.depth == 1


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_knobs_are_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("DISTNET_OBJECT_REQUESTS", value)
    with pytest.raises(ValueError, match="DISTNET_OBJECT_REQUESTS"):
        ReadAhead(window_chunks=5, window_bytes=2**20, remote=True)


def _clocked(monkeypatch) -> list[float]:
    """The read-ahead's clock, set by the test: ``now[0]`` seconds."""
    now = [0.0]
    monkeypatch.setattr(readahead, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def test_a_store_slower_than_its_latency_sizes_the_depth_by_its_chunk_rate(monkeypatch):
    monkeypatch.setenv("DISTNET_OBJECT_REQUESTS", "16")
    now = _clocked(monkeypatch)
    ahead = ReadAhead(window_chunks=5, window_bytes=2**20, remote=True)
    for _ in range(10):  # 5 chunks one after another, 0.5 s each: 2 chunks/s
        for _ in range(5):
            ahead.read_started()
            now[0] += 0.5
            ahead.chunk_read(0.1)  # each request alone answers in 0.1 s (a queue in front)
        ahead.window_consumed(1.0)
    assert ahead.rate == pytest.approx(2.0)
    assert ahead.window_read_s() == pytest.approx(2.5)  # not the 0.1 s latency alone
    assert ahead.depth == 4  # ceil(1.5 * 2.5 / 1.0)


def test_the_next_prefetcher_starts_at_the_measured_depth():
    first = ReadAhead(window_chunks=5, window_bytes=2**20, remote=False)
    first.carry(None)
    assert first.depth == 1
    for _ in range(5):
        first.read_started()
        first.chunk_read(0.4)
        first.window_consumed(0.1)
    second = ReadAhead(window_chunks=5, window_bytes=2**20, remote=False)
    second.carry(first)
    assert second.depth == first.depth > 1 and second.read_s == first.read_s


# ----- the epoch-boundary prefetch of StreamLoader: the same batches, every sample once -----

N, CHUNK, BATCH = 600, 32, 16  # 19 chunks; 300 samples a rank
MB_FOR_3_WINDOWS = "0.0009"  # a window: 3 chunks of 32 samples of 3 bytes (943 // 288 = 3)


def _slow(path, delay_s: float):
    """The store at ``path`` whose chunk reads take ``delay_s`` more: reads are slower than
    the steps, so the read-ahead grows past one window."""
    ds = open_dataset(str(path))
    read = ds.read_chunk

    def slow_read(*args, **kwargs):
        time.sleep(delay_s)
        return read(*args, **kwargs)

    ds.read_chunk = slow_read
    return ds


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("boundary") / "s"
    labelled_store(path, n=N, chunk=CHUNK)
    return path


def _batches(loader) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.copy(), y.copy()) for x, y in loader]


@pytest.mark.parametrize("world", [1, 2])
def test_epochs_read_ahead_across_their_boundary_give_the_same_batches(store, world, monkeypatch):
    monkeypatch.setenv("DISTNET_READ_AHEAD_MB", MB_FOR_3_WINDOWS)
    epochs = 3
    ahead = [StreamLoader(_slow(store, 0.01), BATCH, rank=r, world_size=world, seed=4,
                          shuffle_chunks=2) for r in range(world)]  # fmt: skip
    got = [[_batches(lo) for _ in range(epochs)] for lo in ahead]  # rolls on epoch by epoch
    for lo in ahead:
        assert lo.stats()["read_ahead_depth"] > 1, "the reads ran more than a window ahead"
        lo.close()
    for epoch in range(epochs):
        ids = []
        for r in range(world):
            plain = StreamLoader(store.as_posix(), BATCH, rank=r, world_size=world, seed=4,
                                 shuffle_chunks=2, prefetch_next_epoch=False)  # fmt: skip
            plain.set_epoch(epoch)
            want = _batches(plain)
            assert len(got[r][epoch]) == len(want)
            for (gx, gy), (wx, wy) in zip(got[r][epoch], want, strict=True):
                np.testing.assert_array_equal(gy, wy)
                np.testing.assert_array_equal(gx, wx)
            ids.append(np.concatenate([y for _, y in want]))
        counts = np.bincount(np.concatenate(ids), minlength=N)
        pad = -N % (BATCH * world)  # the last global batch is filled up with repeats
        assert counts.min() == 1 and counts.sum() == N + pad, epoch  # every sample once


def test_the_next_epoch_is_read_ahead_at_the_depth_the_last_one_needed(store, monkeypatch):
    monkeypatch.setenv("DISTNET_READ_AHEAD_MB", MB_FOR_3_WINDOWS)
    lo = StreamLoader(_slow(store, 0.01), BATCH, seed=1, shuffle_chunks=2)
    first = _batches(lo)
    depth = lo._read_ahead.depth  # what epoch 0 ended with: reads are slower than the steps
    assert depth == 3
    spare = lo._spare[1]  # started while epoch 0 ended
    deadline = time.monotonic() + 30
    while getattr(spare, "read_ahead", None) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert spare.read_ahead.depth == depth, "the next epoch starts at the measured depth"
    second = _batches(lo)
    assert np.bincount(np.concatenate([y for _, y in second])).min() == 1
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, second, strict=False))
    lo.close()
