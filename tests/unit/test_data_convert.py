"""Converters: IDX (gz and plain), scikit-learn digits with a stratified split, npy/npz."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from helpers.data import write_idx

from distnet.data import (
    DatasetError,
    StreamLoader,
    convert_digits,
    convert_idx,
    convert_idx_dir,
    convert_npy,
    digits_arrays,
    iter_idx,
    read_idx,
    stratified_split,
)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    imgs = np.random.default_rng(0).integers(0, 256, (37, 5, 4), dtype=np.uint8)
    p = write_idx(tmp_path / "i-idx3-ubyte", imgs, gz)
    np.testing.assert_array_equal(read_idx(p), imgs)
    shape, dtype, blocks = iter_idx(p, 10)
    assert shape == (37, 5, 4) and dtype == np.uint8
    assert [len(b) for b in blocks] == [10, 10, 10, 7]
    f = np.arange(6, dtype=np.float32).reshape(3, 2)  # big-endian floats come back native
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "f", f, gz)), f)


def test_idx_bad_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    p = write_idx(tmp_path / "t", np.zeros((10, 3), np.uint8), gz=False)
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(p)
    g = write_idx(tmp_path / "g", np.zeros((10, 3), np.uint8), gz=True)
    g.write_bytes(gzip.compress(gzip.decompress(g.read_bytes())[:-4]))
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(g)


def test_idx_dir_to_train_and_test(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "fashion"
    src.mkdir()
    data = {}
    for prefix, n, gz in [("train", 150, True), ("t10k", 40, False)]:
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(src / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(src / f"{prefix}-labels-idx1-ubyte", y, gz)
        data["train" if prefix == "train" else "test"] = (x, y)
    stores = convert_idx_dir(src, str(tmp_path / "out"), chunk_samples=64)
    assert sorted(stores) == ["test", "train"]
    for split, ds in stores.items():
        x, y = data[split]
        assert ds.split == split and ds.shape == x.shape and ds.num_classes == int(y.max()) + 1
        got = [ds.read_chunk(i) for i in range(ds.num_chunks)]
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), x)
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), y)
        xb, _ = next(iter(StreamLoader(ds, 8)))
        assert xb.dtype == np.float32 and 0 <= xb.min() and xb.max() <= 1


def test_idx_label_count_mismatch(tmp_path):
    write_idx(tmp_path / "i", np.zeros((10, 2, 2), np.uint8), False)
    write_idx(tmp_path / "l", np.zeros(9, np.uint8), False)
    with pytest.raises(DatasetError, match="9 labels for 10 images"):
        convert_idx(tmp_path / "i", str(tmp_path / "o"), tmp_path / "l")
    with pytest.raises(DatasetError, match="no train"):
        convert_idx_dir(tmp_path, str(tmp_path / "o"))


def test_stratified_split():
    y = np.repeat(np.arange(4), [40, 20, 100, 8])
    tr, te = stratified_split(y, 0.25, seed=3)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(y)
    np.testing.assert_array_equal(np.bincount(y[te]), [10, 5, 25, 2])
    tr2, _ = stratified_split(y, 0.25, seed=4)
    assert not np.array_equal(tr, tr2)


def test_digits(tmp_path):
    x, y = digits_arrays()
    stores = convert_digits(str(tmp_path / "d"), test_fraction=0.25, seed=0)
    tr, te = stores["train"], stores["test"]
    assert len(tr) + len(te) == len(x) == 1797
    assert (tr.split, te.split, tr.num_classes, tr.scale) == ("train", "test", 10, 1 / 16)
    counts_te = np.bincount(np.concatenate([c[1] for c in te.iter_chunks()]), minlength=10)
    assert np.all(np.abs(counts_te - 0.25 * np.bincount(y)) <= 1)  # stratified
    rows = {r.tobytes() for ds in stores.values() for c in ds.iter_chunks() for r in c[0]}
    assert rows == {r.tobytes() for r in x}  # every digit kept (as a set of images)
    xs = np.concatenate([b[0] for b in StreamLoader(tr, 100)])
    assert xs.dtype == np.float32 and xs.min() == 0.0 and xs.max() == 1.0
    assert list(convert_digits(str(tmp_path / "a"), test_fraction=0)) == ["all"]


def test_npy_and_npz(tmp_path):
    x = np.random.default_rng(2).random((30, 4))
    y = np.arange(30) % 3
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    ds = convert_npy(tmp_path / "x.npy", str(tmp_path / "a"), tmp_path / "y.npy", chunk_samples=8)
    assert ds.dtype == np.float32 and ds.num_classes == 3 and ds.num_chunks == 4
    np.savez(tmp_path / "d.npz", features=x.astype(np.float32), y=y)
    ds = convert_npy(tmp_path / "d.npz", str(tmp_path / "b"), x_key="features")
    np.testing.assert_array_equal(ds.read_chunk(0)[1], y[: ds.chunk_samples])
    with pytest.raises(DatasetError, match="it has: features, y"):
        convert_npy(tmp_path / "d.npz", str(tmp_path / "c"))
    with pytest.raises(DatasetError, match="no such file"):
        convert_npy(tmp_path / "nope.npy", str(tmp_path / "c"))
