"""``distnet bench ps --workers 4 --shards 1,2,4``: parameter-server updates per second.

Contenders, each in its own Ray actors (one framework per process), alternating rounds after a
warm-up, on the gradients of the 784-1000-1000-1000-10 MLP (2,797,010 float32):

- ``baseline``: the pattern of Ray's documentation example "Parameter Server" (Ray Core
  examples), written here: one unsharded server actor; workers take the whole weight list,
  return whole gradient lists; the server sums them, steps (SGD) and returns the whole weight
  list, which the driver hands to every worker for the next step. ``sync``: the driver waits
  for all workers each step; ``async``: the driver applies each gradient as it arrives
  (``ray.wait``) and hands that worker the new weights.
- ``ps-S``: distnet's ``ParameterServer`` with S shards and the same SGD on the shards;
  workers run ``ParameterServerOptimizer.step()`` in a loop on a real distnet MLP replica with a
  fixed gradient (no forward/backward: only the parameter-server traffic and update count).

An update is one applied step: a global step in ``sync``, one worker's gradient in ``async``.
``--compare-optimizer`` adds ``sync`` Adam with the optimiser on the shards vs summing shards
with Adam on every worker (BytePS), at the first shard count >= 2.
Reports medians of per-round ratios with min/max; ``--json FILE`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np

from distnet.bench.ps_replicas import ROADS, replica_contenders, replication_report, road_seen

MLP = (784, 1000, 1000, 1000, 10)


def layer_shapes(widths: tuple[int, ...] = MLP) -> list[tuple[int, ...]]:
    """Shapes of W and b of each Dense layer, in parameters() order."""
    shapes: list[tuple[int, ...]] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        shapes += [(a, b), (b,)]
    return shapes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distnet bench ps``."""
    parser.add_argument("--workers", type=int, default=4, help="workers (default 4)")
    parser.add_argument("--shards", default="1,2,4", help="shard counts (default 1,2,4)")
    parser.add_argument("--modes", default="sync,async", help="modes (default sync,async)")
    parser.add_argument(
        "--replicas", default="1", help="replicas per shard, e.g. 1,2 (ps_replicas.py)"
    )
    parser.add_argument(
        "--road", choices=list(ROADS), default="shm",
        help="object-store: every array by value (DISTNET_PS_SHM=0), as between nodes",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--steps", type=int, default=8, help="steps per worker and round")
    parser.add_argument(
        "--compare-optimizer", action="store_true", help="also: sync Adam on shards vs workers"
    )
    parser.add_argument(
        "--train-step", action="store_true",
        help="also: training step, ps sync vs MPI allreduce at 2 workers (--batch per worker)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=256, help="per-worker batch (--train-step)")
    parser.add_argument(
        "--strategy", choices=["ps", "hybrid"], default="ps",
        help="hybrid: step time of ps vs hybrid vs allreduce instead (distnet/bench/ps_hybrid.py)",
    )  # fmt: skip
    parser.add_argument("--workers-per-node", type=int, default=2, help="hybrid's 'nodes'")
    parser.add_argument("--json", help="write the results to this file")


# --- the baseline: Ray's documented parameter-server pattern ----------------------------------
class BaselineServer:
    """One actor with the whole model: sums whole gradient lists, steps, returns all weights."""

    def __init__(self, shapes: list[tuple[int, ...]], lr: float) -> None:
        rng = np.random.default_rng(0)
        self.weights = [rng.standard_normal(s).astype(np.float32) * 0.01 for s in shapes]
        self.lr = np.float32(lr)

    def apply_gradients(self, *gradients: list[np.ndarray]) -> list[np.ndarray]:
        summed = [np.sum(layer, axis=0) for layer in zip(*gradients, strict=True)]
        for w, g in zip(self.weights, summed, strict=True):
            w -= self.lr * g
        return self.get_weights()

    def get_weights(self) -> list[np.ndarray]:
        return self.weights


class BaselineWorker:
    """Sets the weights it is given and returns its (fixed) gradient as a list of arrays."""

    def __init__(self, shapes: list[tuple[int, ...]], seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.weights = [np.zeros(s, np.float32) for s in shapes]
        self.grads = [rng.standard_normal(s).astype(np.float32) * 1e-4 for s in shapes]

    def compute_gradients(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        for mine, new in zip(self.weights, weights, strict=True):
            mine[...] = new
        return self.grads


def baseline_sync(server: Any, workers: list[Any], steps: int) -> float:
    import ray

    t0 = time.perf_counter()
    weights = server.get_weights.remote()
    for _ in range(steps):
        grads = [w.compute_gradients.remote(weights) for w in workers]
        weights = server.apply_gradients.remote(*grads)
    ray.get(weights, timeout=600)
    return steps / (time.perf_counter() - t0)


def baseline_async(server: Any, workers: list[Any], steps: int) -> float:
    import ray

    t0 = time.perf_counter()
    weights = server.get_weights.remote()
    pending = {w.compute_gradients.remote(weights): w for w in workers}
    updates = steps * len(workers)
    for _ in range(updates):
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=600)
        worker = pending.pop(ready[0])
        weights = server.apply_gradients.remote(ready[0])
        pending[worker.compute_gradients.remote(weights)] = worker
    ray.get(weights, timeout=600)
    elapsed = time.perf_counter() - t0
    ray.get(list(pending), timeout=600)  # drain outside the timing
    return updates / elapsed


# --- distnet's sharded parameter server --------------------------------------------------------
class PSBenchWorker:
    """A distnet MLP replica with a fixed gradient that steps through the parameter server."""

    def __init__(self, seed: int) -> None:
        from distnet import backend
        from distnet.nn import Dense, Sequential
        from distnet.optim import SGD
        from distnet.parallel.ps import link

        backend.seed(seed)
        if link.enabled():  # as the Ray engine's ps workers: flat buffers in memfd files
            backend.set_flat_allocator(link.FLAT.zeros)
        layers = [Dense(a, b, activation="relu") for a, b in zip(MLP[:-2], MLP[1:-1], strict=True)]
        self.model = Sequential(*layers, Dense(MLP[-2], MLP[-1]))
        self.sgd = SGD(self.model, lr=0.01)
        rng = np.random.default_rng(seed)
        self.sgd.flat_grads[...] = rng.standard_normal(self.sgd.flat_grads.size) * 1e-4
        self.opts: dict[str, Any] = {}

    def flat(self) -> np.ndarray:
        return self.sgd.flat_params.copy()

    def attach(self, key: str, ps: Any, index: int, optimizer: str) -> int:
        from distnet.optim import Adam
        from distnet.parallel.ps import ParameterServerOptimizer

        local = Adam(self.model, lr=1e-4) if optimizer == "adam" else self.sgd
        self.opts[key] = ParameterServerOptimizer(local, ps, index)
        return index

    def train(self, key: str, steps: int, batch: int) -> float:
        """Seconds per real training step (forward, backward, push/pull) of the MLP."""
        from distnet.core.functional import cross_entropy

        opt = self.opts[key]
        rng = np.random.default_rng(opt.worker_index)
        x = rng.standard_normal((batch, MLP[0])).astype(np.float32)
        y = rng.integers(0, MLP[-1], batch)
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad()
            opt.backward(cross_entropy(self.model(x), y))
            opt.step()
        return (time.perf_counter() - t0) / steps

    def run(self, key: str, steps: int) -> float:
        opt = self.opts[key]
        t0 = time.perf_counter()
        for _ in range(steps):
            # the gradient buffer is never zeroed: the same gradient every step; share 1: the
            # gradient counts as weighted already (what backward(loss) does), as the
            # baseline's server sums without weights
            opt.step(batch_share=1.0)
        return time.perf_counter() - t0


def _ps_round(workers: list[Any], key: str, steps: int, mode: str) -> float:
    import ray

    t0 = time.perf_counter()
    ray.get([w.run.remote(key, steps) for w in workers], timeout=600)
    elapsed = time.perf_counter() - t0
    return (steps if mode == "sync" else steps * len(workers)) / elapsed


def _mpi_step_ms(steps: int, batch: int) -> float:
    """One ``distnet bench allreduce -np 2`` job's median DistributedOptimizer step (ms)."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "allreduce.json")
        cmd = [sys.executable, "-m", "distnet.bench.allreduce", "-np", "2", "--rounds", "1"]
        cmd += ["--reps", "1", "--steps", str(steps), "--batch", str(batch), "--json", out]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=600)
        with open(out) as f:
            return float(json.load(f)["training_step"]["step_ms"]["sync"])


def train_step_comparison(args: argparse.Namespace) -> dict[str, Any]:
    """Training step of the MLP at 2 workers: distnet ps sync (2 shards, SGD with momentum on
    the shards) in Ray actors vs ``DistributedOptimizer`` over MPI (``distnet bench
    allreduce``), alternating rounds; 1 BLAS thread per worker in both, as the MPI bench sets."""
    import ray

    from distnet.parallel.ps import ParameterServer

    one_thread = {"env_vars": {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}}
    workers = [
        ray.remote(num_cpus=0)(PSBenchWorker).options(runtime_env=one_thread).remote(k)
        for k in range(2)
    ]
    flat = np.concatenate([np.zeros(int(np.prod(s)), np.float32) for s in layer_shapes()])
    flat[...] = ray.get(workers[0].flat.remote(), timeout=600)
    cfg = {"name": "sgd", "lr": 1e-3, "momentum": 0.9}
    ps = ParameterServer.create(flat, shards=2, mode="sync", num_workers=2, optimizer=cfg)
    try:
        _attach(workers, "train", ps, "sgd")
        ratios, ps_ms, mpi_ms = [], [], []
        for rnd in range(args.rounds + 1):
            calls = [w.train.remote("train", args.steps, args.batch) for w in workers]
            per_worker = ray.get(calls, timeout=600)
            mine = 1e3 * max(per_worker)
            theirs = _mpi_step_ms(args.steps, args.batch)
            if rnd:
                ps_ms.append(mine)
                mpi_ms.append(theirs)
                ratios.append(mine / theirs)
            print(f"train-step round {rnd}: ps sync {mine:.1f} ms, MPI allreduce {theirs:.1f} ms")
    finally:
        ps.shutdown()
        for w in workers:
            ray.kill(w)
    return {
        "batch_per_worker": args.batch,
        "ps_sync_step_ms": statistics.median(ps_ms),
        "mpi_allreduce_step_ms": statistics.median(mpi_ms),
        "ps_over_mpi_step_time": _summary(ratios),
    }


def _attach(workers: list[Any], key: str, ps: Any, optimizer: str) -> None:
    import ray

    ray.get([w.attach.remote(key, ps, k, optimizer) for k, w in enumerate(workers)], timeout=600)


def _summary(ratios: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def run(args: argparse.Namespace) -> int:
    """Runs the rounds on a local Ray (token authentication on, as Ray's default)."""
    import ray

    from distnet.parallel.ps import ParameterServer

    if args.strategy == "hybrid":
        from distnet.bench.ps_hybrid import run_hybrid

        return run_hybrid(args)
    shard_counts = [int(s) for s in str(args.shards).split(",") if s]
    modes = [m for m in str(args.modes).split(",") if m]
    replicas = [int(r) for r in str(args.replicas).split(",") if r]
    if args.workers < 1 or not shard_counts or any(s < 1 for s in shard_counts):
        print("distnet bench ps: --workers and --shards must be positive", file=sys.stderr)
        return 2
    if 1 not in replicas or any(r not in (1, 2) for r in replicas):
        print("distnet bench ps: --replicas takes 1 and 2 (1 is the ratio's base)", file=sys.stderr)
        return 2
    shapes = layer_shapes()
    # the road reaches every actor of the job (shards, backups, workers) through its env
    road = {"env_vars": {"DISTNET_PS_SHM": ROADS[args.road]}}
    ray.init(address="local", include_dashboard=False, log_to_driver=False, runtime_env=road)
    try:
        base_server = ray.remote(num_cpus=0)(BaselineServer).remote(shapes, 1e-3)
        base_workers = [
            ray.remote(num_cpus=0)(BaselineWorker).remote(shapes, k) for k in range(args.workers)
        ]
        ps_workers = [ray.remote(num_cpus=0)(PSBenchWorker).remote(k) for k in range(args.workers)]
        flat = np.concatenate([np.zeros(int(np.prod(s)), np.float32) for s in shapes])
        servers: dict[str, Any] = {}
        contenders: list[tuple[str, str, Any]] = []  # (mode, name, key)
        for mode in modes:
            contenders.append((mode, "baseline", None))
            for s, r, name in replica_contenders(shard_counts, replicas):
                key = f"{mode}/{name}"
                servers[key] = ParameterServer.create(
                    flat, shards=s, mode=mode, num_workers=args.workers,
                    optimizer={"name": "sgd", "lr": 1e-3}, timeout_s=600, replicas=r,
                )  # fmt: skip
                _attach(ps_workers, key, servers[key], "sgd")
                contenders.append((mode, name, key))
        if args.compare_optimizer:
            s = next((c for c in shard_counts if c >= 2), shard_counts[0])
            for where in ("server", "worker"):
                key = f"sync/adam-on-{where}"
                servers[key] = ParameterServer.create(
                    flat, shards=s, mode="sync", num_workers=args.workers, timeout_s=600,
                    optimizer={"name": "adam", "lr": 1e-4}, optimizer_on=where,
                )  # fmt: skip
                _attach(ps_workers, key, servers[key], "adam")
                contenders.append(("adam", f"on-{where}", key))
        rates: dict[str, dict[str, list[float]]] = {}
        for rnd in range(args.rounds + 1):  # round 0 is the warm-up
            for mode, name, key in contenders:
                if key is None:
                    fn = baseline_sync if mode == "sync" else baseline_async
                    rate = fn(base_server, base_workers, args.steps)
                else:
                    counted = "async" if mode == "async" else "sync"
                    rate = _ps_round(ps_workers, key, args.steps, counted)
                if rnd:
                    rates.setdefault(mode, {}).setdefault(name, []).append(rate)
            last = [f"{m}/{n} {v[-1]:.2f}/s" for m, d in rates.items() for n, v in d.items()]
            print(f"round {rnd}: " + ", ".join(last), flush=True)
        seen = road_seen(args.road, servers)
        for ps in servers.values():
            ps.shutdown()
        for w in [base_server, *base_workers, *ps_workers]:
            ray.kill(w)
        step = train_step_comparison(args) if args.train_step else None
    finally:
        ray.shutdown()
    result = _report(args, rates, shard_counts, modes)
    result["road"] = seen
    if len(replicas) > 1:
        result["replication"] = replication_report(rates, shard_counts, modes)
    if step is not None:
        result["train_step_2_workers"] = step
        r = step["ps_over_mpi_step_time"]
        print(f"  training step, 2 workers, batch {args.batch}/worker: ps sync (2 shards) "
              f"{step['ps_sync_step_ms']:.1f} ms vs MPI allreduce "
              f"{step['mpi_allreduce_step_ms']:.1f} ms: x{r['median']:.2f} step time "
              f"(min {r['min']:.2f}, max {r['max']:.2f})")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _report(
    args: argparse.Namespace, rates: dict, shard_counts: list[int], modes: list[str]
) -> dict[str, Any]:
    floats = sum(int(np.prod(s)) for s in layer_shapes())
    result: dict[str, Any] = {
        "benchmark": "ps",
        "floats": floats,
        "workers": args.workers,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "updates_per_s": rates,
        "ratio_by_shards": {},
        "ratio_vs_baseline": {},
    }
    print(f"parameter-server updates/s, {floats:,} float32, {args.workers} workers "
          f"(median of {args.rounds} rounds; ratio = per-round distnet / baseline)")  # fmt: skip
    for mode in modes:
        base = rates[mode]["baseline"]
        result["ratio_by_shards"][mode] = {}
        print(f"  {mode}: baseline (Ray docs pattern) {statistics.median(base):.2f}/s")
        for s in shard_counts:
            mine = rates[mode][f"ps-{s}"]
            ratio = _summary([a / b for a, b in zip(mine, base, strict=True)])
            result["ratio_by_shards"][mode][str(s)] = ratio
            if s == 2:
                result["ratio_vs_baseline"][mode] = ratio
            spread = f"(min {ratio['min']:.2f}, max {ratio['max']:.2f})"
            print(f"    distnet ps, {s} shard(s): {statistics.median(mine):.2f}/s, "
                  f"x{ratio['median']:.2f} {spread}")  # fmt: skip
    if "adam" in rates:
        srv, wrk = rates["adam"]["on-server"], rates["adam"]["on-worker"]
        ratio = _summary([a / b for a, b in zip(srv, wrk, strict=True)])
        result["optimizer_on_server_vs_worker"] = ratio
        print(f"  sync Adam: on the shards {statistics.median(srv):.2f}/s, on the workers "
              f"{statistics.median(wrk):.2f}/s: server/worker x{ratio['median']:.2f} "
              f"(min {ratio['min']:.2f}, max {ratio['max']:.2f})")  # fmt: skip
    return result
