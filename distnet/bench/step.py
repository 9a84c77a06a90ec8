"""``distnet bench core``: training steps of distnet against a hand-written numpy step and,
when it is importable, PyTorch (CPU, the same threads).

Workloads (float32, SGD unless named):
- ``mlp``: MLP 784-1000-1000-1000-10, tanh, softmax cross-entropy (forward, backward, update;
  against numpy and PyTorch);
- ``mlp-adam``: the same step with Adam (distnet against PyTorch);
- ``update-sgdm``, ``update-adam``, ``update-rmsprop``: the optimiser update alone over the
  MLP's 2.8M parameters (PyTorch with its default implementation, on CPU a loop of per-tensor
  ops, and for SGD and Adam also ``torch-fused``: ``fused=True``, its one-pass CPU kernel);
- ``sae``: one denoising tied-weight autoencoder layer 784-1000 (sigmoid, MSE), as in greedy
  pretraining (against numpy);
- ``conv``: a LeNet-style step against PyTorch only (``distnet.bench.conv``; not in ``all``).

Each contender runs in its own long-lived subprocess (one framework, one thread pool per
process); the parent alternates rounds A B C A B C ... after a warm-up and reports the median
and spread of the per-round ratios, never a ratio of separately taken medians.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
from typing import Any

from distnet.bench.step_contenders import CONTENDERS, WORKLOADS, serve

IDLE_GAP_S = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distnet bench core``."""
    parser.add_argument(
        "--workload",
        choices=[
            "all",
            "mlp",
            "mlp-adam",
            "sae",
            "conv",
            "update-sgdm",
            "update-adam",
            "update-rmsprop",
        ],
        default="all",
        help="update-*: the optimiser update alone over the MLP's 2.8M-parameter buffer",
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after warm-up")
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads per contender")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if present")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--matrix",
        action="store_true",
        help="the grid: activations x batch sizes x optimisers, distnet vs PyTorch vs the "
        "GEMM floor (--batch defaults to 64 128 512 there)",
    )
    parser.add_argument("--activations", nargs="+", help="--matrix: only these activations")
    parser.add_argument("--optimisers", nargs="+", help="--matrix: only these (sgd sgdm adam)")
    parser.add_argument(
        "--profile",
        metavar="ACTIVATION,OPTIMISER",
        help="per-op profile of the MLP step, distnet vs PyTorch, at the last --batch "
        "(e.g. relu,sgdm)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one contender


# -- the parent: alternating rounds -----------------------------------------------------------


class _Contender:
    """One contender's worker process, answering 'N' with the seconds N steps took."""

    def __init__(self, spec: str, threads: int, timeout: float = 600.0):
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS"):  # fmt: skip
            env[var] = str(threads)
        self.spec, self.timeout = spec, timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distnet.bench.step", "--worker", spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        if self._read() != "ready":
            raise RuntimeError(f"bench worker {spec} did not start")

    def _read(self) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(f"bench worker {self.spec} gave no answer within {self.timeout} s")
        return line.strip()

    def build(self, spec: str) -> None:
        """Makes the worker build ``spec``'s step instead (same process, same framework)."""
        self.spec = spec
        self.proc.stdin.write(f"build {spec}\n")
        self.proc.stdin.flush()
        if self._read() != "ready":
            raise RuntimeError(f"bench worker {spec} did not build")

    def time_steps(self, n: int) -> float:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _torch_available() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, timeout=300)
    return probe.returncode == 0


def measure(
    workload: str,
    batch: int,
    names: list[str],
    rounds: int,
    steps: int,
    threads: int,
    pool: dict[str, _Contender] | None = None,
) -> dict[str, Any]:
    """Alternates the contenders round by round; returns samples/s and per-round ratios.

    ``pool``: worker processes by contender name kept across calls (the caller closes them);
    without it each call starts and closes its own."""
    if pool is None:
        contenders = {n: _Contender(f"{workload}:{n}:{batch}", threads) for n in names}
    else:
        contenders = {}
        for n in names:
            spec = f"{workload}:{n}:{batch}"
            if n in pool:
                pool[n].build(spec)
            else:
                pool[n] = _Contender(spec, threads)
            contenders[n] = pool[n]
    try:
        for c in contenders.values():  # one untimed round each
            c.time_steps(max(1, steps // 2))
        rates: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(rounds):
            for n, c in contenders.items():
                # let the previous contender's BLAS/OpenMP threads stop spin-waiting, or
                # they steal the cores this one is timed on
                time.sleep(IDLE_GAP_S)
                rates[n].append(steps * batch / c.time_steps(steps))
    finally:
        if pool is None:
            for c in contenders.values():
                c.close()
    result: dict[str, Any] = {
        "workload": workload,
        "batch": batch,
        "samples_per_s": {n: statistics.median(r) for n, r in rates.items()},
    }
    if "floor" in rates:  # each contender's time as a multiple of the GEMMs' time
        result["x_floor"] = {
            n: statistics.median(f / r for f, r in zip(rates["floor"], rs, strict=True))
            for n, rs in rates.items()
            if n != "floor"
        }
    for base in names[1:]:
        if base == "floor":
            continue
        ratios = [a / b for a, b in zip(rates["distnet"], rates[base], strict=True)]
        result[f"distnet/{base}"] = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        }
    return result


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark and prints one line per workload and batch size."""
    if args.worker:
        return serve(args.worker)
    if args.matrix:
        from distnet.bench import grid  # noqa: PLC0415

        return grid.run(args)
    if args.profile:
        from distnet.bench import opprofile  # noqa: PLC0415

        activation, opt_name = args.profile.split(",")
        return opprofile.run(args.batch[-1], opt_name, activation, args.rounds, args.steps,
                             args.threads)  # fmt: skip
    workloads = WORKLOADS if args.workload == "all" else [args.workload]
    with_torch = not args.no_torch and _torch_available()
    results = []
    for workload in workloads:
        names = [n for n in CONTENDERS[workload] if not n.startswith("torch") or with_torch]
        if len(names) < 2:
            continue
        # an update alone has no batch: one row, rates in updates/s
        for batch in [1] if workload.startswith("update") else args.batch:
            r = measure(workload, batch, names, args.rounds, args.steps, args.threads)
            results.append(r)
            rates = "  ".join(f"{n} {v:,.0f}/s" for n, v in r["samples_per_s"].items())
            ratios = "  ".join(
                f"{k} {v['median']:.3f} [{v['min']:.3f}-{v['max']:.3f}]"
                for k, v in r.items()
                if k.startswith("distnet/")
            )
            floors = "  ".join(f"{n} {v:.2f}x" for n, v in r.get("x_floor", {}).items())
            floors = f"   GEMM floor: {floors}" if floors else ""
            print(f"{workload:<4} batch {batch:<4} {rates}   ratio {ratios}{floors}", flush=True)
    if not with_torch and not args.no_torch:
        print("(PyTorch not importable: torch column skipped)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "threads": args.threads,
                    "rounds": args.rounds,
                    "steps": args.steps,
                    "results": results,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
