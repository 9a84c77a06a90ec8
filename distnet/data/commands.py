"""``distnet data``: convert data sets into stores (``convert idx|digits|npy``) and ``info``.

Bad input (a missing file, a store that is not one, a corrupt chunk) is one line on stderr
and exit code 2 (the exit-code table of ``distnet.cli``), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np


def _storage_options(pairs: list[str] | None) -> dict[str, Any] | None:
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise ValueError(f"--storage-option wants KEY=VALUE, got {p!r}")
        try:
            out[key] = json.loads(value)  # numbers, true/false, JSON objects
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands ``convert {idx,digits,npy}`` and ``info``."""
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    conv = sub.add_parser("convert", help="write a distnet Zarr store from another format")
    src = conv.add_subparsers(dest="source", required=True, metavar="SOURCE")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--chunk-samples", type=int, help="samples per chunk (default ~2 MB)")
        p.add_argument(
            "--shard-chunks",
            type=int,
            default=1,
            metavar="N",
            help="N chunks per stored object (zarr's sharding codec; for object storage and "
            "stores of millions of samples; default 1: one object per chunk)",
        )
        p.add_argument(
            "--storage-option",
            action="append",
            metavar="KEY=VALUE",
            help="fsspec option for a URL output (repeatable)",
        )

    p = src.add_parser(
        "idx",
        help="IDX files (MNIST, Fashion-MNIST), .gz or plain",
        description="IMAGES is one IDX file (then OUT is one store) or a "
        "directory with train-/t10k- files (then OUT/train and OUT/test).",
    )
    p.add_argument("images", metavar="IMAGES")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--labels", help="IDX labels file, when IMAGES is a file")
    p.add_argument("--split", default="all", help="split attribute (default: all)")
    common(p)
    p = src.add_parser("digits", help="scikit-learn's bundled digits -> OUT/train, OUT/test")
    p.add_argument("out", metavar="OUT")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.25,
        help="stratified test share; 0 writes OUT/all only (default: 0.25)",
    )
    p.add_argument("--seed", type=int, default=0)
    common(p)
    p = src.add_parser("npy", help="numpy .npy (memory-mapped) or .npz arrays")
    p.add_argument("x", metavar="X", help=".npy of x, or .npz holding x (and y)")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--labels", help=".npy of y")
    p.add_argument("--x-key", default="x", help="array name in an .npz (default: x)")
    p.add_argument("--y-key", default="y", help="array name in an .npz (default: y)")
    p.add_argument("--split", default="all")
    p.add_argument("--num-classes", type=int, help="default: max label + 1")
    p.add_argument("--scale", type=float, help="uint8 -> float scale (default: 1/255)")
    common(p)

    info = sub.add_parser("info", help="shapes, dtypes, chunks, classes, balance, size on disk")
    info.add_argument("path", metavar="PATH")
    info.add_argument(
        "--check",
        action="store_true",
        help="also read every chunk: missing/corrupt chunks, NaN, label range",
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument("--storage-option", action="append", metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    """Runs ``distnet data ...``; returns the exit code."""
    from distnet.data.remote import scrub_text  # noqa: PLC0415
    from distnet.data.store import DatasetError  # noqa: PLC0415

    try:
        opts = _storage_options(args.storage_option)
        if args.data_command == "info":
            return _info(args, opts)
        return _convert(args, opts)
    except (DatasetError, ValueError, OSError) as exc:
        print(f"distnet data: error: {scrub_text(str(exc))}", file=sys.stderr)
        return 2


def _convert(args: argparse.Namespace, opts: dict[str, Any] | None) -> int:
    from pathlib import Path  # noqa: PLC0415

    from distnet.data import convert  # noqa: PLC0415

    cs = args.chunk_samples
    if cs is not None and cs < 1:
        raise ValueError(f"--chunk-samples must be >= 1, got {cs}")
    shard = args.shard_chunks
    if shard < 1:
        raise ValueError(f"--shard-chunks must be >= 1, got {shard}")
    if args.source == "idx":
        if Path(args.images).is_dir():
            stores = convert.convert_idx_dir(args.images, args.out, cs, opts, shard)
        elif not Path(args.images).is_file():
            raise ValueError(f"{args.images}: no such file or directory")
        else:
            ds = convert.convert_idx(args.images, args.out, args.labels, args.split, cs,
                                     storage_options=opts, shard_chunks=shard)  # fmt: skip
            stores = {ds.split: ds}
    elif args.source == "digits":
        stores = convert.convert_digits(
            args.out,
            args.test_fraction,
            args.seed,
            cs or convert.DIGITS_CHUNK_SAMPLES,
            opts,
            shard,
        )
    else:
        attrs: dict[str, Any] = {}
        if args.num_classes is not None:
            attrs["num_classes"] = args.num_classes
        if args.scale is not None:
            attrs["scale"] = args.scale
        ds = convert.convert_npy(
            args.x,
            args.out,
            args.labels,
            args.x_key,
            args.y_key,
            args.split,
            cs,
            attrs,
            opts,
            shard,
        )
        stores = {ds.split: ds}
    for ds in stores.values():
        print(
            f"wrote {ds.path}: x {ds.shape} {ds.dtype}, {ds.num_chunks} chunks of "
            f"{ds.chunk_samples}, classes {ds.num_classes}, split {ds.split!r}"
            + (f", {ds.shard_chunks} chunks per object" if ds.sharded else "")
        )
    return 0


def _size_on_disk(path: str, opts: dict[str, Any] | None) -> int | None:
    try:
        import fsspec  # noqa: PLC0415

        fs, root = fsspec.core.url_to_fs(path, **(opts or {}))
        return int(fs.du(root, total=True))
    except Exception:  # a store that cannot be listed still gets the rest of its info
        return None


def describe(
    path: str, storage_options: dict[str, Any] | None = None, check: bool = False
) -> dict[str, Any]:
    """What ``distnet data info`` prints, as a dict (class balance reads ``y`` chunk by chunk)."""
    from distnet.data.store import DatasetError, open_dataset  # noqa: PLC0415

    ds = open_dataset(path, storage_options)
    if check:
        ds.check()
    elif ds.y is not None:  # the class balance must not count a missing chunk's fill values
        ds.require_chunks("y")
    d: dict[str, Any] = {
        "path": ds.path,
        "distnet_format": ds.attrs.get("distnet_format"),
        "split": ds.split,
        "samples": len(ds),
        "x_shape": list(ds.shape),
        "x_dtype": str(ds.dtype),
        "chunk_samples": ds.chunk_samples,
        "num_chunks": ds.num_chunks,
        "scale": ds.scale,
        "offset": ds.offset,
        "num_classes": ds.num_classes,
        "compressors": [type(c).__name__ for c in ds.x.compressors],
        "shard_chunks": ds.shard_chunks,
    }
    if ds.y is not None:
        d["y_shape"], d["y_dtype"] = list(ds.y.shape), str(ds.y.dtype)
        if np.dtype(ds.y.dtype).kind == "i":
            counts = np.zeros(max(ds.num_classes or 0, 1), dtype=np.int64)
            for i in range(ds.num_chunks):
                y = ds.array_chunk("y", i)
                ds.check_labels(y, i)
                c = np.bincount(y, minlength=len(counts)) if y.size else counts * 0
                if len(c) > len(counts):
                    counts = np.pad(counts, (0, len(c) - len(counts)))
                counts[: len(c)] += c
            if int(counts.sum()) != len(ds):  # every sample's label counted once
                raise DatasetError(ds.path, f"labels count {int(counts.sum())} samples, "
                                   f"x has {len(ds)}", "y")  # fmt: skip
            d["class_counts"] = counts.tolist()
    raw = len(ds) * int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
    if ds.y is not None:
        raw += int(np.prod(ds.y.shape)) * np.dtype(ds.y.dtype).itemsize
    d["bytes_uncompressed"] = raw
    d["bytes_on_disk"] = _size_on_disk(ds.path, storage_options)
    d["checked"] = check
    return d


def _info(args: argparse.Namespace, opts: dict[str, Any] | None) -> int:
    d = describe(args.path, opts, args.check)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['path']}  (distnet_format {d['distnet_format']}, split {d['split']!r})")
    print(
        f"  x: {tuple(d['x_shape'])} {d['x_dtype']}, float32 = x * {d['scale']:.6g} + "
        f"{d['offset']:.6g}"
    )
    if "y_shape" in d:
        print(f"  y: {tuple(d['y_shape'])} {d['y_dtype']}")
    else:
        print("  y: none")
    print(
        f"  chunks: {d['num_chunks']} of {d['chunk_samples']} samples "
        f"({', '.join(d['compressors']) or 'uncompressed'})"
    )
    if d.get("class_counts") is not None:
        n = max(1, sum(d["class_counts"]))
        bal = "  ".join(f"{k}:{c} ({100 * c / n:.1f}%)" for k, c in enumerate(d["class_counts"]))
        print(f"  classes: {d['num_classes']}  balance: {bal}")
    disk = d["bytes_on_disk"]
    size = f"{d['bytes_uncompressed'] / 1e6:.2f} MB uncompressed"
    if disk:
        size += f", {disk / 1e6:.2f} MB on disk ({d['bytes_uncompressed'] / disk:.1f}x)"
    print(f"  size: {size}")
    if d["checked"]:
        print(
            "  check: every chunk read; no missing or corrupt chunks, no NaN/inf, labels in range"
        )
    return 0
