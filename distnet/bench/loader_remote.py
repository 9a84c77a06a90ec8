"""``distnet bench loader --url URL --latency-ms 20 50``: the loader streaming from object
storage with added request latency, against the local store in the same run.

The same MNIST-shaped store is written locally and at ``URL`` (``s3://...`` through the
standard AWS environment, or ``--s3-server``: a local S3-compatible server, moto, started for
the run). A proxy on 127.0.0.1 adds ``--latency-ms`` to every request (the endpoint must be
plain HTTP: a local server, or an ``http://`` store). Alternating rounds: local, then each
latency; each runs the consumer of ``distnet bench loader`` (the matmuls of the Fashion job's
784-1000-1000-1000-10 step per batch) and reports the share of time it waited for input,
plus a plain sequential read (x and y chunk by chunk) of the remote store.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit


@contextlib.contextmanager
def _endpoint(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    """(store URL, proxy) with the AWS environment pointed through the proxy."""
    from distnet.bench.netproxy import (  # noqa: PLC0415
        FaultProxy,
        make_bucket,
        s3_env,
        start_s3_server,
    )

    saved = dict(os.environ)
    try:
        with contextlib.ExitStack() as stack:
            if args.s3_server:
                endpoint = stack.enter_context(start_s3_server())
                make_bucket(endpoint, "distnet-bench")
                os.environ.update(s3_env(endpoint))
                url = "s3://distnet-bench/loader"
            else:
                url = args.url
            parts = urlsplit(url)
            if parts.scheme in ("http", "https"):
                upstream = f"http://{parts.netloc}"
            else:
                upstream = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                    "AWS_ENDPOINT_URL", ""
                )
            if not upstream.startswith("http://"):
                raise SystemExit(
                    "distnet bench loader: --latency-ms needs a plain-HTTP endpoint to put a "
                    "proxy in front of (AWS_ENDPOINT_URL=http://..., an http:// store, or "
                    f"--s3-server); got {upstream or 'none'!r}"
                )
            proxy = FaultProxy(upstream)
            stack.callback(proxy.close)
            if parts.scheme in ("http", "https"):
                url = urlunsplit(("http", f"127.0.0.1:{proxy.port}", *parts[2:]))
            else:
                os.environ["AWS_ENDPOINT_URL"] = proxy.url
                os.environ.pop("AWS_ENDPOINT_URL_S3", None)
            yield url, proxy
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _plain_remote(ds: Any) -> float:
    t = time.perf_counter()
    for i in range(ds.num_chunks):
        ds.read_chunk(i)
    return len(ds) / (time.perf_counter() - t)


def run_remote(args: argparse.Namespace, local: Any, write_blocks: Any, stall: Any) -> dict:
    """The remote rounds; ``local`` is the local store, ``write_blocks(path, shard_chunks)``
    writes the same content to ``path``, ``stall(ds)`` runs the consumer on a store."""
    from distnet.data import DatasetError, open_dataset  # noqa: PLC0415

    latencies = args.latency_ms or [0.0]
    with _endpoint(args) as (url, proxy):
        try:
            remote = open_dataset(url)
            if remote.shape != local.shape or remote.shard_chunks != args.shard_chunks:
                raise DatasetError(url, "another shape or sharding")
        except DatasetError:
            t = time.perf_counter()
            remote = write_blocks(url, args.shard_chunks)
            print(f"wrote {url} in {time.perf_counter() - t:.1f} s")
        rows: dict[str, list[dict]] = {"local": []}
        for r in range(args.rounds):
            s = stall(local)
            rows["local"].append(s)
            print(f"round {r + 1}: local store: waited {100 * s['wait_fraction']:.2f}%")
            for ms in latencies:
                proxy.latency_s = ms / 1000
                plain = _plain_remote(remote)
                s = stall(remote)
                s["plain_samples_per_s"] = plain
                s["requests"] = proxy.requests
                rows.setdefault(f"{ms:g}", []).append(s)
                print(
                    f"round {r + 1}: {url} +{ms:g} ms/request: plain read {plain:,.0f} "
                    f"samples/s; consumer waited {100 * s['wait_fraction']:.2f}% "
                    f"({100 * s['steady_wait_fraction']:.2f}% after the first batch), "
                    f"read-ahead up to {s.get('read_ahead_depth', '?')} windows"
                )
            proxy.latency_s = 0.0
    out: dict[str, Any] = {"url": url, "shard_chunks": args.shard_chunks, "rounds": args.rounds}
    for key, runs in rows.items():
        out[key] = {
            "wait_fraction_median": statistics.median(x["wait_fraction"] for x in runs),
            "steady_wait_fraction_median": statistics.median(
                x["steady_wait_fraction"] for x in runs
            ),
            "wait_fraction_max": max(x["wait_fraction"] for x in runs),
            "step_s_median": statistics.median(x["run_s"] / max(1, x["batches"]) for x in runs),
            "runs": runs,
        }
        if key != "local":
            out[key]["plain_samples_per_s_median"] = statistics.median(
                x["plain_samples_per_s"] for x in runs
            )
    return out
