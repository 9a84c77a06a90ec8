"""``distnet bench trace``: what the timeline and the metrics cost a training step.

The same ``fit`` epochs of a small MLP (small, so that per-step costs show most) in three
modes, rounds alternating: ``off`` (no tracer, no timers: every span is one shared null
context), ``metrics`` (the timers and the JSONL ``MetricsLogger`` every job runs) and
``trace`` (metrics plus the tracer recording every span). Prints per-step times and the
ratio of each mode to ``off`` (median of per-round ratios, with min and max); then the
cost of one ``trace.span`` when off and when on, in nanoseconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import numpy as np

MODES = ("off", "metrics", "trace")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the trace benchmark."""
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=200, help="steps per round and mode")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)


def _epoch_seconds(mode: str, model: Any, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    from distnet import trace  # noqa: PLC0415
    from distnet.train import fit  # noqa: PLC0415
    from distnet.train.loop.metrics import MetricsLogger  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        callbacks = [MetricsLogger(tmp, 0, "bench")] if mode != "off" else []
        if mode == "trace":
            trace.start(tmp, 0)
        t0 = time.perf_counter()
        fit(model, x, y, batch_size=batch, epochs=1, callbacks=callbacks, seed=0,
            optimizer="sgd", shuffle=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        trace.stop()
        trace.disable_timers()
    return seconds


def _span_ns(n: int = 200_000) -> float:
    from distnet import trace  # noqa: PLC0415

    t0 = time.perf_counter()
    for _ in range(n):
        with trace.span("forward"):
            pass
    return (time.perf_counter() - t0) / n * 1e9


def run(args: argparse.Namespace) -> int:
    """Prints the table; 0."""
    from distnet import nn, trace  # noqa: PLC0415

    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    x = rng.normal(size=(n, 64)).astype(np.float32)
    y = rng.integers(0, 10, n)
    model = nn.Sequential(nn.Dense(64, args.hidden, "relu"), nn.Dense(args.hidden, 10))
    for mode in MODES:  # warm-up
        _epoch_seconds(mode, model, x[: 4 * args.batch], y[: 4 * args.batch], args.batch)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        order = MODES[r % 3 :] + MODES[: r % 3]  # alternate which mode goes first
        for mode in order:
            times[mode].append(_epoch_seconds(mode, model, x, y, args.batch))
    print(f"fit of MLP 64-{args.hidden}-10, batch {args.batch}, {args.steps} steps, "
          f"{args.rounds} rounds")  # fmt: skip
    print(f"{'mode':<8} {'us/step (median)':>17} {'ratio to off: median [min, max]':>34}")
    for mode in MODES:
        ratios = [t / o for t, o in zip(times[mode], times["off"], strict=True)]
        per_step = statistics.median(times[mode]) / args.steps * 1e6
        print(f"{mode:<8} {per_step:17.1f}   {statistics.median(ratios):8.4f} "
              f"[{min(ratios):.4f}, {max(ratios):.4f}]")  # fmt: skip
    off = _span_ns()
    trace.enable_timers()
    timers = _span_ns()
    with tempfile.TemporaryDirectory() as tmp:
        trace.start(tmp, 0)
        on = _span_ns(50_000)
        trace.stop()
    trace.disable_timers()
    print(f"one trace.span: off {off:.0f} ns, timers {timers:.0f} ns, tracer {on:.0f} ns")
    return 0
