"""``distnet bench ps --strategy hybrid``: step time of ps vs hybrid vs allreduce on Ray.

    distnet bench ps --strategy hybrid --workers 4 --workers-per-node 2 --shards 1,2

Every contender runs in the same 4 Ray worker actors of the Ray engine (``RayJob``, one
``RayCommunicator`` group), each with its own replica of the 784-1000-1000-1000-10 MLP
(2,797,010 float32) and a fixed gradient, in alternating rounds after a warm-up:

- ``allreduce``: ``DistributedOptimizer`` (bucketed reduce-scatter + all-gather through the
  object store), then SGD on every worker;
- ``ps-S``: ``ParameterServerOptimizer``, W pushes and pulls per step to S shards (SGD on them);
- ``hybrid-S``: ``HybridOptimizer``, reduce to each "node" leader (``--workers-per-node``
  consecutive ranks), K = W / L pushes and pulls, broadcast in the node.

A step is one ``opt.step()`` (communication and update; the gradient is restored before each
step, outside the timing); a round's time is the slowest worker's mean. Ratios are per round
against ``ps`` at the same shard count and against ``allreduce``; median with min/max.

On one machine the "nodes" share one object store and the same cores, so the intra-node
reduce is no cheaper than a push: this measures the cost of the extra stage, not the network
saving. What hybrid saves on a real cluster is computed: the bytes into the shards per step
drop from W M to K M.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

import numpy as np

from distnet.bench.ps import MLP, layer_shapes

# per worker-actor process: contender key -> (wrapped optimiser, plain SGD, fixed gradient)
_STATE: dict[str, Any] = {}


def _attach(comm: Any, key: str, kind: str, ps: Any, workers_per_node: int) -> int:
    """Builds this worker's replica and ``kind``'s optimiser over it (runs in the actor)."""
    from distnet import backend
    from distnet.nn import Dense, Sequential
    from distnet.optim import SGD
    from distnet.parallel import DistributedOptimizer
    from distnet.parallel.ps import HybridOptimizer, ParameterServerOptimizer
    from distnet.parallel.rayengine.groups import node_groups

    backend.seed(0)
    layers = [Dense(a, b, activation="relu") for a, b in zip(MLP[:-2], MLP[1:-1], strict=True)]
    sgd = SGD(Sequential(*layers, Dense(MLP[-2], MLP[-1])), lr=1e-3)
    grad = np.random.default_rng(comm.rank).standard_normal(sgd.flat_grads.size)
    grad = (grad * 1e-4).astype(np.float32)
    if kind == "allreduce":
        opt: Any = DistributedOptimizer(sgd, comm)
    elif kind == "ps":
        opt = ParameterServerOptimizer(sgd, ps, comm.rank)
    else:
        if "groups" not in _STATE:  # one node group per worker for the whole run
            _STATE["groups"] = node_groups(comm, workers_per_node)
        g = _STATE["groups"]
        opt = HybridOptimizer(sgd, g.node, ps, g.node_index, num_workers=comm.size)
    _STATE[key] = (opt, sgd, grad)
    return sgd.flat_params.size


def _steps(comm: Any, key: str, steps: int) -> float:
    """Mean seconds of ``opt.step()`` over ``steps`` steps (collective over the group)."""
    import time

    opt, sgd, grad = _STATE[key]
    comm.barrier()
    total = 0.0
    for _ in range(steps):
        sgd.flat_grads[...] = grad  # every step reduces the same gradient
        t0 = time.perf_counter()
        opt.step(batch_share=1.0)  # a plain sum everywhere, as the ps bench does
        total += time.perf_counter() - t0
    return total / steps


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_hybrid(args: argparse.Namespace) -> int:
    """Runs the rounds on a local Ray; prints and (``--json``) writes the step times."""
    import ray

    from distnet.parallel.ps import ParameterServer
    from distnet.parallel.rayengine import RayJob, RayOptions, worker_specs

    shard_counts = [int(s) for s in str(args.shards).split(",") if s]
    per_node = int(args.workers_per_node)
    if args.workers < 2 or per_node < 1 or args.workers % per_node or not shard_counts:
        print(
            "distnet bench ps --strategy hybrid: --workers (>= 2) must be a multiple of "
            "--workers-per-node (>= 1), --shards positive",
            file=sys.stderr,
        )
        return 2
    nodes = args.workers // per_node
    floats = sum(int(np.prod(s)) for s in layer_shapes())
    flat = np.zeros(floats, np.float32)
    job = RayJob(RayOptions(workers=worker_specs(args.workers)))
    servers: list[Any] = []
    started = False
    try:
        from distnet.parallel.rayengine import start_ray

        # one logical CPU per worker, as the Ray engine asks (more workers than cores here)
        cpus = max(os.cpu_count() or 1, args.workers)
        started = start_ray(None, num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        job._place()
        job._setup_group()
        contenders = [("allreduce", "allreduce", None)]
        for s in shard_counts:
            for kind, pushers in (("ps", args.workers), ("hybrid", nodes)):
                ps = ParameterServer.create(
                    flat, shards=s, mode="sync", num_workers=pushers,
                    optimizer={"name": "sgd", "lr": 1e-3}, timeout_s=600,
                )  # fmt: skip
                servers.append(ps)
                contenders.append((f"{kind}-{s}", kind, ps))
        for key, kind, ps in contenders:
            refs = [a.apply.remote(_attach, key, kind, ps, per_node) for a in job.actors]
            ray.get(refs, timeout=600)
        times: dict[str, list[float]] = {key: [] for key, _, _ in contenders}
        for rnd in range(args.rounds + 1):  # round 0 is the warm-up
            for key, _, _ in contenders:
                refs = [a.apply.remote(_steps, key, args.steps) for a in job.actors]
                ms = 1e3 * max(ray.get(refs, timeout=600))
                if rnd:
                    times[key].append(ms)
            last = ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in times.items() if rnd)
            print(f"round {rnd}: {last or 'warm-up'}", flush=True)
    finally:
        for ps in servers:
            ps.shutdown()
        job.stop()
        if started:
            ray.shutdown()
    result = _report(args, times, shard_counts, nodes, floats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _report(
    args: argparse.Namespace,
    times: dict[str, list[float]],
    shard_counts: list[int],
    nodes: int,
    floats: int,
) -> dict[str, Any]:
    mb = floats * 4 / 1e6
    result: dict[str, Any] = {
        "benchmark": "ps-hybrid",
        "floats": floats,
        "workers": args.workers,
        "workers_per_node": args.workers_per_node,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "step_ms": {k: _summary(v) for k, v in times.items()},
        "mb_into_shards_per_step": {"ps": args.workers * mb, "hybrid": nodes * mb},
        "hybrid_over_ps": {},
        "hybrid_over_allreduce": {},
    }
    print(
        f"step time (communication + update), {floats:,} float32, {args.workers} workers, "
        f"{nodes} 'nodes' of {args.workers_per_node} (median of {args.rounds} rounds, ratios "
        "per round)"
    )
    base = times["allreduce"]
    print(f"  allreduce: {statistics.median(base):.1f} ms")
    for s in shard_counts:
        ps, hy = times[f"ps-{s}"], times[f"hybrid-{s}"]
        vs_ps = _summary([a / b for a, b in zip(hy, ps, strict=True)])
        vs_ar = _summary([a / b for a, b in zip(hy, base, strict=True)])
        result["hybrid_over_ps"][str(s)] = vs_ps
        result["hybrid_over_allreduce"][str(s)] = vs_ar
        print(
            f"  {s} shard(s): ps {statistics.median(ps):.1f} ms, hybrid "
            f"{statistics.median(hy):.1f} ms: hybrid/ps x{vs_ps['median']:.2f} "
            f"(min {vs_ps['min']:.2f}, max {vs_ps['max']:.2f}), hybrid/allreduce "
            f"x{vs_ar['median']:.2f} (min {vs_ar['min']:.2f}, max {vs_ar['max']:.2f})"
        )
    print(
        f"  into the shards per step: ps {args.workers * mb:.1f} MB, hybrid {nodes * mb:.1f} MB "
        f"(x{args.workers_per_node} fewer; the same out of them)"
    )
    return result
