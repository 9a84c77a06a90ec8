"""``distnet demo``: greedy pretraining of a stacked autoencoder on real digits, then fine-tuning.

Uses the 1,797 8x8 digit images that ship with scikit-learn (x / 16, a stratified 25% test
split). Three stages (``pretrain-0``, ``pretrain-1``, ``finetune``) run as a ``Pipeline`` in
``--out``; run it again and finished stages are skipped, an interrupted one resumes from its
last epoch. Writes ``report.json``, ``filters.png`` and ``reconstructions.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from distnet.train.callbacks import Callback


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options."""
    parser.add_argument("--workers", type=int, default=1, help="data-parallel workers")
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--epochs", type=int, default=20, help="pretraining epochs per layer")
    parser.add_argument("--finetune-epochs", type=int, default=60, help="fine-tuning epochs")
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 100], help="layer widths")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--corruption", type=float, default=0.1, help="denoising mask fraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restart", action="store_true", help="discard earlier stages in --out")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, ...]:
    """scikit-learn digits as (x_train, x_test, y_train, y_test): x (N, 64) float32 in [0, 1],
    y (N,) int64; the stratified 25% test split of ``train_test_split(random_state=0)``."""
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed))


def draw_first_layer(ae: Any, x_test: np.ndarray, out: Path) -> None:
    """filters.png (each unit's normalised weights) and reconstructions.png (test digits
    above their reconstructions) of a pretrained first-layer autoencoder."""
    from distnet.viz import filter_grid, reconstruction_grid  # noqa: PLC0415

    filter_grid(ae.encoder.weight.data, (8, 8), out / "filters.png")
    was_training = ae.training
    x_hat = ae.eval()(x_test[:16]).data  # eval: no masking noise
    ae.train(was_training)
    reconstruction_grid(x_test[:16], x_hat, (8, 8), out / "reconstructions.png")


class _EpochPrinter(Callback):
    """One line every ``every`` epochs (and the last), so the demo's output stays short."""

    def __init__(self, log: Callable[[str], None], every: int = 5):
        self.log, self.every = log, every

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        if (epoch + 1) % self.every and epoch + 1 != self.loop.epochs:
            return
        shown = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if k != "lr")
        self.log(f"    epoch {epoch + 1:3d}/{self.loop.epochs}  {shown}")


def build_stages(
    sae: Any,
    data: tuple[np.ndarray, ...],
    config: dict[str, Any],
    log: Callable[[str], None],
    wrap_optimizer: Callable[[Any], Any] = lambda opt: opt,
) -> list[Any]:
    """The pipeline's stages; ``wrap_optimizer`` is where a distributed engine puts its
    ``DistributedOptimizer`` (the loops only call zero_grad / backward / step)."""
    from distnet.optim import Adam  # noqa: PLC0415
    from distnet.train.callbacks import ReduceLROnPlateau  # noqa: PLC0415
    from distnet.train.pipeline import Stage  # noqa: PLC0415

    x_train, x_test, y_train, y_test = data
    bs, seed = config["batch_size"], config["seed"]

    def pretrain(k: int) -> Callable[[Any], dict[str, Any]]:
        def fn(ctx: Any) -> dict[str, Any]:
            ae = sae.autoencoders[k]
            opt = wrap_optimizer(Adam(ae, lr=1e-3))
            start = ctx.restore(opt)
            saver = ctx.epoch_checkpoint(opt)
            sae.pretrain_layer(
                k, x_train, epochs=config["epochs"], batch_size=bs, optimizer=opt,
                seed=seed + k, initial_epoch=start, callbacks=[saver, _EpochPrinter(log)],
            )  # fmt: skip
            test_error = ae.reconstruction_error(sae.layer_input(k, x_test))
            if k == 0 and ctx.writer:  # the pretrained filters; fine-tuning changes W later
                draw_first_layer(ae, x_test, ctx.dir.parent.parent)
            return {"kind": "pretrain", "layer": k, "history": saver.history,
                    "test_reconstruction_error": test_error}  # fmt: skip

        return fn

    def finetune(ctx: Any) -> dict[str, Any]:
        opt = wrap_optimizer(Adam(sae.classifier(), lr=3e-3, weight_decay=1e-4))
        start = ctx.restore(opt)
        saver = ctx.epoch_checkpoint(opt)
        # on the training loss: the test split stays unseen until the final evaluation
        plateau = ReduceLROnPlateau("loss", factor=0.3, patience=3)
        sae.finetune(
            x_train, y_train, epochs=config["finetune_epochs"], batch_size=bs, optimizer=opt,
            seed=seed + 100, initial_epoch=start, callbacks=[saver, plateau, _EpochPrinter(log)],
        )  # fmt: skip
        return {"kind": "finetune", "history": saver.history}

    n = len(sae.autoencoders)
    return [Stage(f"pretrain-{k}", pretrain(k)) for k in range(n)] + [Stage("finetune", finetune)]


def run(args: argparse.Namespace) -> int:
    """Runs the demo; returns 0 (2 when --out holds a run with other settings)."""
    from distnet import backend  # noqa: PLC0415
    from distnet.nn.autoencoder import StackedAutoEncoder  # noqa: PLC0415
    from distnet.train.pipeline import Pipeline  # noqa: PLC0415
    from distnet.viz import filter_grid  # noqa: PLC0415

    started = time.perf_counter()
    out = Path(args.out)
    log = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    config = {
        "layers": [64, *args.hidden], "n_classes": 10, "epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs, "batch_size": args.batch_size,
        "corruption": args.corruption, "seed": args.seed, "activation": "sigmoid",
        "reconstruction_loss": "cross_entropy", "tied_weights": True,
    }  # fmt: skip
    if args.restart and out.exists():
        shutil.rmtree(out)
    config_path = out / "config.json"
    if config_path.exists() and json.loads(config_path.read_text()) != config:
        print(f"distnet demo: {out} holds a run with other settings; pass --restart to "
              "discard it or --out for a new directory", file=sys.stderr)  # fmt: skip
        return 2
    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=1))
    if args.workers > 1:
        log(f"note: --workers {args.workers}: the distributed engine is not wired into the "
            "demo yet, so this run trains in one process")  # fmt: skip

    backend.seed(args.seed)
    data = load_digits_split()
    x_train, x_test, y_train, y_test = data
    log(f"digits: {len(x_train)} train / {len(x_test)} test images (8x8), "
        f"stacked autoencoder {'-'.join(map(str, config['layers']))}-10")  # fmt: skip
    sae = StackedAutoEncoder(config["layers"], 10, corruption=args.corruption, loss="cross_entropy")
    table = Pipeline(out, sae, build_stages(sae, data, config, log), log=log).run()

    test = sae.evaluate(x_test, y_test)
    pictures = {
        "filters": str(out / "filters.png"),
        "reconstructions": str(out / "reconstructions.png"),
        "filters_finetuned": str(out / "filters-finetuned.png"),
    }
    filter_grid(sae.autoencoders[0].encoder.weight.data, (8, 8), pictures["filters_finetuned"])
    seconds = time.perf_counter() - started
    report = {
        "command": "distnet demo", "config": config, "workers": args.workers,
        "engine": "local", "stages": table, "test_accuracy": test["accuracy"],
        "test_loss": test["loss"], "pictures": pictures, "seconds": round(seconds, 3),
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(
        f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}) in {seconds:.1f}s; "
        f"report: {out / 'report.json'}, pictures: {out}/filters.png, reconstructions.png"
    )
    return 0
