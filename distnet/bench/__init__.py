"""``distnet bench <name>``: speed measured as ratios against a baseline in the same run.

Each benchmark module provides ``add_arguments(parser)`` and ``run(args) -> int``; see
docs/benchmarks.md (one framework per process, alternating rounds).
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "core": ("distnet.bench.step", "training steps vs hand-written numpy, and PyTorch if present"),
    "loader": ("distnet.bench.loader", "StreamLoader vs a plain sequential zarr read"),
    "allreduce": ("distnet.bench.allreduce", "bucketed gradient allreduce vs raw MPI_Allreduce"),
    "trace": ("distnet.bench.trace", "cost of metrics and the timeline per training step"),
    "ps": ("distnet.bench.ps", "sharded Ray parameter server vs Ray's example (one actor)"),
    "network": ("distnet.bench.network", "allreduce latency/bandwidth sweep, flat vs hierarchical"),
    "e2e": ("distnet.bench.e2e", "a whole stacked-autoencoder job vs the same recipe in PyTorch"),
    "elastic": ("distnet.bench.elastic", "a Ray worker's death: mid-epoch resume vs epoch redone"),
    "bigstore": ("distnet.bench.bigstore", "a store far larger than memory through a 2-rank job"),
    "chaos": ("distnet.bench.chaos", "a ps job with a process SIGKILLed every N s vs undisturbed"),
    "uneven": ("distnet.bench.uneven", "slowed workers: equal/throughput shares, ssp, async"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``distnet bench NAME [options]``; NAME's own options are parsed by its module."""
    parser.add_argument(
        "benchmark",
        choices=sorted(BENCHMARKS),
        metavar="BENCHMARK",
        help=", ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()),
    )
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's options")


def run(args: argparse.Namespace) -> int:
    """Imports only the chosen benchmark, parses its options and runs it."""
    module_name, help_ = BENCHMARKS[args.benchmark]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"distnet bench {args.benchmark}", description=help_)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.options)) or 0)
