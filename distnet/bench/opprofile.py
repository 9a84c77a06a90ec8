"""``distnet bench core --profile``: where the MLP step's time goes, op by op, in distnet and
in PyTorch (each in its own process, alternating rounds; the fastest round per op is kept).

distnet's ops are timed by wrapping the entry points of ``distnet.kernels`` (GEMMs by role,
the fused activation forward and backward, the optimiser update) and the loss; the rest of
the step (Python dispatch, zeroing, bookkeeping) is the step minus their sum. PyTorch's come
from ``torch.profiler`` (which adds its own overhead to the step: compare the ops, not the
steps). Times in milliseconds per step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

from distnet.bench import step_contenders

TORCH_GROUPS = {  # torch.profiler op name -> the row it adds to
    "aten::addmm": "forward GEMMs (+ bias)",
    "aten::mm": "backward GEMMs",
    "aten::tanh": "activation",
    "aten::sigmoid": "activation",
    "aten::relu": "activation",
    "aten::clamp_min": "activation",
    "aten::leaky_relu": "activation",
    "aten::tanh_backward": "activation derivative",
    "aten::sigmoid_backward": "activation derivative",
    "aten::threshold_backward": "activation derivative",
    "aten::leaky_relu_backward": "activation derivative",
    "aten::sum": "bias gradient sums",
    "aten::_log_softmax": "loss",
    "aten::nll_loss_forward": "loss",
    "aten::_log_softmax_backward_data": "loss",
    "aten::nll_loss_backward": "loss",
}


def _distnet_profile(batch: int, opt_name: str, activation: str, steps: int) -> dict[str, float]:
    import distnet.functional  # noqa: PLC0415
    from distnet import kernels, optim  # noqa: PLC0415
    from distnet.kernels import gemm  # noqa: PLC0415

    totals: dict[str, float] = defaultdict(float)

    def timed(owner: Any, attr: str, row: Any) -> None:
        real = getattr(owner, attr)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = real(*args, **kwargs)
            totals[row(*args) if callable(row) else row] += time.perf_counter() - start
            return out

        setattr(owner, attr, wrapper)

    def gemm_role(a: Any, b: Any, *rest: Any) -> str:
        if not a.flags.c_contiguous:
            return "backward GEMMs (weight gradients)"
        return "backward GEMMs (input gradients)" if not b.flags.c_contiguous else "forward GEMMs"

    timed(gemm, "matmul", gemm_role)  # every GEMM of a step goes through gemm.matmul
    timed(kernels, "bias_activation_", "bias + activation")
    timed(kernels, "activation_backward", "activation derivative + bias sums")
    timed(distnet.functional, "cross_entropy", "loss forward")
    for cls in (optim.SGD, optim.Adam):
        timed(cls, "_update", "optimiser update")
    step = step_contenders.distnet_mlp_step(batch, opt_name, activation)
    step()
    totals.clear()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = {k: 1e3 * v / steps for k, v in totals.items()}
    per_step["step"] = 1e3 * (time.perf_counter() - start) / steps
    per_step["rest (dispatch, loss backward, zeroing)"] = per_step["step"] - sum(
        v for k, v in per_step.items() if k != "step"
    )
    return per_step


def _torch_profile(batch: int, opt_name: str, activation: str, steps: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    step = step_contenders.torch_mlp_step(batch, opt_name, activation)
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    plain = 1e3 * (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        row = TORCH_GROUPS.get(e.key)
        if row is not None:
            totals[row] += e.self_cpu_time_total / 1e3 / steps
        elif e.key.startswith("Optimizer.step#"):  # the update with the ops inside it
            totals["optimiser update"] += e.cpu_time_total / 1e3 / steps
    totals["step (without the profiler)"] = plain
    return dict(totals)


def worker(spec: str) -> int:
    """One profile in this process: spec 'framework:batch:optimiser:activation:steps'."""
    framework, batch, opt_name, activation, steps = spec.split(":")
    profile_of = _distnet_profile if framework == "distnet" else _torch_profile
    print(json.dumps(profile_of(int(batch), opt_name, activation, int(steps))), flush=True)
    return 0


def run(batch: int, opt_name: str, activation: str, rounds: int, steps: int, threads: int) -> int:
    """Alternates distnet and PyTorch profiles; prints the fastest round per op."""
    import os  # noqa: PLC0415

    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    best: dict[str, dict[str, float]] = {"distnet": {}, "torch": {}}
    for _ in range(rounds):
        for framework in best:
            spec = f"{framework}:{batch}:{opt_name}:{activation}:{steps}"
            command = [sys.executable, "-m", "distnet.bench.opprofile", spec]
            out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900,
                                 check=True)  # fmt: skip
            for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items():
                best[framework][k] = min(v, best[framework].get(k, float("inf")))
    print(f"per op, ms per step, batch {batch}, {opt_name}, {activation}, fastest of {rounds}")
    for framework, rows in best.items():
        print(f"{framework}:")
        for k, v in sorted(rows.items(), key=lambda kv: -kv[1]):
            print(f"  {k:<45} {v:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
