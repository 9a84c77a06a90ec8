"""The loader's read-ahead depth follows the measured read time and step pace, within its
memory bound (``distnet.data.readahead``)."""

from __future__ import annotations

import pytest

from distnet.data.readahead import ReadAhead


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
