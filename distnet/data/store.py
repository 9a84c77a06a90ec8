"""The distnet dataset format: a Zarr group with ``x``, optional ``y`` and a few attributes.

Layout (see docs/design.md, "Data format (Zarr)")::

    <store>/            group, attributes: distnet_format, num_classes, scale, offset, split
        x               (N, ...) uint8 or float32, chunks (chunk_samples, *full sample shape)
        y               (N,) int64 labels or (N, ...) float32 targets, same chunks along axis 0

This module opens and validates stores (:func:`open_dataset`, :class:`Dataset`); writing
is in :mod:`distnet.data.writer`. Every problem found is a :class:`DatasetError` naming
the store, the array and the chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from distnet.data.remote import check_options, check_url, describe_failure

FORMAT_VERSION = 1
X_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))
Y_DTYPES = (np.dtype(np.int64), np.dtype(np.float32))
# ~1 MB or more per chunk keeps per-read overhead small next to decompression.
TARGET_CHUNK_BYTES = 2**21


class DatasetError(ValueError):
    """A store that is missing, malformed or corrupt; the message names store, array and chunk."""

    def __init__(
        self, store: str, message: str, array: str | None = None, chunk: int | None = None
    ):
        where = store if array is None else f"{store}: array {array!r}"
        if chunk is not None:
            where += f" chunk {chunk}"
        super().__init__(f"{where}: {message}")
        self.store, self.array, self.chunk = store, array, chunk


def _all_fill(block: np.ndarray, arr: Any) -> bool:
    """Whether every value of ``block`` is ``arr``'s fill value (first element tested first)."""
    fill = arr.fill_value
    return bool(block.flat[0] == fill) and bool((block == fill).all())


def _chunk_key(arr: Any, i: int) -> str:
    """The key of the object holding chunk ``i`` (along axis 0) of ``arr``: its own object,
    or with the sharding codec the shard's."""
    shards = getattr(arr, "shards", None)
    outer = i if shards is None else i * arr.chunks[0] // shards[0]
    return str(arr.metadata.encode_chunk_key((outer,) + (0,) * (arr.ndim - 1)))


def _chunk_exists(arr: Any, i: int) -> bool:
    """Whether chunk ``i`` (along axis 0) of zarr array ``arr`` has a stored file/object."""
    from zarr.core.sync import sync  # noqa: PLC0415

    return bool(sync((arr.store_path / _chunk_key(arr, i)).exists()))


def _open_group(path: str, mode: str, storage_options: dict[str, Any] | None) -> Any:
    import zarr  # noqa: PLC0415  (keeps `import distnet.data` light)

    from distnet.data import remote  # noqa: PLC0415

    # storage_options only apply to URLs; zarr refuses them for plain local paths. URLs get
    # bounded requests, retries and timeouts, and are refused when they carry credentials.
    opts = remote.storage_options(str(path), storage_options)
    if opts is not None and mode == "w" and str(path).startswith("file://"):
        opts.setdefault("auto_mkdir", True)  # fsspec's local files do not make parents
    group = zarr.open_group(str(path), mode=mode, storage_options=opts)
    if opts is not None:
        remote.single_retry_loop(getattr(group.store, "fs", None))
    return group


class Dataset:
    """An opened, validated store. ``len(ds)`` samples in ``ds.num_chunks`` whole-chunk blocks.

    ``read_chunk(i)`` -> ``(x, y)`` with x (n_i, *sample_shape) in the stored dtype and
    y (n_i, ...) or None, where n_i = ``chunk_samples`` except for a shorter last chunk.
    """

    def __init__(self, path: str, group: Any):
        self.path, self.group = str(path), group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.x, self.y = group["x"], (group["y"] if "y" in group else None)
        self.chunk_samples = int(self.x.chunks[0])
        self.num_chunks = -(-self.x.shape[0] // self.chunk_samples)
        shards = getattr(self.x, "shards", None)
        # chunks per object: 1, or with zarr's sharding codec the chunks of one shard
        self.shard_chunks = 1 if shards is None else int(shards[0]) // self.chunk_samples
        self.sharded = shards is not None
        self.scale = float(self.attrs.get("scale", 1.0))
        self.offset = float(self.attrs.get("offset", 0.0))
        nc = self.attrs.get("num_classes")
        self.num_classes: int | None = None if nc is None else int(nc)
        self.split: str = str(self.attrs.get("split", "all"))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.path!r}, x={self.shape} {self.dtype}, "
            f"chunks={self.num_chunks}x{self.chunk_samples}, split={self.split!r})"
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``x``: (N, *sample_shape)."""
        return tuple(int(s) for s in self.x.shape)

    @property
    def dtype(self) -> np.dtype:
        """Stored dtype of ``x`` (uint8 or float32)."""
        return np.dtype(self.x.dtype)

    def array_chunk(self, name: str, i: int) -> np.ndarray:
        """Chunk ``i`` of array ``name`` ("x" or "y") as stored, without the checks of
        :meth:`read_chunk` (a sharded array's zarr blocks are shards, so not by block)."""
        arr = self.x if name == "x" else self.y
        if self.sharded:
            return np.asarray(arr.get_basic_selection(slice(*self.chunk_bounds(i))))
        return np.asarray(arr.get_block_selection(i))

    def chunk_bounds(self, i: int) -> tuple[int, int]:
        """Sample range [start, stop) of chunk ``i``."""
        start = i * self.chunk_samples
        return start, min(start + self.chunk_samples, len(self))

    def read_chunk(
        self, i: int, check_finite: bool = False, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Reads chunk ``i`` of ``x`` and ``y`` whole; any failure names store, array, chunk.

        ``out``, an (n_i, *sample_shape) array of x's dtype, receives x without a copy.
        """
        if not 0 <= i < self.num_chunks:
            raise IndexError(f"{self.path}: chunk {i} out of range 0..{self.num_chunks - 1}")
        start, stop = self.chunk_bounds(i)
        blocks: list[np.ndarray | None] = []
        for name, arr in (("x", self.x), ("y", self.y)):
            if arr is None:
                blocks.append(None)
                continue
            try:
                # a sharded array's blocks are its shards: chunk i is then a slice of one
                sel = slice(start, stop) if self.sharded else None
                if name == "x" and out is not None:
                    if sel is None:
                        arr.get_block_selection(i, out=_nd_buffer(out))
                    else:
                        arr.get_basic_selection(sel, out=_nd_buffer(out))
                    block = out
                elif sel is None:
                    block = np.asarray(arr.get_block_selection(i))
                else:
                    block = np.asarray(arr.get_basic_selection(sel))
            except Exception as exc:  # codec errors, truncated files, I/O errors
                raise DatasetError(
                    self.path, f"cannot read {self._object(name, i)}: {describe_failure(exc)}",
                    name, i,
                ) from exc  # fmt: skip
            if block.shape[0] != stop - start:
                raise DatasetError(
                    self.path, f"decoded {block.shape[0]} samples, expected {stop - start}", name, i
                )
            if block.size and _all_fill(block, arr) and not _chunk_exists(arr, i):
                # zarr reads a missing chunk file as fill values: silently wrong training data
                raise DatasetError(
                    self.path, f"chunk file is missing ({self._object(name, i)})", name, i
                )
            if name == "y" and block.dtype.kind in "iu" and self.num_classes is not None:
                if block.size and (int(block.min()) < 0 or int(block.max()) >= self.num_classes):
                    raise DatasetError(
                        self.path, f"label outside 0..{self.num_classes - 1}", name, i
                    )
            if check_finite and block.dtype.kind == "f" and not np.isfinite(block).all():
                bad = start + int(
                    np.flatnonzero(~np.isfinite(block).reshape(len(block), -1).all(axis=1))[0]
                )
                raise DatasetError(
                    self.path, f"non-finite value (NaN/inf) at sample {bad}", name, i
                )
            blocks.append(block)
        return blocks[0], blocks[1]  # type: ignore[return-value]

    def _object(self, name: str, i: int) -> str:
        """Path or URL of the file/object that holds chunk ``i`` of array ``name``."""
        arr = self.x if name == "x" else self.y
        return f"{self.path.rstrip('/')}/{name}/{_chunk_key(arr, i)}"

    def iter_chunks(self, check_finite: bool = False) -> Iterator[tuple[np.ndarray, Any]]:
        """Yields ``read_chunk(i)`` for every chunk in order."""
        for i in range(self.num_chunks):
            yield self.read_chunk(i, check_finite)

    def check(self) -> None:
        """Reads every chunk: missing chunk files, decode errors, NaN/inf, labels out of range."""
        self.require_chunks("x", "y")
        for i in range(self.num_chunks):
            _, y = self.read_chunk(i, check_finite=True)
            if y is not None:
                self.check_labels(y, i)

    def check_labels(self, y: np.ndarray, chunk: int) -> None:
        """DatasetError when integer labels ``y`` (chunk ``chunk``) fall outside the classes."""
        if y.dtype.kind == "i" and self.num_classes is not None and y.size:
            if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                raise DatasetError(
                    self.path, f"label outside 0..{self.num_classes - 1}", "y", chunk
                )

    def require_chunks(self, *names: str) -> None:
        """DatasetError naming the missing chunk files of arrays ``names`` ('x', 'y')."""
        for name in names:
            arr = getattr(self, name)
            if arr is not None and arr.nchunks_initialized < arr.nchunks:
                missing = [i for i in range(self.num_chunks) if not _chunk_exists(arr, i)]
                shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
                raise DatasetError(
                    self.path,
                    f"chunk file is missing ({len(missing)} of {arr.nchunks} missing: {shown})",
                    name,
                    missing[0] if missing else None,
                )

    def to_float(self, x: np.ndarray) -> np.ndarray:
        """Stored samples -> float32 ``x * scale + offset`` (same shape)."""
        out = x.astype(np.float32)
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        if self.offset != 0.0:
            out += np.float32(self.offset)
        return out


def _nd_buffer(a: np.ndarray) -> Any:
    from zarr.core.buffer import default_buffer_prototype  # noqa: PLC0415

    return default_buffer_prototype().nd_buffer.from_numpy_array(a)


def open_dataset(path: str, storage_options: dict[str, Any] | None = None) -> Dataset:
    """Opens and validates a store (local path or fsspec URL); raises :class:`DatasetError`."""
    path = str(path)
    check_url(path)  # ValueErrors naming the URL (scrubbed), before any request
    check_options(path, storage_options)
    try:
        group = _open_group(path, "r", storage_options)
    except Exception as exc:
        why = describe_failure(exc)
        if why.startswith(("credentials", "timed out")):
            raise DatasetError(path, f"cannot open: {why}") from exc
        raise DatasetError(path, f"not a Zarr group ({why})") from exc
    attrs = dict(group.attrs)
    if "distnet_format" not in attrs:
        raise DatasetError(
            path,
            "not a finished distnet store: no 'distnet_format' attribute "
            "(written last by the converters; was a conversion interrupted?)",
        )
    if int(attrs["distnet_format"]) > FORMAT_VERSION:
        raise DatasetError(
            path,
            f"distnet_format {attrs['distnet_format']} is newer than "
            f"this distnet reads ({FORMAT_VERSION})",
        )
    members = dict(group.members())
    if "x" not in members or not hasattr(members["x"], "dtype"):
        raise DatasetError(path, "missing array 'x'", "x")
    x, y = members["x"], members.get("y")
    if np.dtype(x.dtype) not in X_DTYPES:
        raise DatasetError(path, f"unsupported dtype {x.dtype} (expected uint8 or float32)", "x")
    if x.ndim < 2 or tuple(x.chunks[1:]) != tuple(x.shape[1:]):
        raise DatasetError(
            path,
            f"shape {x.shape} chunks {x.chunks}: need (N, ...) chunked along samples only",
            "x",
        )
    if y is not None:
        if np.dtype(y.dtype) not in Y_DTYPES:
            raise DatasetError(
                path, f"unsupported dtype {y.dtype} (expected int64 or float32)", "y"
            )
        if y.shape[0] != x.shape[0]:
            raise DatasetError(path, f"length {y.shape[0]} differs from x's {x.shape[0]}", "y")
        if y.chunks[0] != x.chunks[0] or tuple(y.chunks[1:]) != tuple(y.shape[1:]):
            raise DatasetError(
                path, f"chunks {y.chunks} do not match x's {x.chunks} along samples", "y"
            )
    return Dataset(path, group)
