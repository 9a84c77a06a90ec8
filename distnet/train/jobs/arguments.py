"""The command line of ``distnet train JOB.toml``: its options, and the ``[dist]`` values the
Ray engine's options give (``dist_overrides``), laid over the job file like ``--set``.

The choices and the defaults named in the help come from the job spec (``jobspec.DistSpec``),
the one place that declares the ``[dist]`` keys; an option left out keeps the file's value,
else the spec's default. The Ray engine itself (``distnet.parallel.rayengine``) reads only the
loaded job and knows no command line.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from distnet.parallel.strategy import STRATEGIES
from distnet.train.jobs.jobspec import DistSpec

RAY_OPTIONS = ("workers", "address", "gpus_per_worker", "cpu_workers", "min_workers", "strategy")
"""The ``[dist]`` keys the Ray engine's options set (``--gpus-per-worker`` for
``gpus_per_worker``)."""


def _default(key: str) -> Any:
    return DistSpec.model_fields[key].default


def _choices(key: str) -> list[str]:
    """The values a ``Literal`` key of ``[dist]`` accepts."""
    return [str(v) for v in typing.get_args(DistSpec.model_fields[key].annotation)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distnet train``."""
    parser.add_argument("job", help="job description (TOML)")
    parser.add_argument("--out", help="run directory (overrides [run] out)")
    parser.add_argument("--engine", choices=_choices("engine"), help="overrides [dist] engine")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key, value in TOML syntax (repeatable): --set pretrain.epochs=5",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--restart", action="store_true", help="empty the run directory first")
    add_ray_arguments(parser)
    parser.add_argument(
        "--trace", action="store_true", help="write RUN_DIR/trace.json, a per-rank timeline"
    )
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved job (after --set and defaults) as TOML and exit",
    )  # fmt: skip


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers``, ``--address``, ``--gpus-per-worker``, ``--cpu-workers``, ``--min-workers``,
    ``--strategy``: each overrides its ``[dist]`` key."""
    ray = parser.add_argument_group("Ray engine (--engine ray)")
    ray.add_argument(
        "--workers", type=int,
        help=f"workers (GPU workers with --gpus-per-worker; default {_default('workers')})",
    )  # fmt: skip
    ray.add_argument("--address", help="join this Ray cluster (default: start a local one)")
    ray.add_argument(
        "--gpus-per-worker", type=float,
        help=f"GPUs per GPU worker (default {_default('gpus_per_worker')})",
    )  # fmt: skip
    ray.add_argument(
        "--cpu-workers", type=int,
        help=f"CPU workers beside the GPU ones (default {_default('cpu_workers')})",
    )  # fmt: skip
    ray.add_argument(
        "--min-workers", type=int,
        help=f"fewest workers the job may carry on with (default {_default('min_workers')}: all)",
    )  # fmt: skip
    ray.add_argument(
        "--strategy", choices=list(STRATEGIES),
        help=f"overrides [dist] strategy (default {_default('strategy')})",
    )  # fmt: skip


def dist_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``[dist]`` values given on the command line by the Ray engine's options."""
    return {n: getattr(args, n) for n in RAY_OPTIONS if getattr(args, n, None) is not None}


def command_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """What ``--out``, ``--engine`` and the Ray engine's options lay over the job file, as
    ``section -> key -> value`` (``--set`` comes on top, parsed by ``jobspec.parse_override``)."""
    overrides: dict[str, dict[str, Any]] = {}
    if args.out:
        overrides["run"] = {"out": args.out}
    dist = ({"engine": args.engine} if args.engine else {}) | dist_overrides(args)
    if dist:
        overrides["dist"] = dist
    return overrides
