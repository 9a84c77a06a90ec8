"""Converters into distnet stores: IDX (MNIST, Fashion-MNIST), scikit-learn digits, npy/npz.

Every converter streams: IDX files are read a chunk at a time (gzipped or not), ``.npy``
files are memory-mapped, so converting a data set larger than memory stays bounded.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from distnet.data.store import Dataset, DatasetError
from distnet.data.writer import write_dataset, write_dataset_blocks

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS")
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
DIGITS_CHUNK_SAMPLES = 256  # digits is tiny: small chunks so an epoch still has a few to shuffle


def _open(path: str | os.PathLike[str]) -> IO[bytes]:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")  # noqa: SIM115


def _read_exact(f: IO[bytes], n: int, path: Any, what: str) -> bytes:
    try:
        data = f.read(n)
    except (OSError, EOFError) as exc:  # a truncated or corrupt .gz
        raise DatasetError(str(path), f"cannot read {what}: {exc}") from exc
    if len(data) != n:
        raise DatasetError(
            str(path), f"truncated IDX file: {what} needs {n} bytes, got {len(data)}"
        )
    return data


def _data_bytes(path: Any) -> int:
    """Bytes after decompression: the file size, or a gzip's ISIZE trailer (mod 2**32)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return size
        if size < 18:
            raise DatasetError(str(path), "truncated gzip file")
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


def _idx_header(f: IO[bytes], path: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header; refuses a header that the file's size contradicts
    (a truncated, padded or corrupt file) before any data is read."""
    magic = _read_exact(f, 4, path, "header")
    if magic[:2] != b"\0\0" or magic[2] not in IDX_DTYPES or magic[3] == 0:
        raise DatasetError(str(path), f"not an IDX file (magic bytes {magic.hex()})")
    ndim = magic[3]
    shape = tuple(int(d) for d in np.frombuffer(_read_exact(f, 4 * ndim, path, "shape"), ">u4"))
    dtype = np.dtype(IDX_DTYPES[magic[2]])
    if 0 in shape[1:]:
        raise DatasetError(str(path), f"IDX header gives an empty sample shape {shape}")
    expected = 4 + 4 * ndim + int(np.prod(shape, dtype=object)) * dtype.itemsize
    actual = _data_bytes(path)
    gz = isinstance(f, gzip.GzipFile)
    if (expected % 2**32 if gz else expected) != actual:
        raise DatasetError(
            str(path),
            f"IDX header says shape {shape} of {dtype} ({expected} bytes with the header) "
            f"but the file holds {'(mod 2**32) ' if gz else ''}{actual} bytes: "
            "truncated or corrupt",
        )
    return shape, dtype


def iter_idx(
    path: str | os.PathLike[str], block_samples: int = 4096
) -> tuple[tuple[int, ...], np.dtype, Iterator[np.ndarray]]:
    """Opens an IDX file (``.gz`` or plain): its full shape, native dtype and an iterator of
    blocks of up to ``block_samples`` samples, each (n, *shape[1:]). Memory is one block."""
    f = _open(path)
    try:
        shape, dtype = _idx_header(f, path)
    except BaseException:
        f.close()
        raise
    sample_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def blocks() -> Iterator[np.ndarray]:
        with f:
            for start in range(0, shape[0], block_samples):
                n = min(block_samples, shape[0] - start)
                raw = _read_exact(f, n * sample_bytes, path, f"samples {start}..{start + n - 1}")
                yield (
                    np.frombuffer(raw, dtype).reshape(n, *shape[1:]).astype(dtype.newbyteorder("="))
                )

    return shape, dtype.newbyteorder("="), blocks()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads a whole IDX file (``.gz`` or plain) into memory: shape as in its header."""
    shape, dtype = idx_info(path)
    sample_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    _, _, blocks = iter_idx(path, block_samples=max(1, 2**26 // sample_bytes))
    parts = list(blocks)
    return np.concatenate(parts) if parts else np.empty(shape, dtype)


def idx_info(path: str | os.PathLike[str]) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and (native) dtype from an IDX file's header, without reading its data."""
    with _open(path) as f:
        shape, dtype = _idx_header(f, path)
    return shape, dtype.newbyteorder("=")


def convert_idx(
    images: str | os.PathLike[str],
    out: str,
    labels: str | os.PathLike[str] | None = None,
    split: str = "all",
    chunk_samples: int | None = None,
    attrs: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    shard_chunks: int = 1,
) -> Dataset:
    """IDX images (N, H, W) uint8 [+ IDX labels (N,)] -> store at ``out``, chunk by chunk.

    uint8 images get scale 1/255, so the loader yields float32 in [0, 1].
    """
    from distnet.data.writer import default_chunk_samples  # noqa: PLC0415

    shape, dtype = idx_info(images)
    cs = chunk_samples or default_chunk_samples(shape[1:], dtype)
    shape, dtype, xblocks = iter_idx(images, cs)
    yblocks: Iterator[Any] = iter(lambda: None, 0)  # endless Nones
    if labels is not None:
        yshape, _, yblocks = iter_idx(labels, cs)
        if yshape[0] != shape[0]:
            raise DatasetError(str(labels), f"{yshape[0]} labels for {shape[0]} images in {images}")
    meta = {"split": split, "source": f"idx:{Path(images).name}", **(attrs or {})}
    blocks = zip(xblocks, yblocks, strict=False)
    return write_dataset_blocks(out, blocks, cs, meta, storage_options, shard_chunks)


_IDX_NAMES = {  # split -> (images pattern, labels pattern), matched against file names
    "train": (r"^train-images[.-]idx3-ubyte(\.gz)?$", r"^train-labels[.-]idx1-ubyte(\.gz)?$"),
    "test": (
        r"^(t10k|test)-images[.-]idx3-ubyte(\.gz)?$",
        r"^(t10k|test)-labels[.-]idx1-ubyte(\.gz)?$",
    ),
}


def find_idx_files(src_dir: str | os.PathLike[str]) -> dict[str, tuple[Path, Path]]:
    """The MNIST-style files in ``src_dir`` (searched recursively): split -> (images, labels)."""
    files = [p for p in sorted(Path(src_dir).rglob("*")) if p.is_file()]
    found = {}
    for split, (ipat, lpat) in _IDX_NAMES.items():
        imgs = [p for p in files if re.match(ipat, p.name)]
        labs = [p for p in files if re.match(lpat, p.name)]
        if imgs and labs:
            found[split] = (imgs[0], labs[0])
    return found


def convert_idx_dir(
    src_dir: str | os.PathLike[str],
    out_dir: str,
    chunk_samples: int | None = None,
    storage_options: dict[str, Any] | None = None,
    shard_chunks: int = 1,
) -> dict[str, Dataset]:
    """A directory of MNIST-style IDX files -> ``out_dir/train`` and ``out_dir/test`` stores.

    Expects the usual names: ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
    ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``.
    """
    if not Path(src_dir).is_dir():
        raise DatasetError(str(src_dir), "not a directory")
    found = find_idx_files(src_dir)
    if not found:
        raise DatasetError(
            str(src_dir),
            "no train-/t10k-images-idx3-ubyte[.gz] with matching "
            "labels-idx1-ubyte[.gz] files found",
        )
    out = str(out_dir).rstrip("/")
    return {
        split: convert_idx(
            imgs,
            f"{out}/{split}",
            labs,
            split,
            chunk_samples,
            storage_options=storage_options,
            shard_chunks=shard_chunks,
        )  # fmt: skip
        for split, (imgs, labs) in found.items()
    }


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: x uint8 (1797, 64) in 0..16, y int64 (1797,) in 0..9."""
    from sklearn.datasets import load_digits  # noqa: PLC0415  (sklearn is slow to import)

    d = load_digits()
    return d.data.astype(np.uint8), d.target.astype(np.int64)


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with ``round(test_fraction * count)`` of each class in test,
    both in a random order from ``seed``. y (N,) integer labels."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    tr, te = np.concatenate(train), np.concatenate(test)
    return rng.permutation(tr), rng.permutation(te)


def convert_digits(
    out_dir: str,
    test_fraction: float = 0.25,
    seed: int = 0,
    chunk_samples: int = DIGITS_CHUNK_SAMPLES,
    storage_options: dict[str, Any] | None = None,
    shard_chunks: int = 1,
) -> dict[str, Dataset]:
    """Digits -> ``out_dir/train`` and ``out_dir/test`` (stratified; just ``out_dir/all`` when
    ``test_fraction`` is 0). x uint8 (n, 64) with scale 1/16, so the loader yields [0, 1]."""
    x, y = digits_arrays()
    attrs = {
        "scale": 1.0 / 16.0,
        "offset": 0.0,
        "num_classes": 10,
        "source": "sklearn.digits",
        "split_seed": seed,
        "test_fraction": test_fraction,
    }
    out = str(out_dir).rstrip("/")
    if test_fraction == 0:
        parts = {"all": np.random.default_rng(seed).permutation(len(y))}
    else:
        tr, te = stratified_split(y, test_fraction, seed)
        parts = {"train": tr, "test": te}
    return {
        name: write_dataset(
            f"{out}/{name}",
            x[idx],
            y[idx],
            chunk_samples,
            {**attrs, "split": name},
            storage_options,
            shard_chunks,
        )
        for name, idx in parts.items()
    }


def convert_npy(
    x_path: str | os.PathLike[str],
    out: str,
    labels: str | os.PathLike[str] | None = None,
    x_key: str = "x",
    y_key: str = "y",
    split: str = "all",
    chunk_samples: int | None = None,
    attrs: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    shard_chunks: int = 1,
) -> Dataset:
    """``.npy`` (memory-mapped, so bounded memory) or ``.npz`` (keys ``x_key``/``y_key``) ->
    store. ``labels`` is a separate ``.npy`` of y (N,); for an ``.npz`` ``y_key`` is optional."""
    x, y = _load_array(x_path, x_key, required=True), None
    if labels is not None:
        y = _load_array(labels, y_key, required=True)
    elif str(x_path).endswith(".npz"):
        y = _load_array(x_path, y_key, required=False)
    meta = {"split": split, "source": f"npy:{Path(x_path).name}", **(attrs or {})}
    return write_dataset(out, x, y, chunk_samples, meta, storage_options, shard_chunks)


def _load_array(path: Any, key: str, required: bool) -> np.ndarray | None:
    p = str(path)
    if not os.path.isfile(p):
        raise DatasetError(p, "no such file")
    try:
        if p.endswith(".npz"):
            with np.load(p, allow_pickle=False) as z:
                if key not in z.files:
                    if not required:
                        return None
                    raise DatasetError(p, f"no array {key!r} (it has: {', '.join(z.files)})")
                return z[key]
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except DatasetError:
        raise
    except Exception as exc:  # not a numpy file, object arrays, truncated
        raise DatasetError(p, f"cannot read as .npy/.npz: {type(exc).__name__}: {exc}") from exc
