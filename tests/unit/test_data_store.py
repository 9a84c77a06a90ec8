"""The store format: round trips, URLs, bounded-memory writes, and every bad-input case."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import zarr
from helpers.data import chunk_file, labelled_store

from distnet.data import (
    FORMAT_VERSION,
    DatasetError,
    DatasetWriter,
    StreamLoader,
    open_dataset,
    write_dataset,
    write_dataset_blocks,
)

pytestmark = pytest.mark.timeout(60)


def test_round_trip_with_short_last_chunk(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 7, 5), dtype=np.uint8)
    y = rng.integers(0, 4, 300)
    ds = write_dataset(tmp_path / "s", x, y, chunk_samples=128, attrs={"split": "train"})
    assert len(ds) == 300 and ds.shape == (300, 7, 5) and ds.dtype == np.uint8
    assert (ds.num_chunks, ds.chunk_samples) == (3, 128)
    assert ds.num_classes == int(y.max()) + 1 and ds.split == "train"
    assert ds.attrs["distnet_format"] == FORMAT_VERSION
    assert ds.scale == pytest.approx(1 / 255) and ds.offset == 0.0
    got = [ds.read_chunk(i) for i in range(ds.num_chunks)]
    assert [len(c[0]) for c in got] == [128, 128, 44]
    np.testing.assert_array_equal(np.concatenate([c[0] for c in got]), x)
    np.testing.assert_array_equal(np.concatenate([c[1] for c in got]), y)
    assert got[0][1].dtype == np.int64
    assert ds.y.chunks[0] == ds.x.chunks[0] == 128


def test_float_targets_and_no_labels(tmp_path):
    x = np.linspace(-1, 1, 80, dtype=np.float64).reshape(20, 4)
    t = np.ones((20, 2))
    ds = write_dataset(tmp_path / "f", x, t, chunk_samples=8)
    assert ds.dtype == np.float32 and ds.y.dtype == np.float32 and ds.num_classes is None
    assert ds.scale == 1.0
    np.testing.assert_allclose(np.concatenate([c[0] for c in ds.iter_chunks()]), x, rtol=1e-6)
    unl = write_dataset(tmp_path / "u", x.astype(np.float32), chunk_samples=8)
    assert unl.y is None and unl.read_chunk(0)[1] is None


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(tmp_path, scheme):
    url = f"memory://distnet-test/{tmp_path.name}" if scheme == "memory" else tmp_path.as_uri()
    url += "/s.zarr"
    x = np.arange(50 * 3, dtype=np.uint8).reshape(50, 3)
    write_dataset(url, x, np.arange(50) % 5, chunk_samples=16, storage_options={})
    ds = open_dataset(url, storage_options={})
    assert ds.shape == (50, 3) and ds.num_classes == 5
    batches = list(StreamLoader(ds, 10, shuffle=False))
    np.testing.assert_allclose(np.concatenate([b[0] for b in batches]), x / 255.0, rtol=1e-6)


def test_generator_write_is_bounded_memory(tmp_path):
    # 24 MB arrive in 64 KB pieces; the writer may hold one ~1 MB chunk plus a piece.
    piece, n_pieces, width = 64, 384, 1024

    def pieces():
        for i in range(n_pieces):
            yield np.full((piece, width), i % 256, np.uint8), np.full(piece, i % 3)

    write_dataset(tmp_path / "warm", np.zeros((10, width), np.uint8))  # one-time setup costs
    tracemalloc.start()
    ds = write_dataset_blocks(tmp_path / "g", pieces(), chunk_samples=1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    total = piece * n_pieces * width
    assert len(ds) == piece * n_pieces and ds.num_classes == 3
    assert peak < total / 4, f"peak {peak / 1e6:.1f} MB for {total / 1e6:.1f} MB of data"
    x, y = ds.read_chunk(ds.num_chunks - 1)
    assert (x[:, 0] == np.arange(len(ds))[-len(x) :] // piece % 256).all()


def test_memmap_write_is_bounded_memory(tmp_path):
    n, width = 24_000, 1000
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(n, width))
    mm[:] = (np.arange(n) % 256)[:, None]
    mm.flush()
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    write_dataset(tmp_path / "warm", np.zeros((10, width), np.uint8))  # one-time setup costs
    tracemalloc.start()
    ds = write_dataset(tmp_path / "m", x, chunk_samples=1024)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < n * width / 4, f"peak {peak / 1e6:.1f} MB"
    np.testing.assert_array_equal(ds.read_chunk(5)[0][:, 0], (np.arange(5 * 1024, 6 * 1024)) % 256)


# ----- bad input: each names the store, the array and where it can, the chunk ------------------


def _err(fn, *args, **kwargs) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    return info.value


def test_not_a_store(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("hello")
    for p in [tmp_path / "plain", tmp_path / "missing"]:
        e = _err(open_dataset, p)
        assert str(p) in str(e) and "not a Zarr group" in str(e)
    zarr.open_group(str(tmp_path / "bare"), mode="w").create_array("x", shape=(4, 2), dtype="u1")
    assert "distnet_format" in str(_err(open_dataset, tmp_path / "bare"))


def test_interrupted_write_is_refused(tmp_path):
    with pytest.raises(RuntimeError), DatasetWriter(tmp_path / "w", (3,), "uint8") as w:
        w.append(np.zeros((10, 3), np.uint8))
        raise RuntimeError("converter crashed")
    assert "interrupted" in str(_err(open_dataset, tmp_path / "w"))


def _group(path, x_shape=(10, 3), x_chunks=(4, 3), x_dtype="u1", y=None):
    g = zarr.open_group(str(path), mode="w")
    if x_shape is not None:
        g.create_array("x", shape=x_shape, chunks=x_chunks, dtype=x_dtype)
    if y is not None:
        g.create_array("y", shape=y[0], chunks=y[1], dtype=y[2])
    g.attrs.update({"distnet_format": FORMAT_VERSION})
    return path


def test_missing_x(tmp_path):
    e = _err(open_dataset, _group(tmp_path / "s", x_shape=None, y=((10,), (4,), "i8")))
    assert e.array == "x" and "missing" in str(e) and str(tmp_path / "s") in str(e)


def test_x_y_length_mismatch(tmp_path):
    e = _err(open_dataset, _group(tmp_path / "s", y=((9,), (4,), "i8")))
    assert e.array == "y" and "length 9" in str(e)
    assert "10 samples" in str(_err(write_dataset, tmp_path / "w", np.zeros((10, 2)), np.zeros(9)))


def test_x_y_chunk_mismatch(tmp_path):
    e = _err(open_dataset, _group(tmp_path / "s", y=((10,), (5,), "i8")))
    assert e.array == "y" and "chunks" in str(e)


@pytest.mark.parametrize("dtype", ["i2", "f8", "u4"])
def test_unsupported_x_dtype(tmp_path, dtype):
    e = _err(open_dataset, _group(tmp_path / "s", x_dtype=dtype))
    assert e.array == "x" and "unsupported dtype" in str(e)


def test_unsupported_dtype_on_write(tmp_path):
    e = _err(write_dataset, tmp_path / "s", np.zeros((4, 2), np.int16))
    assert e.array == "x" and "int16" in str(e)
    e = _err(write_dataset, tmp_path / "t", np.zeros((4, 2), np.uint8), np.array(["a"] * 4))
    assert e.array == "y"


def test_pieces_that_would_change_value_are_refused(tmp_path):
    from distnet.data import DatasetWriter

    w = DatasetWriter(tmp_path / "s", (2,), np.uint8, np.int64, chunk_samples=4)
    w.append(np.array([[1, 2], [3, 4]], np.uint8), np.array([0, 1]))
    w.append(np.array([[5, 6]], np.uint8), np.array([1], np.int32))  # int labels: fine
    with pytest.raises(DatasetError, match=r"float64 piece cannot go into a uint8") as e:
        w.append(np.array([[0.5, 0.9]]), np.array([0]))
    assert e.value.array == "x"
    with pytest.raises(DatasetError, match=r"float64 piece cannot go into a int64") as e:
        w.append(np.array([[1, 2]], np.uint8), np.array([1.5]))
    assert e.value.array == "y"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("array", ["x", "y"])
def test_corrupt_chunk_file(tmp_path, damage, array):
    ds = labelled_store(tmp_path / "s", n=300, chunk=64)
    f = chunk_file(tmp_path / "s", array, 2)
    data = f.read_bytes()
    f.write_bytes(b"\x00garbage" * 20 if damage == "garbage" else data[: len(data) // 2])
    ds.read_chunk(1)  # the others still read
    e = _err(ds.read_chunk, 2)
    assert (e.store, e.array, e.chunk) == (str(tmp_path / "s"), array, 2)
    assert f"array '{array}' chunk 2" in str(e)


def test_missing_chunk_file_found_by_check(tmp_path):
    ds = labelled_store(tmp_path / "s", n=300, chunk=64)
    ds.check()
    chunk_file(tmp_path / "s", "x", 3).unlink()
    e = _err(open_dataset(tmp_path / "s").check)
    assert e.array == "x" and "missing" in str(e)


def test_nan_check(tmp_path):
    x = np.ones((40, 3), np.float32)
    x[29, 1] = np.nan
    ds = write_dataset(tmp_path / "s", x, chunk_samples=8)
    ds.read_chunk(3)  # not asked to check: reads fine
    e = _err(ds.read_chunk, 3, check_finite=True)
    assert e.chunk == 3 and e.array == "x" and "sample 29" in str(e)
    assert _err(ds.check).chunk == 3


def test_label_out_of_range_found_by_check(tmp_path):
    ds = write_dataset(
        tmp_path / "s",
        np.zeros((20, 2), np.uint8),
        np.arange(20) % 4,
        chunk_samples=8,
        attrs={"num_classes": 3},
    )
    e = _err(ds.check)
    assert e.array == "y" and e.chunk == 0
