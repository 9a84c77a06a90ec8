"""``distnet bench allreduce --engine ray``: the Ray engine's allreduce vs MPI's, same buffer.

The buffer is the 784-1000-1000-1000-10 MLP's flat gradient (2,797,010 float32). Each round
runs, one after the other, ``--reps`` allreduces on ``-np`` Ray worker actors
(``RayCommunicator``: reduce-scatter + all-gather through the object store; the actors stay
alive across rounds, idle in between) and ``--reps`` ``MPI_Allreduce`` s in a fresh mpiexec
job of ``-np`` ranks (``MPICommunicator.allreduce``, what ``DistributedOptimizer`` calls).
One framework per process; rounds alternate; the report is the median (and spread) of the
per-round ratios Ray / MPI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from distnet.bench.allreduce import mlp_param_sizes


def _mpi_round(floats: int, reps: int, out: str) -> int:
    """Runs under mpiexec: seconds per allreduce, rank 0 writes them."""
    from distnet.parallel import init  # noqa: PLC0415

    comm = init("mpi")
    buf = np.ones(floats, dtype=np.float32)
    for _ in range(3):  # warm-up
        comm.allreduce(buf, "sum")
    comm.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        comm.allreduce(buf, "sum")
    comm.barrier()
    seconds = (time.perf_counter() - t0) / reps
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump({"seconds": seconds}, f)
    return 0


def _ray_round(comm: Any, floats: int, reps: int) -> float:
    """On every Ray worker: seconds per allreduce (after a warm-up)."""
    buf = np.ones(floats, dtype=np.float32)
    for _ in range(3):
        comm.allreduce(buf, "sum")
    comm.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        comm.allreduce(buf, "sum")
    comm.barrier()
    return (time.perf_counter() - t0) / reps


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(args: argparse.Namespace) -> int:
    """Alternating rounds of Ray and MPI allreduces; prints and optionally writes JSON."""
    import ray  # noqa: PLC0415

    from distnet.parallel.mpi.launcher import LaunchError, find_mpiexec  # noqa: PLC0415
    from distnet.parallel.rayengine import RayJob, RayOptions, worker_specs  # noqa: PLC0415

    floats = sum(mlp_param_sizes())
    try:
        mpiexec = find_mpiexec(args.mpiexec)
    except LaunchError as err:
        print(f"distnet bench allreduce: {err}", file=sys.stderr)
        return 2
    threads = str(max(1, (os.cpu_count() or 1) // args.np))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    job = RayJob(RayOptions(workers=worker_specs(args.np), address=args.address))
    ray_ms, mpi_ms, ratios = [], [], []
    try:
        from distnet.parallel.rayengine.options import start_ray  # noqa: PLC0415

        cpus = None if args.address else max(os.cpu_count() or 1, args.np)
        job._started_ray = start_ray(args.address, **({"num_cpus": cpus} if cpus else {}))
        job._place()
        job._setup_group()
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "mpi.json")
            for _ in range(args.rounds):
                refs = [a.apply.remote(_ray_round, floats, args.reps) for a in job.actors]
                ray_s = max(ray.get(refs, timeout=600))
                cmd = [mpiexec, "-n", str(args.np), sys.executable, "-m", __name__]
                cmd += ["--mpi-round", str(floats), str(args.reps), out]
                subprocess.run(cmd, env=env, check=True, timeout=600)
                with open(out) as f:
                    mpi_s = json.load(f)["seconds"]
                ray_ms.append(1e3 * ray_s)
                mpi_ms.append(1e3 * mpi_s)
                ratios.append(ray_s / mpi_s)
    finally:
        job.stop()
    result = {
        "floats": floats,
        "workers": args.np,
        "reps": args.reps,
        "ray_ms": _summary(ray_ms),
        "mpi_ms": _summary(mpi_ms),
        "ratio_ray_vs_mpi": {**_summary(ratios), "rounds": len(ratios)},
    }
    r = result["ratio_ray_vs_mpi"]
    print(f"allreduce of {floats:,} float32 over {args.np} workers, {args.rounds} rounds")
    print(f"  MPI  {result['mpi_ms']['median']:.2f} ms, Ray {result['ray_ms']['median']:.2f} ms")
    print(f"  Ray / MPI {r['median']:.2f}x (spread {r['min']:.2f}-{r['max']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--mpi-round":
        sys.exit(_mpi_round(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
    sys.exit("usage: distnet bench allreduce --engine ray [-np N] [--rounds R] [--reps K]")
