"""``python -m distnet.bench.checkcost [-np 2] [--rounds 15]``: what the collective consistency
check (``DISTNET_COLLECTIVE_CHECK``) and the stall check's hook cost per call.

MPI part (the command re-launches itself under ``distnet launch -np N``, with the check on so
that its side channel exists): alternating rounds, each timing ``--reps`` allreduces of a small
(1,000 floats) and a large (1,000,000) float32 buffer with the check off and on (the trace's
``check`` flag toggled on every rank together) and with the stall hook off and on. Parameter
server part (a local Ray, one sync shard, one worker, so every round completes at once):
alternating rounds of ``--reps`` pushes of 100,000 floats without and with a call site (what a
push carries with the check on, and what the shard compares). Reports medians in microseconds
per call and the overhead; the load average beside them (ratios inside one run stay meaningful
under load, absolute times do not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np


def _time(fn: Any, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def _mpi_rank(rounds: int, reps: int) -> None:
    from distnet import parallel as dist  # noqa: PLC0415

    comm = dist.init("mpi")
    trace = comm.trace
    hook = trace.on_enter
    results: dict[str, list[float]] = {}
    for n in (1_000, 1_000_000):
        buf = np.ones(n, np.float32)
        reps_n = reps if n < 10_000 else max(3, reps // 20)
        contenders = {
            "off": (False, None),
            "check": (True, None),
            "stall hook": (False, hook),
        }
        for _ in range(rounds):
            for name, (check, on_enter) in contenders.items():
                trace.check, trace.on_enter = check, on_enter
                comm.comm.Barrier()
                results.setdefault(f"{name} {n}", []).append(
                    _time(lambda b=buf: comm.allreduce(b), reps_n)
                )
    trace.check, trace.on_enter = True, hook
    if comm.rank == 0:
        for n in (1_000, 1_000_000):
            off = statistics.median(results[f"off {n}"])
            for name in ("check", "stall hook"):
                on = statistics.median(results[f"{name} {n}"])
                print(f"mpi allreduce {n:>9} floats: off {off:9.1f} us, {name:10} {on:9.1f} us "
                      f"(+{on - off:7.1f} us, {on / off:5.2f}x)")  # fmt: skip


def _ps(rounds: int, reps: int) -> None:
    from distnet.parallel.consistency import CHECK_ENV  # noqa: PLC0415
    from distnet.parallel.ps import ParameterServer  # noqa: PLC0415
    from distnet.parallel.ps.pushcheck import push_site  # noqa: PLC0415
    from distnet.parallel.rayengine import start_ray  # noqa: PLC0415

    started = start_ray(None, num_cpus=2)
    flat = np.zeros(100_000, np.float32)
    ps = ParameterServer.create(flat, shards=1, mode="sync", num_workers=1,
                                optimizer={"name": "sgd", "lr": 0.01})  # fmt: skip
    grad = np.ones(100_000, np.float32)
    clock = [0]

    def push() -> None:
        clock[0] += 1
        site = push_site()
        ref = ps.shards[0].push_pull.remote(ps.token, 0, clock[0], 0, grad, 1.0, 0.01, 0, site)
        ps.gather([ref], lambda i, s: None)

    times: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for _ in range(3):
            push()  # warm-up
        for _ in range(rounds):
            for name in ("off", "on"):
                os.environ[CHECK_ENV] = "1" if name == "on" else "0"
                times[name].append(_time(push, reps))
    finally:
        ps.shutdown()
        if started:
            import ray  # noqa: PLC0415

            ray.shutdown()
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"ps push_pull  100000 floats: off {off:9.1f} us, check      {on:9.1f} us "
          f"(+{on - off:7.1f} us, {on / off:5.2f}x)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Runs both parts; prints one line per measurement."""
    parser = argparse.ArgumentParser(prog="python -m distnet.bench.checkcost")
    parser.add_argument("-np", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-ps", action="store_true", help="skip the parameter-server part")
    args = parser.parse_args(argv)
    if args.rank:
        _mpi_rank(args.rounds, args.reps)
        return 0
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    cmd = [sys.executable, "-m", "distnet.parallel.mpi.launcher", "-np", str(args.np), "--",
           sys.executable, "-m", "distnet.bench.checkcost", "--rank",
           "--rounds", str(args.rounds), "--reps", str(args.reps)]  # fmt: skip
    env = {**os.environ, "DISTNET_COLLECTIVE_CHECK": "1"}
    status = subprocess.run(cmd, env=env, check=False).returncode
    if not args.no_ps:
        _ps(args.rounds, max(5, args.reps // 10))
    print(f"load average {os.getloadavg()[0]:.1f} after")
    return status


if __name__ == "__main__":
    sys.exit(main())
