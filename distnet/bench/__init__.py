"""``distnet bench <name>``: speed measured as ratios against a baseline in the same run.

Each benchmark module provides ``add_arguments(parser)`` and ``run(args) -> int``; see
shared BENCHMARKING notes in README (one framework per process, alternating rounds).
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "core": ("distnet.bench.core", "MLP and autoencoder training steps vs hand-written numpy"),
    "loader": ("distnet.bench.loader", "StreamLoader vs a plain sequential zarr read"),
    "allreduce": ("distnet.bench.allreduce", "bucketed gradient allreduce vs raw MPI_Allreduce"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one sub-parser per benchmark."""
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module_name, help_) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Runs the chosen benchmark."""
    return int(importlib.import_module(args._module).run(args) or 0)
