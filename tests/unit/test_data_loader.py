"""StreamLoader: rank partition, determinism, resume, re-partition, weights, shutdown, errors.

Stores here have y = sample index, so every batch says exactly which samples it holds.
Ranks are simulated in-process: one loader per rank.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from helpers.data import chunk_file, labelled_store

from distnet.backend import gpu_skip_reason
from distnet.data import DatasetError, StreamLoader, open_dataset
from distnet.data import order as order_mod

pytestmark = pytest.mark.timeout(60)
N, CHUNK = 1000, 64  # 16 chunks, the last one 40 samples long


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return labelled_store(tmp_path_factory.mktemp("loader") / "s", n=N, chunk=CHUNK)


def ids_of(loader) -> list[np.ndarray]:
    return [y.copy() for _, y in loader]


def run_ranks(ds, world, batch=32, **kw) -> list[list[np.ndarray]]:
    return [ids_of(StreamLoader(ds, batch, rank=r, world_size=world, **kw)) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_partition_covers_epoch_once(ds, world, drop_last):
    per_rank = run_ranks(ds, world, seed=3, drop_last=drop_last)
    steps = {len(b) for b in per_rank}
    assert len(steps) == 1, f"ranks yield different numbers of batches: {steps}"
    (steps,) = steps
    assert steps == len(StreamLoader(ds, 32, rank=0, world_size=world, drop_last=drop_last))
    assert all(len(b) == 32 for batches in per_rank for b in batches)
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    counts = np.bincount(seen, minlength=N)
    total = steps * 32 * world
    if drop_last:
        assert total <= N and counts.max() == 1 and counts.sum() == total
        assert total > N - 32 * world  # drops less than one global batch
    else:
        assert total >= N and counts.min() == 1  # every sample, and pads are wrap-arounds
        assert counts.sum() - N == total - N < 32 * world


def test_values_are_scaled_float32_and_match_labels(ds):
    raw = np.concatenate([c[0] for c in ds.iter_chunks()])
    for x, y in StreamLoader(ds, 50, seed=1):
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (50, 3)
        np.testing.assert_allclose(x, raw[y] / 255.0, rtol=1e-6)


def expected_ids(n, chunk, batch_sizes, rank, seed, epoch, shuffle=True, shuffle_chunks=4):
    """The order from the pure functions in distnet.data.order, written out by hand."""
    stream = order_mod.base_stream(n, chunk, seed, epoch, shuffle, shuffle_chunks)
    steps = -(-n // sum(batch_sizes))
    lo, hi = order_mod.rank_segment(steps, batch_sizes, rank)
    pos = np.concatenate(list(order_mod.rank_pieces(stream, lo, hi, seed, epoch, 0, shuffle)))
    return stream.ids(pos)


@pytest.mark.parametrize("world", [1, 3])
def test_order_is_the_pure_function(ds, world):
    for r in range(world):
        got = np.concatenate(ids_of(StreamLoader(ds, 16, rank=r, world_size=world, seed=7)))
        want = expected_ids(N, CHUNK, [16] * world, r, seed=7, epoch=0)
        np.testing.assert_array_equal(got, want)


def test_deterministic_and_seed_and_epoch_dependent(ds):
    a = np.concatenate(ids_of(StreamLoader(ds, 32, seed=5)))
    b = np.concatenate(ids_of(StreamLoader(ds, 32, seed=5)))
    c = np.concatenate(ids_of(StreamLoader(ds, 32, seed=6)))
    e1 = StreamLoader(ds, 32, seed=5)
    e1.set_epoch(1)
    d = np.concatenate(ids_of(e1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert not np.array_equal(np.sort(a[:N]), a[:N])  # actually shuffled


def test_no_shuffle_is_stored_order(ds):
    got = np.concatenate(ids_of(StreamLoader(ds, 100, shuffle=False)))
    np.testing.assert_array_equal(got, np.arange(N))


def test_each_rank_reads_only_its_chunks(ds, monkeypatch):
    reads: dict[int, list[int]] = {}
    real = type(ds).read_chunk

    def counting(self, i, *args):
        reads.setdefault(
            threading.current_thread().name.split("read")[-1].split("_")[0], []
        ).append(i)
        return real(self, i, *args)

    monkeypatch.setattr(type(ds), "read_chunk", counting)
    run_ranks(ds, 4, batch=25, seed=2, prefetch_next_epoch=False)  # 250 each: no padding
    assert len(reads) == 4
    for chunks in reads.values():
        assert len(chunks) == len(set(chunks))  # no chunk read twice by a rank
        assert len(chunks) <= ds.num_chunks / 4 + 2  # its quarter, plus a shared one per end


def test_len_and_steps_remaining(ds):
    lo = StreamLoader(ds, 30, rank=1, world_size=3)
    assert len(lo) == -(-N // 90) == lo.steps_remaining()
    it = iter(lo)
    next(it), next(it)
    assert lo.steps_remaining() == len(lo) - 2
    lo.close()


@pytest.mark.parametrize("cut", [0, 1, 5, 11])
def test_resume_continues_exactly(ds, cut):
    full = ids_of(StreamLoader(ds, 30, rank=1, world_size=3, seed=4))
    lo = StreamLoader(ds, 30, rank=1, world_size=3, seed=4)
    it = iter(lo)
    first = [next(it)[1].copy() for _ in range(cut)]
    state = json.loads(json.dumps(lo.state_dict()))  # what a checkpoint manifest holds
    lo.close()
    assert state["samples_seen"] == cut * 90 and state["world_size"] == 3
    again = StreamLoader(ds, 30, rank=1, world_size=3, seed=0)  # seed comes from the state
    again.load_state_dict(state)
    again.set_epoch(state["epoch"])  # what a trainer does: keeps the position
    rest = ids_of(again)
    assert len(first) + len(rest) == len(full)
    for a, b in zip(first + rest, full, strict=True):
        np.testing.assert_array_equal(a, b)


def _take(ds, world, batch, steps, state=None, **kw):
    """Runs ``steps`` batches on every rank (from ``state``); returns ids and the new state."""
    out, new_state = [], None
    for r in range(world):
        lo = StreamLoader(ds, batch, rank=r, world_size=world, **kw)
        if state is not None:
            lo.load_state_dict(state)
        it = iter(lo)
        out += [next(it)[1].copy() for _ in range(steps)]
        states = lo.state_dict()
        assert new_state is None or states == new_state  # every rank holds the same state
        new_state = states
        lo.close()
    return out, new_state


@pytest.mark.parametrize(("w1", "w2"), [(3, 2), (2, 4), (1, 3), (4, 1)])
def test_resume_with_other_world_size_serves_the_rest_once(ds, w1, w2):
    seen, state = _take(ds, w1, 20, 4, seed=9)
    rest = run_ranks_from(ds, w2, 20, state)
    assert len({len(b) for b in rest}) == 1  # the new ranks still agree on the step count
    ids = np.concatenate(seen + [y for b in rest for y in b])
    counts = np.bincount(ids, minlength=N)
    assert counts.min() == 1, "a sample was never served"
    assert counts.sum() - N < 20 * max(w1, w2) * 2  # only padding is served twice


def test_chained_world_size_changes(ds):
    seen, state = _take(ds, 3, 16, 3, seed=1)
    more, state = _take(ds, 2, 16, 4, state=state)
    assert len(state["history"]) == 1 and state["samples_seen"] == 3 * 48 + 4 * 32
    rest = run_ranks_from(ds, 4, 16, state)
    lo = StreamLoader(ds, 16, rank=0, world_size=4)
    lo.load_state_dict(state)
    assert [h[0] for h in lo.state_dict()["history"]] == [144, 272]  # 3 ranks, then 2
    ids = np.concatenate(seen + more + [y for b in rest for y in b])
    assert np.bincount(ids, minlength=N).min() == 1


def run_ranks_from(ds, world, batch, state, **kw):
    out = []
    for r in range(world):
        lo = StreamLoader(ds, batch, rank=r, world_size=world, **kw)
        lo.load_state_dict(state)
        out.append(ids_of(lo))
    return out


def test_rank_weights_split_the_global_batch(ds):
    weights = [3.0, 1.0]
    sizes = order_mod.rank_batch_sizes(32, 2, weights)
    assert sizes == [48, 16]
    per_rank = run_ranks(ds, 2, batch=32, rank_weights=weights, seed=2)
    assert [len(b[0]) for b in per_rank] == sizes
    assert len(per_rank[0]) == len(per_rank[1])
    ids = np.concatenate([np.concatenate(b) for b in per_rank])
    assert np.bincount(ids, minlength=N).min() == 1


def test_rank_batch_sizes_properties():
    for weights in ([1, 1, 1], [5, 1, 1, 1], [0.1, 10.0], [2, 3]):
        sizes = order_mod.rank_batch_sizes(10, len(weights), weights)
        assert sum(sizes) == 10 * len(weights) and min(sizes) >= 1
        share = np.asarray(weights) / np.sum(weights) * sum(sizes)
        assert np.abs(np.asarray(sizes) - share).max() <= 1.0
    with pytest.raises(ValueError):
        order_mod.rank_batch_sizes(10, 2, [1, 0])


def test_next_epoch_matches_set_epoch(ds):
    lo = StreamLoader(ds, 32, rank=1, world_size=2, seed=3)
    ids_of(lo)  # epoch 0; the thread for epoch 1 starts as it ends
    second = ids_of(lo)  # rolls on to epoch 1
    fresh = StreamLoader(ds, 32, rank=1, world_size=2, seed=3, prefetch_next_epoch=False)
    fresh.set_epoch(1)
    for a, b in zip(second, ids_of(fresh), strict=True):
        np.testing.assert_array_equal(a, b)
    assert lo.epoch == 1
    lo.set_epoch(1)  # a finished epoch asked for again is replayed from its start
    assert np.array_equal(np.concatenate(ids_of(lo)), np.concatenate(second))
    lo.close()


def test_state_loaded_after_an_epoch_ends_is_not_served_from_the_spare_prefetch(ds):
    lo = StreamLoader(ds, 32, rank=0, world_size=1, seed=0)
    ids_of(lo)  # epoch 0 ends: a spare thread already prefetches seed 0's epoch 1
    lo.load_state_dict({"seed": 5, "epoch": 1, "samples_seen": 0, "world_size": 1})
    served = np.concatenate(ids_of(lo))
    fresh = StreamLoader(ds, 32, rank=0, world_size=1, seed=5, prefetch_next_epoch=False)
    fresh.set_epoch(1)
    np.testing.assert_array_equal(served, np.concatenate(ids_of(fresh)))
    lo.close()


def test_resume_under_other_order_settings_is_refused(ds):
    lo = StreamLoader(ds, 32, rank=0, world_size=1, shuffle_chunks=4)
    state = lo.state_dict()
    other = StreamLoader(ds, 32, rank=0, world_size=1, shuffle_chunks=2)
    with pytest.raises(ValueError, match="saved with shuffle_chunks=4, this loader has"):
        other.load_state_dict(state)
    old = {k: v for k, v in state.items() if k not in ("shuffle", "shuffle_chunks", "drop_last")}
    StreamLoader(ds, 32, rank=0, world_size=1).load_state_dict(old)  # older states still load


def _loader_threads() -> int:
    return sum(t.name.startswith("StreamLoader") for t in threading.enumerate())


def _wait_threads_gone(timeout=5.0) -> bool:
    end = time.monotonic() + timeout
    while _loader_threads() and time.monotonic() < end:
        time.sleep(0.02)
    return _loader_threads() == 0


def test_early_stop_ends_the_threads(ds):
    assert _wait_threads_gone()
    for how in ["close", "with", "break"]:
        lo = StreamLoader(ds, 8, prefetch=1)
        if how == "with":
            with lo:
                next(iter(lo))
        else:
            for _ in lo:
                break
            if how == "close":
                lo.close()
            else:
                del lo  # the dropped loader's __del__ stops its threads
        assert _wait_threads_gone(), f"prefetch thread still alive after {how}"


def test_corrupt_chunk_reaches_consumer(tmp_path):
    ds = labelled_store(tmp_path / "s", n=N, chunk=CHUNK)
    chunk_file(tmp_path / "s", "x", 7).write_bytes(b"not zstd at all" * 10)
    with pytest.raises(DatasetError) as info:
        for _ in StreamLoader(ds, 32, seed=0):
            pass
    assert (info.value.array, info.value.chunk) == ("x", 7)
    assert str(tmp_path / "s") in str(info.value)
    assert _wait_threads_gone()


def test_nan_reaches_consumer_when_checked(tmp_path):
    from distnet.data import write_dataset

    x = np.ones((200, 2), np.float32)
    x[150] = np.nan
    ds = write_dataset(tmp_path / "s", x, np.arange(200), chunk_samples=32)
    assert sum(1 for _ in StreamLoader(ds, 20)) == 10  # unchecked: NaN passes through
    with pytest.raises(DatasetError, match="chunk 4.*NaN"):
        list(StreamLoader(ds, 20, check_finite=True))


def test_transform_error_reaches_consumer(ds):
    def bad(x):
        raise ValueError("boom")

    with pytest.raises(RuntimeError, match="prefetch failed.*boom") as info:
        list(StreamLoader(ds, 32, transform=bad))
    assert ds.path in str(info.value)
    assert _wait_threads_gone()


def test_transform_runs(ds):
    (x, _), *_ = list(StreamLoader(ds, 32, transform=lambda x: x * 2 - 1))
    assert x.min() >= -1 and x.max() <= 1 and x.dtype == np.float32


def test_stuck_read_times_out(ds, monkeypatch):
    def stuck(self, i, *args):
        time.sleep(3)
        raise AssertionError("unreachable in time")

    slow = open_dataset(ds.path)
    monkeypatch.setattr(type(slow), "read_chunk", stuck)
    t = time.monotonic()
    with pytest.raises(TimeoutError, match=ds.path):
        next(iter(StreamLoader(slow, 32, timeout=0.3)))
    assert time.monotonic() - t < 2.5


def test_stats_measure_waiting(ds):
    lo = StreamLoader(ds, 32, seed=1, prefetch=4)
    for _ in lo:
        time.sleep(0.005)  # a consumer slower than the loader
    s = lo.stats()
    assert s["batches"] == len(lo)
    assert 0 <= s["wait_s"] <= s["elapsed_s"] and s["elapsed_s"] >= 0.005 * len(lo)
    assert s["steady_wait_fraction"] < 0.5
    lo.reset_stats()
    assert lo.stats()["batches"] == 0


def test_bad_arguments(ds):
    with pytest.raises(ValueError):
        StreamLoader(ds, 8, rank=2, world_size=2)
    with pytest.raises(ValueError):
        StreamLoader(ds, 8, rank_weights=[1, 2], world_size=1)
    lo = StreamLoader(ds, 32)
    with pytest.raises(ValueError):
        lo.load_state_dict({"seed": 0, "epoch": 0, "samples_seen": 33, "world_size": 1})


@pytest.mark.gpu
@pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))
def test_cuda_batches(ds):
    import cupy

    x, y = next(iter(StreamLoader(ds, 32, device="cuda")))
    assert isinstance(x, cupy.ndarray) and x.dtype == cupy.float32 and y.dtype == cupy.int64
