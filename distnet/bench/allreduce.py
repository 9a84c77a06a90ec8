"""``distnet bench allreduce -np 2|4``: bucketed gradient allreduce vs raw MPI_Allreduce.

In one mpiexec job (the command re-launches itself), alternating rounds after a warm-up:

- ``raw``: one ``MPI_Allreduce(IN_PLACE)`` of a contiguous float32 buffer the size of the
  784-1000-1000-1000-10 MLP's gradient (2,797,010 floats): the floor;
- ``bucketed``: ``BucketReducer`` over the same sizes, as ``DistributedOptimizer`` does it
  (25 MiB buckets): ``bucketed_mean`` scales by 1/size in a pass of its own (plain
  ``loss.backward()``); ``bucketed_sum`` is what is left when ``DistributedOptimizer.backward``
  folded the weight into backward's seed gradient (the recommended way);
- ``step``: the communication share of a training step of that MLP: step time with
  ``DistributedOptimizer`` vs the bare optimiser (same work, no synchronisation), and with
  overlap (buckets started from backward hooks) as a third contender.

Reports medians of per-round ratios and their spread; ``--json FILE`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from distnet import backend
from distnet.bench.mpijob import run_mpi_benchmark

MLP = (784, 1000, 1000, 1000, 10)


def mlp_param_sizes(widths: tuple[int, ...] = MLP) -> list[int]:
    """Sizes of W and b of each Dense layer, in parameters() order."""
    sizes = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        sizes += [a * b, b]
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distnet bench allreduce``."""
    parser.add_argument("-np", "-n", dest="np", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds (default 9)")
    parser.add_argument("--reps", type=int, default=20, help="allreduces per round and contender")
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="bucket size (MiB)")
    parser.add_argument("--batch", type=int, default=256, help="per-rank batch of the step test")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--no-step", action="store_true", help="skip the training-step test")
    parser.add_argument("--mpiexec", help="mpiexec to use (default: the mpich wheel's)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--engine", choices=["mpi", "ray"], default="mpi", help="ray: Ray allreduce vs MPI's"
    )
    parser.add_argument("--address", help="Ray cluster to join (--engine ray; default: local)")


def _summary(ratios: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
    }


def _time(fn: Any, reps: int, comm: Any, reset: Any = None) -> float:
    if reset is not None:
        reset()
    comm.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    comm.barrier()
    return (time.perf_counter() - t0) / reps


def _collectives(args: argparse.Namespace, comm: Any) -> dict[str, Any]:
    from distnet.parallel.buckets import BucketReducer, plan_buckets  # noqa: PLC0415

    sizes = mlp_param_sizes()
    n = sum(sizes)
    start = np.random.default_rng(comm.rank).standard_normal(n).astype(np.float32)
    raw_buf = start.copy()
    grad = backend.flat_zeros(np, n, np.float32)  # where a model's gradients live (shared
    grad[...] = start  # memory when every rank is on this node: distnet.parallel.shm)

    def reset() -> None:
        # Same values before every timing: repeated sums grow, and float16 would overflow.
        raw_buf[...] = start
        grad[...] = start

    contenders = {}
    for label, mb, weight, compression in (
        ("bucketed_mean", args.bucket_mb, 1.0 / comm.size, None),
        ("bucketed_sum", args.bucket_mb, 1.0, None),
        ("bucketed_4mb_mean", 4.0, 1.0 / comm.size, None),
        ("fp16_mean", args.bucket_mb, 1.0 / comm.size, "fp16"),
    ):
        buckets = plan_buckets(sizes, int(mb * 2**20), 4)
        reducer = BucketReducer(grad, comm, compression)
        contenders[label] = (lambda r=reducer, b=buckets, w=weight: r.reduce(b, w), len(buckets))

    def raw() -> None:
        comm.comm.Allreduce(comm.MPI.IN_PLACE, raw_buf, op=comm.MPI.SUM)

    def raw_nonblocking() -> None:
        comm.comm.Iallreduce(comm.MPI.IN_PLACE, grad, op=comm.MPI.SUM).Wait()

    # MPICH picks other algorithms for Iallreduce than for Allreduce: show that floor too.
    contenders["raw_iallreduce"] = (raw_nonblocking, 1)

    for fn, _ in [(raw, 0), *contenders.values()]:
        _time(fn, 2, comm)  # warm-up: first-touch pages, MPI shared-memory setup
    ratios: dict[str, list[float]] = {k: [] for k in contenders}
    raw_times = []
    for round_ in range(args.rounds):
        # A B A B ...: the baseline goes first in even rounds and last in odd ones.
        order = list(contenders.items())
        order = order if round_ % 2 == 0 else order[::-1]
        t_raw = _time(raw, args.reps, comm, reset) if round_ % 2 == 0 else 0.0
        times = {label: _time(fn, args.reps, comm, reset) for label, (fn, _) in order}
        t_raw = t_raw or _time(raw, args.reps, comm, reset)
        raw_times.append(t_raw)
        for label, t in times.items():
            ratios[label].append(t / t_raw)
    return {
        "floats": n,
        "raw_allreduce_ms": 1e3 * statistics.median(raw_times),
        "buckets": {k: nb for k, (_, nb) in contenders.items()},
        "ratio_vs_raw": {k: _summary(v) for k, v in ratios.items()},
    }


def _training_step(args: argparse.Namespace, comm: Any) -> dict[str, Any]:
    from distnet import backend  # noqa: PLC0415
    from distnet.core.functional import cross_entropy  # noqa: PLC0415
    from distnet.nn import Dense, Sequential  # noqa: PLC0415
    from distnet.optim import SGD  # noqa: PLC0415
    from distnet.parallel import DistributedOptimizer  # noqa: PLC0415

    backend.seed(0)
    layers = [Dense(a, b, "relu") for a, b in zip(MLP[:-2], MLP[1:-1], strict=True)]
    model = Sequential(*layers, Dense(MLP[-2], MLP[-1]))
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((args.batch, MLP[0])).astype(np.float32)
    y = rng.integers(0, MLP[-1], args.batch)
    bare = SGD(model, lr=1e-3, momentum=0.9)
    synced = DistributedOptimizer(bare, comm, bucket_mb=args.bucket_mb, overlap=False)
    # a wrapper shares its optimiser's state, so each contender wraps its own (same buffers)
    overlapped = DistributedOptimizer(
        SGD(model, lr=1e-3, momentum=0.9), comm, bucket_mb=4, overlap=True
    )
    overlapped._hooked = False  # its hooks act only while it is the contender being timed

    def steps(opt: Any, hooked: bool = False) -> None:
        overlapped._hooked = hooked
        for _ in range(args.steps):
            opt.zero_grad()
            loss = cross_entropy(model(x), y)
            # DistributedOptimizer.backward folds the 1/size weight into backward's seed
            opt.backward(loss) if opt is not bare else loss.backward()
            opt.step()
        overlapped._hooked = False

    contenders = {
        "no_sync": lambda: steps(bare),
        "sync": lambda: steps(synced),
        "sync_overlap": lambda: steps(overlapped, hooked=True),
    }
    for fn in contenders.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for label, fn in contenders.items():
            times[label].append(_time(fn, 1, comm) / args.steps)
    share = [1 - a / b for a, b in zip(times["no_sync"], times["sync"], strict=True)]
    gain = [b / a for a, b in zip(times["sync_overlap"], times["sync"], strict=True)]
    synced.close()
    overlapped.close()
    return {
        "batch_per_rank": args.batch,
        "step_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "comm_share_of_step": _summary(share),
        "overlap_speedup": _summary(gain),
    }


def _worker(args: argparse.Namespace) -> int:
    from distnet.parallel import init  # noqa: PLC0415

    comm = init("mpi")
    result: dict[str, Any] = {"ranks": comm.size, "threads": os.environ.get("OMP_NUM_THREADS")}
    result["allreduce"] = _collectives(args, comm)
    if not args.no_step:
        result["training_step"] = _training_step(args, comm)
    if comm.rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _print_report(result: dict[str, Any]) -> None:
    ar = result["allreduce"]
    print(f"allreduce of {ar['floats']:,} float32 over {result['ranks']} ranks")
    print(f"  raw MPI_Allreduce (floor): {ar['raw_allreduce_ms']:.2f} ms")
    for label, s in ar["ratio_vs_raw"].items():
        print(
            f"  {label:<18} {s['median']:.3f}x raw  (spread {s['min']:.3f}-{s['max']:.3f}, "
            f"{ar['buckets'][label]} buckets, {s['rounds']} rounds)"
        )
    step = result.get("training_step")
    if step:
        ms = step["step_ms"]
        share, gain = step["comm_share_of_step"], step["overlap_speedup"]
        print(f"training step, MLP {'-'.join(map(str, MLP))}, batch {step['batch_per_rank']}/rank")
        print(
            f"  no sync {ms['no_sync']:.1f} ms, sync {ms['sync']:.1f} ms, "
            f"sync+overlap {ms['sync_overlap']:.1f} ms"
        )
        print(
            f"  communication share {100 * share['median']:.1f}% "
            f"(spread {100 * share['min']:.1f}-{100 * share['max']:.1f}%); overlap speed-up "
            f"{gain['median']:.3f}x (spread {gain['min']:.3f}-{gain['max']:.3f})"
        )


def run(args: argparse.Namespace) -> int:
    """Re-launches itself under mpiexec with ``-np`` ranks; rank 0 reports."""
    if args.worker:
        return _worker(args)
    if args.engine == "ray":
        from distnet.bench import ray_allreduce  # noqa: PLC0415

        return ray_allreduce.run(args)
    from distnet.parallel.mpi.launcher import LaunchError, find_mpiexec  # noqa: PLC0415

    if args.np < 2:
        print("distnet bench allreduce: -np must be at least 2", file=sys.stderr)
        return 2
    try:
        mpiexec = find_mpiexec(args.mpiexec)
    except LaunchError as err:
        print(f"distnet bench allreduce: {err}", file=sys.stderr)
        return 2

    def build(out: str) -> list[str]:
        cmd = [mpiexec, "-n", str(args.np), sys.executable, "-m", "distnet.bench.allreduce"]
        cmd += ["--worker", "--json", out, "--rounds", str(args.rounds), "--reps", str(args.reps)]
        cmd += ["--bucket-mb", str(args.bucket_mb), "--batch", str(args.batch)]
        cmd += ["--steps", str(args.steps)] + (["--no-step"] if args.no_step else [])
        return cmd

    result = run_mpi_benchmark("allreduce", args.np, build)
    if isinstance(result, int):
        return result
    _print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m distnet.bench.allreduce`` (also how the MPI job starts each rank)."""
    parser = argparse.ArgumentParser(prog="distnet bench allreduce")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
