"""Shared helpers for the tests of distnet.data (not a conftest: that file belongs elsewhere)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from distnet.data import write_dataset


def labelled_store(path: Path | str, n: int = 1000, chunk: int = 64, features: int = 3):
    """A store whose y is the sample index and whose x rows encode it, so any batch can be
    traced back to the samples it holds. The last chunk is short unless chunk divides n."""
    idx = np.arange(n)
    x = (idx[:, None] + np.arange(features)[None, :]) % 251
    return write_dataset(str(path), x.astype(np.uint8), idx, chunk_samples=chunk)


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    """Writes ``arr`` as an IDX file (big-endian), gzipped when ``gz``."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim])
    header += np.asarray(arr.shape, dtype=">u4").tobytes()
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def chunk_file(store: Path, array: str, chunk: int) -> Path:
    """The file of chunk ``chunk`` of ``array`` in a local zarr v3 store (default key encoding)."""
    ndim = 2 if array == "x" else 1
    return store / array / "c" / str(chunk) / Path(*(["0"] * (ndim - 1)))


def digits_split() -> list[np.ndarray]:
    """scikit-learn's digits in memory, scaled to [0, 1] (float32), split 75/25 stratified
    (seed 0): ``[x_train (1347, 64), x_test (450, 64), y_train, y_test]``."""
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
