"""``distnet bench network``: the constants of docs/scaling.md's step-time model, measured.

In one mpiexec job (the command re-launches itself):

- a sweep of ``MPI_Allreduce`` over message sizes (8 B to ``--max-mb``), flat and, when the
  ranks span several nodes (``--hosts a:2,b:2 --launcher fork`` here), hierarchical, in
  alternating rounds; the median time of each size;
- a least-squares fit of the flat times to the ring model
  ``t = 2(N-1)*alpha + 2(N-1)/N * bytes / bandwidth``: ``alpha`` (latency per message) and
  ``bandwidth`` (bytes/s) of this machine's MPI transport;
- compute: the training step of the 784-1000-1000-1000-10 MLP (batch ``--batch``) on rank 0
  while the others wait, as seconds per sample and as FLOP/s (6 FLOPs per parameter per
  sample: forward 2, backward 4).

    distnet bench network -np 2 --json net.json
    distnet bench network -np 4 --hosts a:2,b:2 --launcher fork
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

from distnet.bench.mpijob import run_mpi_benchmark

MLP_PARAMS = 784 * 1000 + 1000 + 2 * (1000 * 1000 + 1000) + 1000 * 10 + 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distnet bench network``."""
    parser.add_argument("-np", "-n", dest="np", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--hosts", help="hydra hosts, e.g. a:2,b:2 (with --launcher fork)")
    parser.add_argument("--launcher", help="hydra launcher (fork: hosts as nodes, one machine)")
    parser.add_argument("--launcher-exec", help="hydra's -launcher-exec (a stand-in for ssh)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    parser.add_argument("--max-mb", type=float, default=32.0, help="largest message (MiB)")
    parser.add_argument("--batch", type=int, default=128, help="batch of the compute test")
    parser.add_argument("--max-reps", type=int, default=200, help="allreduces per size and round")
    parser.add_argument("--mpiexec", help="mpiexec to use (default: the mpich wheel's)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def sizes_in_floats(max_mb: float) -> list[int]:
    """2, 8, 32, ... float32 counts up to ``max_mb`` MiB (powers of 4)."""
    sizes, n = [], 2
    while n * 4 <= max_mb * 2**20:
        sizes.append(n)
        n *= 4
    return sizes


def fit_ring(sizes_bytes: list[int], seconds: list[float], n: int) -> dict[str, float]:
    """Least squares of ``t = 2(N-1) alpha + 2(N-1)/N bytes/bandwidth`` in relative error
    (each size weighs the same, so the microsecond-scale small messages still set alpha)."""
    x = np.array([2 * (n - 1) / n * b for b in sizes_bytes], dtype=float)
    t = np.array(seconds, dtype=float)
    design = np.stack([np.full_like(x, 2 * (n - 1)), x], axis=1)
    (alpha, inv_bw), *_ = np.linalg.lstsq(design / t[:, None], np.ones_like(t), rcond=None)
    # the smallest message is latency alone; the largest is bandwidth alone: a robust fallback
    alpha = alpha if alpha > 0 else t[0] / (2 * (n - 1))
    inv_bw = inv_bw if inv_bw > 0 else t[-1] / x[-1]
    return {"alpha_s": float(alpha), "bandwidth_Bps": float(1.0 / inv_bw)}


def _time_allreduce(comm: Any, buf: np.ndarray, reps: int) -> float:
    comm.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        comm.allreduce(buf, "sum")
    elapsed = (time.perf_counter() - t0) / reps
    return max(comm.allgather(elapsed))  # the slowest rank is the step's time


def _sweep(args: argparse.Namespace, comm: Any) -> dict[str, Any]:
    modes = [False, True] if comm.num_nodes > 1 and comm.size > comm.num_nodes else [False]
    rows = []
    for floats in sizes_in_floats(args.max_mb):
        buf = np.ones(floats, dtype=np.float32)
        reps = max(1, min(args.max_reps, int(2e7 // (floats * 4 + 2e4))))
        times: dict[bool, list[float]] = {m: [] for m in modes}
        comm.set_hierarchical(False)
        _time_allreduce(comm, buf, 2)  # warm-up (connections, buffers)
        for r in range(args.rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                comm.set_hierarchical(mode)
                times[mode].append(_time_allreduce(comm, buf, reps))
        row = {"bytes": floats * 4, "flat_s": statistics.median(times[False])}
        if True in times:
            row["hierarchical_s"] = statistics.median(times[True])
            ratios = [h / f for h, f in zip(times[True], times[False], strict=True)]
            row["hierarchical_vs_flat"] = statistics.median(ratios)
        rows.append(row)
    comm.set_hierarchical("auto")
    fit = fit_ring([r["bytes"] for r in rows], [r["flat_s"] for r in rows], comm.size)
    return {"rows": rows, "ring_fit": fit}


def _compute(args: argparse.Namespace, comm: Any) -> dict[str, Any]:
    from distnet.bench.step_contenders import distnet_mlp_step  # noqa: PLC0415

    result: dict[str, Any] = {}
    comm.barrier()
    if comm.rank == 0:
        step = distnet_mlp_step(args.batch)
        step()
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        per_step = statistics.median(times)
        result = {
            "batch": args.batch, "step_s": per_step, "s_per_sample": per_step / args.batch,
            "flops": 6 * MLP_PARAMS * args.batch / per_step, "params": MLP_PARAMS,
        }  # fmt: skip
    comm.barrier()
    return result


def _worker(args: argparse.Namespace) -> int:
    from distnet.parallel import init  # noqa: PLC0415

    comm = init("mpi")
    result = {
        "ranks": comm.size, "nodes": comm.num_nodes, "local_size": comm.local_size,
        "threads": os.environ.get("OMP_NUM_THREADS"), "sweep": _sweep(args, comm),
        "compute": _compute(args, comm),
    }  # fmt: skip
    if comm.rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _print_report(result: dict[str, Any]) -> None:
    print(f"MPI_Allreduce over {result['ranks']} ranks on {result['nodes']} node(s)")
    for row in result["sweep"]["rows"]:
        line = f"  {row['bytes']:>11,} B  flat {1e6 * row['flat_s']:10.1f} us"
        if "hierarchical_s" in row:
            line += (
                f"  hierarchical {1e6 * row['hierarchical_s']:10.1f} us"
                f"  ({row['hierarchical_vs_flat']:.2f}x flat)"
            )
        print(line)
    fit = result["sweep"]["ring_fit"]
    print(
        f"ring fit: latency alpha = {1e6 * fit['alpha_s']:.1f} us per message, "
        f"bandwidth = {fit['bandwidth_Bps'] / 1e9:.2f} GB/s"
    )
    c = result["compute"]
    print(
        f"compute: MLP step, batch {c['batch']}: {1e3 * c['step_s']:.1f} ms = "
        f"{1e6 * c['s_per_sample']:.1f} us/sample = {c['flops'] / 1e9:.1f} GFLOP/s"
    )


def run(args: argparse.Namespace) -> int:
    """Re-launches itself under mpiexec with ``-np`` ranks; rank 0 reports."""
    if args.worker:
        return _worker(args)
    from distnet.parallel.mpi.launcher import LaunchError, find_mpiexec  # noqa: PLC0415

    if args.np < 2:
        print("distnet bench network: -np must be at least 2", file=sys.stderr)
        return 2
    try:
        mpiexec = find_mpiexec(args.mpiexec)
    except LaunchError as err:
        print(f"distnet bench network: {err}", file=sys.stderr)
        return 2

    def build(out: str) -> list[str]:
        cmd = [mpiexec, "-n", str(args.np)]
        cmd += ["-hosts", args.hosts] if args.hosts else []
        cmd += ["-launcher", args.launcher] if args.launcher else []
        cmd += ["-launcher-exec", args.launcher_exec] if args.launcher_exec else []
        cmd += [sys.executable, "-m", "distnet.bench.network", "--worker", "--json", out]
        cmd += ["--rounds", str(args.rounds), "--max-mb", str(args.max_mb)]
        cmd += ["--batch", str(args.batch), "--max-reps", str(args.max_reps)]
        return cmd

    result = run_mpi_benchmark("network", args.np, build)
    if isinstance(result, int):
        return result
    _print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m distnet.bench.network`` (also how the MPI job starts each rank)."""
    parser = argparse.ArgumentParser(prog="distnet bench network")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
