"""``distnet bench loader``: StreamLoader against a plain sequential zarr read, same run.

The store is MNIST-shaped (N x 784 uint8, ~4096-sample Zstd chunks) with MNIST-like
content (scikit-learn's digits scaled up to 28 x 28 and jittered), so chunks compress the
way real images do. Each round reads the whole store twice, alternating: once chunk by
chunk in order with zarr (the floor: no shuffling, no float conversion, no thread), once
through a shuffling StreamLoader; we report the median and spread of per-round ratios.
Then a consumer that does the matmuls of an MLP training step per batch (784-1000-1000-
1000-10, as in docs/benchmarks.md) runs a few epochs and reports its input-stall share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distnet bench loader``."""
    parser.add_argument("--samples", type=int, default=60_000, help="samples in the store")
    parser.add_argument("--chunk-samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up")
    parser.add_argument("--store", help="reuse/create the store here instead of a temp dir")
    parser.add_argument(
        "--hidden",
        type=int,
        default=1000,
        help="consumer: a training step of an MLP 784-H-H-H-10 per batch",
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the consumer run")
    parser.add_argument(
        "--step-ms",
        type=float,
        help="consumer: sleep this long per batch instead of the MLP step (a fixed pace that "
        "does not compete with the loader for the CPU, as a GPU step would not)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    remote = parser.add_argument_group("object storage (distnet/bench/loader_remote.py)")
    remote.add_argument("--url", help="also stream from this store URL (s3://, http://)")
    remote.add_argument(
        "--s3-server", action="store_true", help="start a local S3 server (moto) for --url"
    )
    remote.add_argument(
        "--latency-ms",
        type=float,
        nargs="+",
        metavar="MS",
        help="latencies added per request by a proxy on 127.0.0.1 (default: 0)",
    )
    remote.add_argument(
        "--shard-chunks", type=int, default=1, help="chunks per object in the remote store"
    )


def _mnist_like(n: int, seed: int, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of (b, 784) uint8 images and (b,) labels, made from digits: 8x8 -> 24x24 -> 28x28."""
    from distnet.data.convert import digits_arrays  # noqa: PLC0415

    dx, dy = digits_arrays()
    rng = np.random.default_rng(seed)
    for start in range(0, n, block):
        b = min(block, n - start)
        pick = rng.integers(0, len(dy), b)
        img = np.kron(dx[pick].reshape(b, 8, 8), np.ones((3, 3), np.uint8)).astype(np.int32) * 16
        img = np.clip(img + rng.integers(-24, 24, img.shape) * (img > 0), 0, 255)
        out = np.zeros((b, 28, 28), np.uint8)
        dr, dc = rng.integers(0, 5, 2)  # one shift per block keeps this fast
        out[:, dr : dr + 24, dc : dc + 24] = img
        yield out.reshape(b, 784), dy[pick]


def _store(args: argparse.Namespace, tmp: str) -> Any:
    from distnet.data import DatasetError, open_dataset, write_dataset_blocks  # noqa: PLC0415

    path = args.store or f"{tmp}/bench.zarr"
    try:
        ds = open_dataset(path)
        if ds.shape == (args.samples, 784) and ds.chunk_samples == args.chunk_samples:
            return ds
    except DatasetError:
        pass
    t = time.perf_counter()
    ds = write_dataset_blocks(
        path,
        _mnist_like(args.samples, 0, args.chunk_samples),
        args.chunk_samples,
        {"split": "bench"},
    )
    print(
        f"wrote {path}: {ds.shape} uint8, {ds.num_chunks} chunks of {ds.chunk_samples} "
        f"in {time.perf_counter() - t:.1f} s"
    )
    return ds


def _plain_read(ds: Any) -> float:
    t = time.perf_counter()
    for i in range(ds.num_chunks):
        ds.array_chunk("x", i)
        ds.array_chunk("y", i)
    return len(ds) / (time.perf_counter() - t)


def _loader_read(ds: Any, batch_size: int, epoch: int) -> float:
    from distnet.data import StreamLoader  # noqa: PLC0415

    loader = StreamLoader(ds, batch_size, shuffle=True, seed=1)
    loader.set_epoch(epoch)
    t = time.perf_counter()
    n = sum(len(x) for x, _ in loader)
    return n / (time.perf_counter() - t)


def _mlp(hidden: int, rng: np.random.Generator) -> list[np.ndarray]:
    sizes = [784, hidden, hidden, hidden, 10]
    return [
        (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ]


def _train_step(x: np.ndarray, ws: list[np.ndarray], lr: float = 1e-3) -> None:
    """The matmuls of one SGD step of an MLP (forward, backward, update), as a consumer."""
    hs = [x]
    for w in ws[:-1]:
        hs.append(np.maximum(hs[-1] @ w, 0.0))
    g = (hs[-1] @ ws[-1]) / len(x)  # stands in for d(loss)/d(logits)
    for i in range(len(ws) - 1, -1, -1):
        gw = hs[i].T @ g
        if i:
            g = (g @ ws[i].T) * (hs[i] > 0)
        ws[i] -= lr * gw


def _stall(
    ds: Any, batch_size: int, hidden: int, epochs: int, step_ms: float | None = None
) -> dict[str, float]:
    from distnet.data import StreamLoader  # noqa: PLC0415

    ws = _mlp(hidden, np.random.default_rng(0))

    def step(x: np.ndarray) -> None:
        if step_ms is None:
            _train_step(x, ws)
        else:  # a step at a fixed pace that leaves the CPU to the loader (a GPU's)
            time.sleep(step_ms / 1000)

    with StreamLoader(ds, batch_size, shuffle=True, seed=2) as loader:
        for x, _ in loader:  # warm-up epoch (BLAS threads, page cache)
            step(x)
        loader.reset_stats()
        t = time.perf_counter()
        for _ in range(epochs):
            for x, _ in loader:
                step(x)
        s = loader.stats()
    s["run_s"] = time.perf_counter() - t
    s["epochs"] = epochs
    return s


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark; prints samples/s, the ratio and the stall share."""
    if args.samples < 1 or args.rounds < 1 or args.chunk_samples < 1:
        print(
            "distnet bench loader: --samples, --rounds, --chunk-samples must be >= 1",
            file=sys.stderr,
        )
        return 2
    if args.url or args.s3_server:
        return _run_remote(args)
    with tempfile.TemporaryDirectory(prefix="distnet-bench-") as tmp:
        ds = _store(args, tmp)
        _plain_read(ds), _loader_read(ds, args.batch_size, 0)  # warm-up (caches, imports)
        plain, loader, ratios = [], [], []
        for r in range(args.rounds):
            a = _plain_read(ds)
            b = _loader_read(ds, args.batch_size, r + 1)
            plain.append(a)
            loader.append(b)
            ratios.append(b / a)
            print(
                f"round {r + 1}: plain zarr {a:,.0f} samples/s, StreamLoader {b:,.0f} "
                f"samples/s, ratio {b / a:.2f}"
            )
        stall = _stall(ds, args.batch_size, args.hidden, args.epochs, args.step_ms)
    res = {
        "samples": args.samples,
        "chunk_samples": args.chunk_samples,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "plain_samples_per_s": statistics.median(plain),
        "loader_samples_per_s": statistics.median(loader),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "consumer_hidden": args.hidden,
        "stall": stall,
    }
    print(f"plain sequential zarr read: {res['plain_samples_per_s']:,.0f} samples/s (median)")
    print(f"StreamLoader, shuffle on:   {res['loader_samples_per_s']:,.0f} samples/s (median)")
    print(
        f"ratio loader/plain: median {res['ratio_median']:.2f} "
        f"(min {res['ratio_min']:.2f}, max {res['ratio_max']:.2f}; target >= 0.80)"
    )
    print(
        f"consumer doing an MLP 784-{args.hidden}x3-10 training step per batch, "
        f"{args.epochs} epochs, {stall['batches']} batches in {stall['run_s']:.2f} s: waited "
        f"{100 * stall['wait_fraction']:.2f}% of the time "
        f"({100 * stall['steady_wait_fraction']:.2f}% after the first batch; target < 1%)"
    )
    return _write_json(args, res)


def _run_remote(args: argparse.Namespace) -> int:
    from distnet.bench.loader_remote import run_remote  # noqa: PLC0415
    from distnet.data import write_dataset_blocks  # noqa: PLC0415

    def write_blocks(path: str, shard_chunks: int) -> Any:
        blocks = _mnist_like(args.samples, 0, args.chunk_samples)
        return write_dataset_blocks(path, blocks, args.chunk_samples, {"split": "bench"},
                                    shard_chunks=shard_chunks)  # fmt: skip

    def stall(ds: Any) -> dict[str, float]:
        return _stall(ds, args.batch_size, args.hidden, args.epochs, args.step_ms)

    with tempfile.TemporaryDirectory(prefix="distnet-bench-") as tmp:
        res = run_remote(args, _store(args, tmp), write_blocks, stall)
    res.update(samples=args.samples, chunk_samples=args.chunk_samples,
               batch_size=args.batch_size, consumer_hidden=args.hidden)  # fmt: skip
    for key in [k for k in res if isinstance(res[k], dict) and "runs" in res[k]]:
        r = res[key]
        label = "local store" if key == "local" else f"+{key} ms per request"
        waited, steady = 100 * r["wait_fraction_median"], 100 * r["steady_wait_fraction_median"]
        print(f"{label:>22}: consumer waited {waited:.2f}% of the time (median of "
              f"{args.rounds}; {steady:.2f}% after the first batch; step "
              f"{1000 * r['step_s_median']:.1f} ms; target < 2%)")  # fmt: skip
    return _write_json(args, res)


def _write_json(args: argparse.Namespace, res: dict[str, Any]) -> int:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
