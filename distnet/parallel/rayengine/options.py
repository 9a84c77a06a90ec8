"""What a Ray job is asked to be (``RayOptions``, one ``WorkerSpec`` per worker) and how Ray is
started or joined (``start_ray``). ``options_from_job`` makes them from a loaded job's
``[dist]`` table, where the command line's options (``distnet.train.jobs.arguments``) are
already laid over the file's keys and the spec's defaults; ``driver.py`` runs them.

Job keys (``[dist]``): ``engine = "ray"``, ``strategy`` ("allreduce", "ps", "hybrid" or
"local_sgd"; hybrid: allreduce inside a node, parameter server across nodes;
``workers_per_node`` > 0 makes consecutive ranks "nodes" instead of the Ray nodes the workers
landed on), ``mode`` ("sync", "async", "ssp"), ``staleness``, ``shards``, ``workers``,
``cpu_workers``, ``gpus_per_worker``, ``min_workers``, ``placement`` ("PACK"/"SPREAD"),
``address``, ``rebalance_every`` (steps between throughput measurements), ``devices`` (a list
such as ``["cuda", "cpu", "cpu"]``, instead of workers/cpu_workers), ``worker_resources``
(custom Ray resources, one table per worker, e.g. ``[{node_a = 1}, {node_b = 1}]`` to pin
worker 0 to the node started with ``--resources='{"node_a": 4}'`` and worker 1 to node_b),
``survivors_go_on`` (async/ssp ps: a lost worker is replaced while the others go on; false:
the group restarts), ``replicas`` (ps/hybrid: copies of each shard, 1 or 2; "auto": 2 where
the cluster has several live nodes, else 1, resolved where each server is made).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from distnet.parallel.ps.autostale import staleness_bound
from distnet.parallel.ps.shardplace import check_replicas
from distnet.parallel.strategy import STRATEGIES


class RayEngineError(RuntimeError):
    """The Ray engine cannot run the job as asked (names what and why)."""


@dataclass
class WorkerSpec:
    """One worker: its resources and what its ``RayRankEngine`` gets."""

    device: str = "cpu"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    delay_per_sample_s: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources


# resources that WorkerSpec's own fields (or Ray itself) set: never custom ones
RESERVED_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def check_custom_resources(resources: dict[str, float], where: str) -> dict[str, float]:
    """``resources`` as floats, or RayEngineError naming ``where`` and the bad entry."""
    out = {}
    for name, amount in resources.items():
        if not isinstance(name, str) or not name or name in RESERVED_RESOURCES:
            raise RayEngineError(
                f"{where}: resource name {name!r} is not a custom resource "
                f"(CPU/GPU come from cpus/gpus_per_worker)"
            )
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not amount > 0:
            raise RayEngineError(f"{where}: resource {name!r} needs an amount > 0, got {amount!r}")
        out[name] = float(amount)
    return out


@dataclass
class RayOptions:
    """How to run a job on Ray (the command line and ``[dist]`` fill it)."""

    workers: list[WorkerSpec] = field(default_factory=lambda: [WorkerSpec(), WorkerSpec()])
    address: str | None = None
    min_workers: int | None = None  # None: all of them
    placement: str = "PACK"
    strategy: str = "allreduce"
    ps: dict[str, Any] = field(default_factory=dict)
    rebalance_every: int = 200
    max_failures: int = 3
    replace_lost: bool = True  # False: carry on with the survivors (>= min_workers)
    collective_timeout_s: float = 300.0
    start_timeout_s: float = 120.0
    replace_timeout_s: float = 60.0
    fail_at_step: dict[int, int] = field(default_factory=dict)  # rank -> step (tests)
    # fault injection (tests): {"generation", "rank", "step", "action": "exit" | "sigkill" |
    # "raise" | "kill_shard", "shard", "delay_s"}: at that step of that generation the rank
    # exits, SIGKILLs its own process, raises a RuntimeError, or SIGKILLs the stage's
    # parameter-server shard after delay_s (a timer: mid-way through the next step); step may
    # also be "start" (before the job's first collective) or "resumed" (the carry applied)
    faults: list[dict[str, Any]] = field(default_factory=list)
    sample_log: str | None = None  # directory (tests)
    ray_init: dict[str, Any] = field(default_factory=dict)  # extra ray.init arguments
    trace: bool = False  # every worker writes its timeline (RUN_DIR/trace.json)
    mid_epoch_resume: bool = True  # False: after a lost worker, redo the epoch (checkpoint)
    # async/ssp ps: a lost worker is replaced while the others go on (standin.py)
    survivors_go_on: bool = True


def worker_specs(
    workers: int, gpus_per_worker: float = 0, cpu_workers: int = 0, cpus_per_worker: float = 1
) -> list[WorkerSpec]:
    """``workers`` GPU workers (``gpus_per_worker`` > 0) plus ``cpu_workers`` CPU ones, or
    ``workers`` CPU workers."""
    if workers < 0 or cpu_workers < 0 or workers + cpu_workers < 1:
        raise RayEngineError(f"need at least one worker, got {workers} + {cpu_workers} CPU")
    if gpus_per_worker > 0:
        gpu = [WorkerSpec("cuda", cpus_per_worker, gpus_per_worker) for _ in range(workers)]
        return gpu + [WorkerSpec("cpu", cpus_per_worker) for _ in range(cpu_workers)]
    return [WorkerSpec("cpu", cpus_per_worker) for _ in range(workers + cpu_workers)]


def start_ray(address: str | None, **init_args: Any) -> bool:
    """Connects to Ray; returns True when this call started a local instance (to shut down).

    A local instance keeps token authentication on: distnet refuses to run one with
    ``RAY_AUTH_MODE`` set to anything but ``token`` (Ray 2.60 turns it on by default for
    ``ray.init()`` and writes the token to ``~/.ray/auth_token``). Its dashboard is off, and
    its workers run at nice 0 (``RAY_worker_niceness``, unless set; Ray's default is 15).
    Ray 2.60 itself listens on every interface (it replaces 127.0.0.1 by the node's address
    on purpose, ``services.resolve_ip_for_localhost``): the token is what guards it.
    """
    import ray  # noqa: PLC0415

    mode = os.environ.get("RAY_AUTH_MODE")
    if address is None and mode is not None and mode.lower() != "token":
        raise RayEngineError(
            f"RAY_AUTH_MODE={mode}: distnet runs local Ray clusters only with token "
            "authentication (unset RAY_AUTH_MODE or set it to 'token')"
        )
    if address is not None:
        _check_reachable(address)
    if ray.is_initialized():
        return False
    where = "a local Ray" if address is None else f"the Ray cluster at {address}"
    if address is None:
        init_args.setdefault("include_dashboard", False)
        # Ray starts its workers at nice 15 (``worker_niceness``, to keep its raylet and GCS
        # responsive): beside one busy process at nice 0 a worker got ~3% of a core, and a job
        # on a shared machine crawled. distnet's workers are the job, and run at nice 0 as
        # mpiexec's and torchrun's ranks do (Ray's job supervisor does the same for itself).
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(address=address or "local", logging_level="warning", **init_args)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        raise RayEngineError(f"could not start or join {where}: {e}") from None
    except Exception as e:  # Ray raises a bare Exception when its node times out at start-up
        if type(e) is not Exception:
            raise
        raise RayEngineError(f"could not start or join {where}: {e}") from None
    return address is None


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A ``host:port`` address must accept a TCP connection (Ray would retry for minutes)."""
    import socket  # noqa: PLC0415

    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto", ray://...: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayEngineError(f"--address {address}: nothing answers there ({e})") from None


def options_from_job(job: dict[str, Any]) -> RayOptions:
    """``RayOptions`` from a loaded job's ``[dist]`` section (names the bad key). The section
    comes with every key filled in by the job spec, whose defaults are the only ones
    (``distnet.train.jobs.jobspec.DistSpec``); a section lacking a key this engine reads is
    refused by that key's name. Which keys only this engine reads is said once, by the job spec
    (``distnet.train.jobs.distconflicts.RAY_ONLY_KEYS``, one layer up: this module reads the
    keys and holds no list of them)."""
    try:
        return _options(job["dist"])
    except KeyError as e:
        raise RayEngineError(
            f"[dist] lacks {e.args[0]}: the Ray options are made from a job loaded through the "
            "job spec, which fills in every default"
        ) from None


def _options(d: dict[str, Any]) -> RayOptions:
    """``options_from_job`` for a ``[dist]`` table ``d`` (KeyError: a key it lacks)."""
    if d["strategy"] not in STRATEGIES:  # the strategy factory's registry
        raise RayEngineError(
            f"[dist] strategy must be one of {', '.join(map(repr, STRATEGIES))}, got "
            f"{d['strategy']!r}"
        )
    if d["mode"] not in ("sync", "async", "ssp"):
        raise RayEngineError(f"[dist] mode must be 'sync', 'async' or 'ssp', got {d['mode']!r}")
    try:  # "auto" (the default), 1 or 2
        check_replicas(d["replicas"])
    except ValueError as e:
        raise RayEngineError(f"[dist] {e}") from None
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
            "replicas": d["replicas"],  # "auto": resolved where the server is made
        },  # fmt: skip
        # rebalance = false: no re-split (Ray's "auto" re-splits at every measurement)
        rebalance_every=0 if d.get("rebalance") is False else int(d["rebalance_every"]),
        survivors_go_on=bool(d["survivors_go_on"]),
    )
