"""``distnet bench e2e``: a whole job, distnet against the same recipe in PyTorch.

Runs a stacked-autoencoder job (default ``launch/jobs/fashion_sda3.toml``: 784-1000-1000-
1000-10 on Fashion-MNIST, greedy denoising pretraining then fine-tuning, Adam) end to end
with ``distnet train`` (one process, or ``distnet launch -np N``), and, when ``torch`` is
importable, the same recipe written in plain PyTorch (``torch_worker`` below: the same
layers, tied weights, masking noise per layer, summed binary cross-entropy per sample, Adam,
the fine-tuning schedule (plateau, cosine or step), batch, epochs, threads), each in
its own process, one after the other (alternating when ``--rounds`` > 1). Prints wall time,
pretraining time and test accuracy of both, and their time ratio per round.

    distnet bench e2e --pretrain-epochs 3 --finetune-epochs 15          # the headline
    distnet bench e2e --pretrain-epochs 1 --finetune-epochs 1 --np 2    # a quick look
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JOB = ROOT / "launch" / "jobs" / "fashion_sda3.toml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distnet bench e2e``."""
    parser.add_argument("--job", default=str(DEFAULT_JOB), help="a stacked-autoencoder job")
    parser.add_argument("--train", help="train store (default: the job's)")
    parser.add_argument("--test", help="test store (default: the job's)")
    parser.add_argument("--pretrain-epochs", type=int, help="per layer (default: the job's)")
    parser.add_argument("--finetune-epochs", type=int, help="default: the job's")
    parser.add_argument("--np", type=int, default=1, help="distnet ranks (distnet launch)")
    parser.add_argument("--threads", type=int, default=2, help="cores for each contender")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if present")
    parser.add_argument("--out", help="folder for run directories (default: a temporary one)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--torch-worker", help=argparse.SUPPRESS)  # internal


def _job(args: argparse.Namespace) -> dict[str, Any]:
    from distnet.train.jobs.load import load_job  # noqa: PLC0415

    overrides: dict[str, dict[str, Any]] = {"data": {}, "pretrain": {}, "finetune": {}}
    for key in ("train", "test"):  # from the command line: relative to the working directory
        given = getattr(args, key)
        if given:
            overrides["data"][key] = given if "://" in given else str(Path(given).resolve())
    if args.pretrain_epochs is not None:
        overrides["pretrain"]["epochs"] = args.pretrain_epochs
    if args.finetune_epochs is not None:
        overrides["finetune"]["epochs"] = args.finetune_epochs
    job = load_job(args.job, {k: v for k, v in overrides.items() if v})
    if job["model"]["type"] != "stacked_autoencoder" or not job["data"]["test"]:
        raise SystemExit(f"{args.job}: bench e2e needs a stacked_autoencoder job with a test store")
    return job


def _write_job(job: dict[str, Any], path: Path, out: Path) -> None:
    """The resolved job as TOML (absolute paths; no pictures: they are not training). ``[dist]``
    keeps only the keys off their defaults: a default written out counts as set, and the one
    rank run (``--engine local``) refuses a set ``rebalance_every`` (it failed so)."""
    from distnet.train.jobs.jobspec import DistSpec  # noqa: PLC0415

    fields = DistSpec.model_fields.items()
    defaults = {k: f.get_default(call_default_factory=True) for k, f in fields}
    dist = {k: v for k, v in job["dist"].items() if k not in defaults or v != defaults[k]}
    job = {**job, "dist": dist}  # runs under distnet launch and as one local process
    lines = []
    for section, values in job.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue
            if section == "run" and key == "out":
                value = str(out)
            if section == "run" and key == "pictures":
                value = False
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")


def _thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS"):  # fmt: skip
        env[var] = str(threads)
    return env


def run_distnet(job: dict[str, Any], work: Path, np_: int, threads: int) -> dict[str, Any]:
    """``distnet train`` (or ``distnet launch -np N -- distnet train``); wall time from the
    parent, accuracy and stage times from the run's report."""
    out = work / f"distnet-{time.monotonic_ns()}"
    path = work / "job.toml"
    _write_job(job, path, out)
    train = [sys.executable, "-m", "distnet.cli", "train", str(path), "--quiet"]
    if np_ > 1:  # the launcher gives each rank cores/np threads
        cmd = [sys.executable, "-m", "distnet.parallel.mpi.launcher", "-np", str(np_), "--", *train]
        env = dict(os.environ)
    else:
        cmd, env = [*train, "--engine", "local"], _thread_env(threads)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=6 * 3600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"distnet run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    pre = sum(s.get("seconds", 0.0) for s in stages if s.get("name", "").startswith("pretrain"))
    return {"wall_s": wall, "pretrain_s": pre, "accuracy": report["test_accuracy"]}


def run_torch(job: dict[str, Any], work: Path, threads: int) -> dict[str, Any]:
    spec = work / "torch-job.json"
    spec.write_text(json.dumps(job))
    cmd = [sys.executable, "-m", "distnet.bench.e2e", "--torch-worker", str(spec),
           "--threads", str(threads)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_thread_env(threads), capture_output=True, text=True,
                          timeout=6 * 3600)  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"PyTorch run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, **result}


# -- the PyTorch recipe (runs in its own process) ----------------------------------------------


def _read(path: str) -> tuple[Any, Any]:
    import numpy as np  # noqa: PLC0415

    from distnet.data import open_dataset  # noqa: PLC0415

    ds = open_dataset(path)
    xs, ys = zip(*(ds.read_chunk(i) for i in range(ds.num_chunks)), strict=True)
    x = ds.to_float(np.concatenate(xs))
    return x.reshape(len(x), -1), np.concatenate(ys)


def torch_worker(spec_path: str, threads: int) -> int:
    """The job's recipe in PyTorch; prints one JSON line (pretrain_s, accuracy)."""
    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)
    job = json.loads(Path(spec_path).read_text())
    pre, ft, m = job["pretrain"], job["finetune"], job["model"]
    torch.manual_seed(job["run"]["seed"])
    x_np, y_np = _read(job["data"]["train"])
    xt_np, yt_np = _read(job["data"]["test"])
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    batch = job["data"]["batch_size"]
    sizes = [x.shape[1], *m["hidden"]]
    layers = [torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    for lin in layers:  # glorot uniform weights, zero biases, as distnet's Dense
        torch.nn.init.xavier_uniform_(lin.weight)
        torch.nn.init.zeros_(lin.bias)

    def per_layer(value: Any, k: int) -> Any:
        return value[k] if isinstance(value, list) else value

    start = time.perf_counter()
    for k, lin in enumerate(layers):  # greedy: layer k on the frozen encoders' codes
        dec_bias = torch.nn.Parameter(torch.zeros(sizes[k]))
        opt = torch.optim.Adam([lin.weight, lin.bias, dec_bias], lr=per_layer(pre["lr"], k))
        corruption = per_layer(pre["corruption"], k)
        for _ in range(per_layer(pre["epochs"], k)):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), batch):
                h = x[perm[i : i + batch]]
                with torch.no_grad():
                    for prev in layers[:k]:
                        h = torch.sigmoid(prev(h))
                noisy = h * (torch.rand_like(h) >= corruption)
                code = torch.sigmoid(lin(noisy))
                logits = code @ lin.weight + dec_bias  # tied weights
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, h, reduction="sum"
                ) / len(h)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    pretrain_s = time.perf_counter() - start
    mods: list[Any] = []
    for lin in layers:
        mods += [lin, torch.nn.Sigmoid()]
    net = torch.nn.Sequential(*mods, torch.nn.Linear(sizes[-1], int(y.max()) + 1))
    torch.nn.init.xavier_uniform_(net[-1].weight)
    torch.nn.init.zeros_(net[-1].bias)
    opt = torch.optim.Adam(net.parameters(), lr=ft["lr"], weight_decay=ft["weight_decay"])
    schedule = _torch_schedule(torch, opt, ft)
    for _ in range(ft["epochs"]):
        perm, total = torch.randperm(len(x)), 0.0
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
        if ft.get("schedule", "plateau") == "plateau":
            schedule.step(total / len(x))
        else:
            schedule.step()
    with torch.no_grad():
        pred = net(torch.from_numpy(xt_np)).argmax(1).numpy()
    accuracy = float((pred == yt_np).mean())
    print(json.dumps({"pretrain_s": pretrain_s, "accuracy": accuracy}))
    return 0


def _torch_schedule(torch: Any, opt: Any, ft: dict[str, Any]) -> Any:
    """The job's fine-tuning schedule in PyTorch (``distnet/train/loop/lrcallbacks.py``): plateau
    of the training loss, cosine decay over the epochs to ``lr_min``, or step cuts; stepped
    once per epoch, as distnet's callbacks set the rate before each epoch."""
    from distnet.train.loop.lrcallbacks import floor  # noqa: PLC0415

    kind = ft.get("schedule", "plateau")
    sched = torch.optim.lr_scheduler
    if kind == "plateau":
        return sched.ReduceLROnPlateau(
            opt, factor=ft["plateau_factor"], patience=ft["plateau_patience"], min_lr=floor(ft)
        )
    if kind == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=ft["epochs"], eta_min=floor(ft))
    if kind == "step":
        return sched.StepLR(opt, step_size=ft["step_epochs"], gamma=ft["step_factor"])
    raise ValueError(f"[finetune] schedule: unknown schedule {kind!r}")


def _torch_available() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, timeout=300)
    return probe.returncode == 0


def run(args: argparse.Namespace) -> int:
    """Runs the contenders ``--rounds`` times, alternating; prints every run and the ratios."""
    if args.torch_worker:
        return torch_worker(args.torch_worker, args.threads)
    job = _job(args)
    with_torch = not args.no_torch and _torch_available()
    results: dict[str, list[dict[str, Any]]] = {"distnet": [], "torch": []}
    with tempfile.TemporaryDirectory(prefix="distnet-e2e-") as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        label = f"distnet ({args.np} rank{'s' if args.np > 1 else ''})"
        for r in range(args.rounds):
            order = ["distnet", "torch"] if r % 2 == 0 else ["torch", "distnet"]
            for name in order:
                if name == "torch" and not with_torch:
                    continue
                if name == "distnet":
                    res = run_distnet(job, work, args.np, args.threads)
                else:
                    res = run_torch(job, work, args.threads)
                results[name].append(res)
                shown = label if name == "distnet" else f"PyTorch (1 process, {args.threads} thr)"
                print(f"round {r + 1}: {shown:<26} wall {res['wall_s']:7.1f} s  pretraining "
                      f"{res['pretrain_s']:6.1f} s  test accuracy {res['accuracy']:.4f}",
                      flush=True)  # fmt: skip
    if with_torch:
        ratios = [d["wall_s"] / t["wall_s"] for d, t in zip(results["distnet"], results["torch"],
                                                            strict=True)]  # fmt: skip
        print(f"wall time distnet/PyTorch: median {statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}-{max(ratios):.3f}] over {len(ratios)} round(s)")  # fmt: skip
    elif not args.no_torch:
        print("(PyTorch not importable: distnet alone)")
    if args.json:
        Path(args.json).write_text(json.dumps({"job": job, "np": args.np, **results}, indent=1))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
