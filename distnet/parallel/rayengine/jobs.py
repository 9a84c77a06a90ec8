"""``distnet train JOB.toml --engine ray``: command-line options and ``[dist]`` keys of the
Ray engine, turned into ``RayOptions``.

Job keys (``[dist]``): ``engine = "ray"``, ``strategy`` ("allreduce", "ps" or "hybrid":
allreduce inside a node, parameter server across nodes; ``workers_per_node`` > 0 makes
consecutive ranks "nodes" instead of the Ray nodes the workers landed on), ``mode``
("sync", "async", "ssp"), ``staleness``, ``shards``, ``workers``, ``cpu_workers``,
``gpus_per_worker``, ``min_workers``, ``placement`` ("PACK"/"SPREAD"), ``address``,
``rebalance_every`` (steps between throughput measurements), ``devices`` (a list such as
``["cuda", "cpu", "cpu"]``, instead of workers/cpu_workers), ``worker_resources`` (custom
Ray resources, one table per worker, e.g. ``[{node_a = 1}, {node_b = 1}]`` to pin worker 0
to the node started with ``--resources='{"node_a": 4}'`` and worker 1 to node_b),
``survivors_go_on`` (async/ssp ps: a lost worker is replaced while the others go on; false:
the group restarts). Command-line options win.
"""

from __future__ import annotations

import argparse
from typing import Any

from distnet.parallel.ps.autostale import staleness_bound
from distnet.parallel.rayengine.options import (
    RayEngineError,
    RayOptions,
    WorkerSpec,
    check_custom_resources,
    worker_specs,
)
from distnet.parallel.strategy import STRATEGIES

RAY_DIST_KEYS: dict[str, Any] = {
    "strategy": "allreduce", "mode": "sync", "staleness": 0, "shards": 1, "workers": 2,
    "cpu_workers": 0, "gpus_per_worker": 0, "min_workers": 0, "placement": "PACK",
    "address": None, "rebalance_every": 200, "devices": [], "worker_resources": [],
    "workers_per_node": 0, "survivors_go_on": True,
}  # fmt: skip


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers``, ``--address``, ``--gpus-per-worker``, ``--cpu-workers``, ``--min-workers``."""
    ray = parser.add_argument_group("Ray engine (--engine ray)")
    ray.add_argument("--workers", type=int, help="workers (GPU workers with --gpus-per-worker)")
    ray.add_argument("--address", help="join this Ray cluster (default: start a local one)")
    ray.add_argument("--gpus-per-worker", type=float, help="GPUs per GPU worker")
    ray.add_argument("--cpu-workers", type=int, help="CPU workers beside the GPU ones")
    ray.add_argument("--min-workers", type=int, help="fewest workers the job may carry on with")
    ray.add_argument("--strategy", choices=list(STRATEGIES), help="overrides [dist] strategy")


def dist_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``[dist]`` values given on the command line."""
    names = ("workers", "address", "gpus_per_worker", "cpu_workers", "min_workers", "strategy")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def options_from_job(job: dict[str, Any]) -> RayOptions:
    """``RayOptions`` from a loaded job's ``[dist]`` section (names the bad key)."""
    d = {**RAY_DIST_KEYS, **{k: v for k, v in job["dist"].items() if v is not None}}
    if d["strategy"] not in STRATEGIES:  # the strategy factory's registry
        raise RayEngineError(
            f"[dist] strategy must be one of {', '.join(map(repr, STRATEGIES))}, got "
            f"{d['strategy']!r}"
        )
    if d["mode"] not in ("sync", "async", "ssp"):
        raise RayEngineError(f"[dist] mode must be 'sync', 'async' or 'ssp', got {d['mode']!r}")
    if int(d["workers_per_node"]) < 0:
        raise RayEngineError(f"[dist] workers_per_node must be >= 0, got {d['workers_per_node']}")
    if d["devices"]:
        bad = [x for x in d["devices"] if x not in ("cpu", "cuda")]
        if bad:
            raise RayEngineError(f"[dist] devices: {bad} are not 'cpu' or 'cuda'")
        gpus = float(d["gpus_per_worker"] or 1)
        specs = [WorkerSpec(x, 1.0, gpus if x == "cuda" else 0.0) for x in d["devices"]]
    else:
        specs = worker_specs(int(d["workers"]), float(d["gpus_per_worker"]), int(d["cpu_workers"]))
    pins = list(d["worker_resources"])
    if pins and len(pins) != len(specs):
        raise RayEngineError(
            f"[dist] worker_resources has {len(pins)} table(s), one per worker is needed "
            f"({len(specs)} workers)"
        )
    for i, (spec, pin) in enumerate(zip(specs, pins, strict=False)):
        spec.resources = check_custom_resources(dict(pin), f"[dist] worker_resources[{i}]")
    return RayOptions(
        workers=specs,
        address=d["address"] or None,
        min_workers=int(d["min_workers"]) or None,
        placement=str(d["placement"]),
        strategy=d["strategy"],
        ps={
            "mode": d["mode"],
            "staleness": staleness_bound(d["staleness"]),
            "shards": int(d["shards"]),
            "workers_per_node": int(d["workers_per_node"]),
        },  # fmt: skip
        # rebalance = false: no re-split (Ray's "auto" re-splits at every measurement)
        rebalance_every=0 if d.get("rebalance") is False else int(d["rebalance_every"]),
        survivors_go_on=bool(d["survivors_go_on"]),
    )
