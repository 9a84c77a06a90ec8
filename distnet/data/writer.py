"""Writing distnet stores chunk by chunk, so data larger than memory converts in bounded memory.

``distnet_format`` is written last: a store whose conversion died half-way is refused by
:func:`~distnet.data.store.open_dataset` as "not a finished distnet store" rather than
read as zeros.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from distnet.data.store import (
    FORMAT_VERSION,
    TARGET_CHUNK_BYTES,
    X_DTYPES,
    Dataset,
    DatasetError,
    _open_group,
    open_dataset,
)


def default_chunk_samples(sample_shape: tuple[int, ...], dtype: Any) -> int:
    """Samples per chunk so that one chunk of ``x`` holds about ``TARGET_CHUNK_BYTES``."""
    sample_bytes = max(1, int(np.prod(sample_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    return max(1, TARGET_CHUNK_BYTES // sample_bytes)


def _x_dtype(dtype: np.dtype, store: str) -> np.dtype:
    if dtype in X_DTYPES:
        return dtype
    if dtype.kind == "f":  # float16/float64 become float32, the training dtype
        return np.dtype(np.float32)
    raise DatasetError(store, f"unsupported dtype {dtype} (x must be uint8 or float32)", "x")


def _conform(a: np.ndarray, want: np.dtype, store: str, array: str) -> np.ndarray:
    """``a`` as ``want``, refusing casts that would change values (floats into integer
    arrays, integers outside uint8's range); a silent wrap-around is corrupted data."""
    if a.dtype == want:
        return a
    if want.kind in "iu":
        if a.dtype.kind not in "iu":
            raise DatasetError(
                store, f"a {a.dtype} piece cannot go into a {want} array unchanged", array
            )
        info = np.iinfo(want)
        if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
            raise DatasetError(
                store,
                f"piece values {int(a.min())}..{int(a.max())} do not fit {want} "
                f"({info.min}..{info.max})",
                array,
            )
    return a.astype(want)


def _y_dtype(dtype: np.dtype, store: str) -> np.dtype:
    if dtype.kind in "iu":
        return np.dtype(np.int64)
    if dtype.kind == "f":
        return np.dtype(np.float32)
    raise DatasetError(store, f"unsupported dtype {dtype} (y must be integer or float)", "y")


class DatasetWriter:
    """Writes a store chunk by chunk from pieces of any size; memory is one chunk plus a piece.

    >>> with DatasetWriter("d.zarr", sample_shape=(784,), x_dtype="uint8", y_dtype="int64") as w:
    ...     for xb, yb in pieces:      # xb: (n, 784), yb: (n,)
    ...         w.append(xb, yb)
    """

    def __init__(
        self,
        path: str,
        sample_shape: tuple[int, ...],
        x_dtype: Any,
        y_dtype: Any | None = None,
        y_shape: tuple[int, ...] = (),
        chunk_samples: int | None = None,
        attrs: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
        compression_level: int = 3,
        shard_chunks: int = 1,
    ):
        from zarr.codecs import ZstdCodec  # noqa: PLC0415

        self.path = str(path)
        self.x_dtype = _x_dtype(np.dtype(x_dtype), self.path)
        self.y_dtype = None if y_dtype is None else _y_dtype(np.dtype(y_dtype), self.path)
        self.sample_shape, self.y_shape = tuple(sample_shape), tuple(y_shape)
        self.chunk_samples = int(chunk_samples or default_chunk_samples(sample_shape, self.x_dtype))
        if self.chunk_samples < 1:
            raise ValueError(f"chunk_samples must be >= 1, got {chunk_samples}")
        if int(shard_chunks) < 1:
            raise ValueError(f"shard_chunks must be >= 1, got {shard_chunks}")
        # shard_chunks > 1: the zarr v3 sharding codec puts that many chunks in one object
        # (object stores charge and throttle per request, and list millions of objects slowly);
        # each chunk stays a separately compressed piece, read with a range request.
        self.shard_chunks = int(shard_chunks)
        self.flush_samples = self.chunk_samples * self.shard_chunks
        shards = {} if self.shard_chunks == 1 else {"shards": (self.flush_samples, *sample_shape)}
        self.attrs = dict(attrs or {})
        self.group = _open_group(self.path, "w", storage_options)
        # checksum=True: a flipped byte in a chunk file is an error, not silently wrong pixels.
        codec = ZstdCodec(level=compression_level, checksum=True)
        self.x = self.group.create_array(
            "x",
            shape=(0, *self.sample_shape),
            chunks=(self.chunk_samples, *self.sample_shape),
            dtype=self.x_dtype,
            compressors=codec,
            config={"write_empty_chunks": True},  # so a missing chunk file is an error
            **shards,
        )
        self.y = None
        if self.y_dtype is not None:
            self.y = self.group.create_array(
                "y",
                shape=(0, *self.y_shape),
                chunks=(self.chunk_samples, *self.y_shape),
                dtype=self.y_dtype,
                compressors=codec,
                config={"write_empty_chunks": True},  # so a missing chunk file is an error
                **({} if not shards else {"shards": (self.flush_samples, *self.y_shape)}),
            )
        self._xbuf: list[np.ndarray] = []
        self._ybuf: list[np.ndarray] = []
        self._buffered = 0
        self.num_samples = 0
        self._max_label = -1
        self._closed = False

    def append(self, x: Any, y: Any | None = None) -> None:
        """Adds samples: ``x`` (n, *sample_shape), ``y`` (n, *y_shape) or None when no labels."""
        x = np.asarray(x)
        if x.shape[1:] != self.sample_shape:
            raise DatasetError(
                self.path,
                f"piece has sample shape {x.shape[1:]}, expected {self.sample_shape}",
                "x",
            )
        if (y is None) != (self.y is None):
            raise DatasetError(self.path, "labels given for some pieces but not others", "y")
        if x.dtype != self.x_dtype:
            _x_dtype(x.dtype, self.path)  # refuses int16, object, ...
        if y is not None:
            y = np.asarray(y)
            if len(y) != len(x):
                raise DatasetError(
                    self.path, f"piece has {len(x)} samples in x, {len(y)} in y", "y"
                )
            _y_dtype(y.dtype, self.path)
            if y.dtype.kind in "iu" and y.size:
                if int(y.min()) < 0:
                    raise DatasetError(self.path, f"negative label {int(y.min())}", "y")
                self._max_label = max(self._max_label, int(y.max()))
            self._ybuf.append(_conform(y, self.y_dtype, self.path, "y"))
        self._xbuf.append(_conform(x, self.x_dtype, self.path, "x"))
        self._buffered += len(x)
        # whole shards at a time: a shard written piece by piece is rewritten for each piece
        while self._buffered >= self.flush_samples:
            self._flush(self.flush_samples)

    def _flush(self, n: int) -> None:
        # Writes exactly n buffered samples as whole chunks (the last one may be short).
        xs = np.concatenate(self._xbuf) if len(self._xbuf) > 1 else self._xbuf[0]
        start, stop = self.num_samples, self.num_samples + n
        self.x.resize((stop, *self.sample_shape))
        self.x[start:stop] = xs[:n]
        self._xbuf = [xs[n:]] if len(xs) > n else []
        if self.y is not None:
            ys = np.concatenate(self._ybuf) if len(self._ybuf) > 1 else self._ybuf[0]
            self.y.resize((stop, *self.y_shape))
            self.y[start:stop] = ys[:n]
            self._ybuf = [ys[n:]] if len(ys) > n else []
        self._buffered -= n
        self.num_samples = stop

    def close(self) -> None:
        """Writes the short last chunk and the attributes that mark the store finished."""
        if self._closed:
            return
        if self._buffered:
            self._flush(self._buffered)
        attrs = {
            "scale": 1.0 / 255.0 if self.x_dtype == np.uint8 else 1.0,
            "offset": 0.0,
            "split": "all",
            "num_classes": None,
        }
        if self._max_label >= 0:
            attrs["num_classes"] = self._max_label + 1
        attrs.update(self.attrs)
        attrs["distnet_format"] = FORMAT_VERSION
        self.group.attrs.update(attrs)
        self._closed = True

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:  # an aborted write stays unmarked, so nobody trains on it
            self.close()


def write_dataset(
    path: str,
    x: Any,
    y: Any | None = None,
    chunk_samples: int | None = None,
    attrs: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    shard_chunks: int = 1,
) -> Dataset:
    """Writes arrays ``x`` (N, ...) and ``y`` (N,) or (N, ...) to a store at ``path``.

    ``x`` may be an ``np.memmap`` or any sliceable array: it is read one chunk at a time.
    ``attrs`` may set ``num_classes``, ``scale``, ``offset``, ``split`` (defaults: labels'
    max + 1, 1/255 for uint8 else 1, 0, "all"). ``shard_chunks`` > 1 groups that many
    chunks into one object (zarr's sharding codec). Returns the opened :class:`Dataset`.
    """
    if y is not None and len(y) != len(x):
        raise DatasetError(str(path), f"x has {len(x)} samples, y has {len(y)}", "y")
    writer = DatasetWriter(
        path,
        tuple(x.shape[1:]),
        x.dtype,
        None if y is None else np.asarray(y[:0]).dtype,
        () if y is None else tuple(np.shape(y)[1:]),
        chunk_samples,
        attrs,
        storage_options,
        shard_chunks=shard_chunks,
    )
    step = writer.flush_samples
    for start in range(0, len(x), step):
        writer.append(x[start : start + step], None if y is None else y[start : start + step])
    writer.close()
    return open_dataset(path, storage_options)


def write_dataset_blocks(
    path: str,
    blocks: Iterable[tuple[Any, Any | None]],
    chunk_samples: int | None = None,
    attrs: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    shard_chunks: int = 1,
) -> Dataset:
    """Writes a store from an iterable of ``(x_piece, y_piece_or_None)`` of any sizes.

    Memory stays at one chunk plus one piece, whatever the total size: this is how data
    larger than memory is converted. Shapes and dtypes come from the first piece.
    """
    writer: DatasetWriter | None = None
    for xb, yb in blocks:
        xb = np.asarray(xb)
        if writer is None:
            ydt = None if yb is None else np.asarray(yb).dtype
            ysh = () if yb is None else tuple(np.shape(yb)[1:])
            writer = DatasetWriter(
                path, tuple(xb.shape[1:]), xb.dtype, ydt, ysh, chunk_samples, attrs,
                storage_options, shard_chunks=shard_chunks,
            )  # fmt: skip
        writer.append(xb, yb)
    if writer is None:
        raise DatasetError(str(path), "no data: the block iterator was empty", "x")
    writer.close()
    return open_dataset(path, storage_options)
