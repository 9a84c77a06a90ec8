"""``distnet demo``: a stacked autoencoder pretrained greedily, then fine-tuned, on real digits,
across ``--workers`` local data-parallel workers (2 by default).

It is an ordinary job: the 1,797 8x8 digit images that ship with scikit-learn are converted
into Zarr stores (a stratified 25% test split), a job file is written next to them, and the
job runs through ``distnet train`` - in this process for one worker, under ``distnet launch
-np N`` (real mpiexec) for more. Three stages (``pretrain-0``, ``pretrain-1``, ``finetune``)
are resumable: run the demo again and finished stages are skipped. Writes ``report.json``,
``filters.png``, ``reconstructions.png`` and ``filters-final.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from distnet.train.jobs.jobtoml import to_toml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options."""
    parser.add_argument("--workers", type=int, default=2, help="data-parallel workers (MPI)")
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--epochs", type=int, default=20, help="pretraining epochs per layer")
    parser.add_argument("--finetune-epochs", type=int, default=60, help="fine-tuning epochs")
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 100], help="layer widths")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch size")
    parser.add_argument("--corruption", type=float, default=0.1, help="denoising mask fraction")
    parser.add_argument(
        "--validation-fraction", type=float, default=0.1,
        help="share of the training digits held out for validation curves",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restart", action="store_true", help="discard earlier stages in --out")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--trace", action="store_true", help="write a timeline (trace.json)")


def demo_job(args: argparse.Namespace, data_dir: Path) -> dict[str, dict[str, Any]]:
    """The job the demo runs (only the keys that differ from the job defaults)."""
    return {
        "data": {"train": str(data_dir / "train"), "test": str(data_dir / "test"),
                 "batch_size": args.batch_size,
                 "validation_fraction": args.validation_fraction},
        "model": {"type": "stacked_autoencoder", "hidden": list(args.hidden)},
        "pretrain": {"epochs": args.epochs, "corruption": args.corruption},
        "finetune": {"epochs": args.finetune_epochs},
        "run": {"seed": args.seed},
    }  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Runs the demo; 0 on success, 2 when --out holds a run with other settings."""
    from distnet.data import convert_digits  # noqa: PLC0415

    if args.workers < 1:
        print("distnet demo: --workers must be at least 1", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    if args.restart and out.exists():
        shutil.rmtree(out)
    job = demo_job(args, out / "data")
    job_path = out / "job.toml"
    if job_path.exists() and job_path.read_text() != to_toml(job):
        print(f"distnet demo: {out} holds a run with other settings; pass --restart to "
              "discard it or --out for a new directory", file=sys.stderr)  # fmt: skip
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data" / "test").exists():
        # small chunks: 1,347 training images still make ~20 chunks to permute across ranks
        convert_digits(out / "data", test_fraction=0.25, seed=args.seed, chunk_samples=64)
    job_path.write_text(to_toml(job))
    train = [sys.executable, "-m", "distnet.cli", "train", str(job_path), "--out", str(out)]
    train += ["--quiet"] * args.quiet + ["--trace"] * args.trace
    if args.workers == 1:  # `distnet train` in this process (train must not import the CLI)
        from distnet.train.jobs import job as train_command  # noqa: PLC0415

        parser = argparse.ArgumentParser(prog="distnet train")
        train_command.add_arguments(parser)
        code = train_command.run(parser.parse_args(train[4:]))
    else:
        from distnet.parallel.mpi.launcher import main as launch  # noqa: PLC0415

        if not args.quiet:
            print(f"distnet demo: {args.workers} workers: distnet launch -np {args.workers} -- "
                  f"distnet train {job_path}", flush=True)  # fmt: skip
        code = launch(["-np", str(args.workers), "--", *train])
    if (out / "report.html").is_file():
        print(f"open {out / 'report.html'} in a browser to see the run")
    return code
