"""The seed lectures' convolved and pooled features ("Using convolutions", "Pooling features").

1. Learn K features on random P x P patches of the training images with a sparse autoencoder
   (sigmoid codes, KL sparsity penalty), data-parallel like any other stage: each rank samples
   patches from its own shard of the images and a ``DistributedOptimizer`` averages gradients.
2. Convolve the learned features over every image: a valid convolution with the encoder's
   weights and bias and the encoder's activation, (N, 1, H, W) -> (N, K, H-P+1, W-P+1).
3. Pool each feature map over disjoint R x R regions (mean or max): translation-invariant
   features (N, K, (H-P+1) // R, (W-P+1) // R).
4. Train a softmax classifier on the pooled features (standardised with statistics reduced
   over all ranks), data-parallel; optionally fine-tune the whole network (convolution, pool,
   softmax) end to end, greedy-then-supervised as in the stacked autoencoder.

API: ``run_conv_pool(x_train, y_train, x_test, y_test, ConvPoolConfig(...), comm)``; command
line: ``distnet launch -np 2 -- python -m distnet.train.jobs.convfeatures TRAIN TEST --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np


@dataclass
class ConvPoolConfig:
    """Settings of the pipeline (the lecture's recipe at Fashion-MNIST scale)."""

    features: int = 64  # K: hidden units of the patch autoencoder
    patch: int = 8  # P: patch side
    patches: int = 50_000  # patches sampled over all ranks
    pool: int = 3  # R: pooling region side
    pool_mode: Literal["mean", "max"] = "max"
    sparsity_target: float = 0.05
    sparsity_weight: float = 3.0
    ae_epochs: int = 20
    ae_lr: float = 5e-3
    ae_batch: int = 64  # global batches
    classifier_epochs: int = 20
    classifier_lr: float = 1e-3
    classifier_batch: int = 128
    weight_decay: float = 1e-4
    finetune_epochs: int = 0  # greedy fine-tuning of the whole network (0: off)
    finetune_lr: float = 3e-4
    seed: int = 0


def sample_patches(images: np.ndarray, count: int, size: int, seed: int) -> np.ndarray:
    """``count`` random ``size`` x ``size`` patches of ``images`` (N, H, W), flattened:
    (count, size * size), float32."""
    n, h, w = images.shape
    if size > min(h, w):
        raise ValueError(f"sample_patches: patch {size} does not fit images {h}x{w}")
    rng = np.random.default_rng(seed)
    which = rng.integers(0, n, count)
    top, left = rng.integers(0, h - size + 1, count), rng.integers(0, w - size + 1, count)
    rows = top[:, None] + np.arange(size)  # (count, size)
    cols = left[:, None] + np.arange(size)
    patches = images[which[:, None, None], rows[:, :, None], cols[:, None, :]]
    return patches.reshape(count, size * size).astype(np.float32)


def patch_network(autoencoder: Any, pool: int, pool_mode: str) -> Any:
    """Convolution with the autoencoder's features, then pooling, then Flatten: a
    ``Sequential`` mapping images (N, 1, H, W) to pooled features (N, K * OH * OW)."""
    from distnet import nn  # noqa: PLC0415

    enc = autoencoder.encoder
    n_in, k = enc.weight.shape
    side = int(round(n_in**0.5))
    conv = nn.Conv2d(1, k, side, activation=autoencoder.activation_name, dtype=enc.weight.dtype)
    # the encoder computes x @ W (W is (P*P, K)); the kernel of feature j is column j of W
    conv.weight.data[...] = enc.weight.data.T.reshape(k, 1, side, side)
    conv.bias.data[...] = enc.bias.data
    pooling = nn.MaxPool2d(pool) if pool_mode == "max" else nn.AvgPool2d(pool)
    return nn.Sequential(conv, pooling, nn.Flatten())


def pooled_features(net: Any, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """``net`` (``patch_network``) applied to images (N, 1, H, W) in batches, without a
    graph: (N, K * OH * OW) float32."""
    from distnet.core.tensor import no_grad  # noqa: PLC0415

    with no_grad():
        parts = [np.asarray(net(images[i : i + batch]).data) for i in range(0, len(images), batch)]
    return np.concatenate(parts)


def _standardiser(features: np.ndarray, comm: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of every feature over all ranks' samples."""
    sums = np.concatenate(
        [features.sum(0), (features.astype(np.float64) ** 2).sum(0), [len(features)]]
    )
    comm.allreduce(sums)
    d = features.shape[1]
    mean = sums[:d] / sums[-1]
    std = np.sqrt(np.maximum(sums[d : 2 * d] / sums[-1] - mean**2, 0.0)) + 1e-3
    return mean.astype(np.float32), std.astype(np.float32)


def _fold_standardisation(dense: Any, mean: np.ndarray, std: np.ndarray) -> None:
    """Rewrites ``dense`` trained on (f - mean) / std into one applied to raw f, exactly:
    W' = W / std, b' = b - (mean / std) @ W."""
    w = dense.weight.data
    dense.bias.data[...] -= (mean / std) @ w
    w /= std[:, None]


def run_conv_pool(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    config: ConvPoolConfig | None = None,
    comm: Any = None,
    out: str | Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Runs the four steps on images x (N, H, W) in [0, 1] and labels y (N,); every rank
    passes the whole arrays and keeps its own shard. Returns a report (test accuracy after
    each trained part, timings); rank 0 writes report.json and pictures into ``out``.
    """
    from distnet import backend, nn  # noqa: PLC0415
    from distnet.optim import Adam  # noqa: PLC0415
    from distnet.parallel import DistributedOptimizer, LocalCommunicator  # noqa: PLC0415

    cfg = config or ConvPoolConfig()
    comm = comm or LocalCommunicator()
    rank, size = comm.rank, comm.size
    say = log if rank == 0 else (lambda line: None)
    started, report = time.perf_counter(), {"config": asdict(cfg), "workers": size}
    for name in ("ae_batch", "classifier_batch"):
        if getattr(cfg, name) % size:
            raise ValueError(
                f"ConvPoolConfig.{name} {getattr(cfg, name)} does not split over {size} ranks"
            )

    def wrap(opt: Any) -> Any:
        return opt if size == 1 else DistributedOptimizer(opt, comm)

    per_rank = len(x_train) // size  # equal shards: every rank takes as many steps
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    images, labels = x_train[shard], y_train[shard]

    # 1. sparse autoencoder on random patches of this rank's images
    backend.seed(cfg.seed)  # the same initial features on every rank (and broadcast anyway)
    ae = nn.AutoEncoder(
        cfg.patch**2, cfg.features, activation="sigmoid", loss="mse",
        sparsity_target=cfg.sparsity_target, sparsity_weight=cfg.sparsity_weight,
    )  # fmt: skip
    patches = sample_patches(images, cfg.patches // size, cfg.patch, seed=cfg.seed * 1000 + rank)
    opt = wrap(Adam(ae, lr=cfg.ae_lr, weight_decay=cfg.weight_decay))
    history = ae.fit(patches, batch_size=cfg.ae_batch // size, epochs=cfg.ae_epochs,
                     optimizer=opt, seed=cfg.seed + rank)  # fmt: skip
    opt.close()
    report["autoencoder_loss"] = history.history["loss"][-1]
    say(f"sparse autoencoder {cfg.patch}x{cfg.patch} -> {cfg.features} on {cfg.patches} patches: "
        f"loss {report['autoencoder_loss']:.4f}")  # fmt: skip

    # 2 + 3. convolve the features over every image and pool
    net = patch_network(ae, cfg.pool, cfg.pool_mode)
    feats = pooled_features(net, images[:, None])
    test_feats = pooled_features(net, x_test[:, None])
    say(f"convolved and {cfg.pool_mode}-pooled features: {feats.shape[1]} per image")

    # 4. softmax classifier on standardised pooled features
    mean, std = _standardiser(feats, comm)
    backend.seed(cfg.seed + 1)
    classifier = nn.Dense(feats.shape[1], int(y_train.max()) + 1)
    opt = wrap(Adam(classifier, lr=cfg.classifier_lr, weight_decay=cfg.weight_decay))
    classifier.fit((feats - mean) / std, labels, batch_size=cfg.classifier_batch // size,
                   epochs=cfg.classifier_epochs, optimizer=opt, seed=cfg.seed + rank)  # fmt: skip
    opt.close()
    _fold_standardisation(classifier, mean, std)
    model = nn.Sequential(*net, classifier)
    report["test_accuracy_softmax"] = _accuracy(classifier, test_feats, y_test)
    say(f"softmax on pooled features: test accuracy {report['test_accuracy_softmax']:.4f}")

    # optional: fine-tune convolution and softmax together
    if cfg.finetune_epochs:
        opt = wrap(Adam(model, lr=cfg.finetune_lr))
        model.fit(images[:, None], labels, batch_size=cfg.classifier_batch // size,
                  epochs=cfg.finetune_epochs, optimizer=opt, seed=cfg.seed + 7 + rank)  # fmt: skip
        opt.close()
        report["test_accuracy_finetuned"] = model.evaluate(x_test[:, None], y_test)["accuracy"]
        say(f"fine-tuned: test accuracy {report['test_accuracy_finetuned']:.4f}")
    report["test_accuracy"] = report.get("test_accuracy_finetuned", report["test_accuracy_softmax"])
    report["seconds"] = round(time.perf_counter() - started, 1)
    if rank == 0 and out is not None:
        report["pictures"] = draw(ae, net, x_test, Path(out))
        (Path(out) / "report.json").write_text(json.dumps(report, indent=1))
    comm.barrier()
    report["model"] = model
    return report


def _accuracy(classifier: Any, feats: np.ndarray, y: np.ndarray) -> float:
    from distnet.core.tensor import no_grad  # noqa: PLC0415

    with no_grad():
        scores = np.concatenate([np.asarray(classifier(feats[i : i + 2000]).data)
                                 for i in range(0, len(feats), 2000)])  # fmt: skip
    return float((scores.argmax(1) == y).mean())


def draw(ae: Any, net: Any, images: np.ndarray, out: Path) -> dict[str, str]:
    """patch-features.png (the K learned 8x8 features), feature-maps.png (an image, then its
    first 15 convolved maps) and pooled-maps.png (the same maps pooled)."""
    from distnet.core.tensor import no_grad  # noqa: PLC0415
    from distnet.viz import feature_map_grid, filter_grid  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    side = net[0].kernel_size[0]
    paths = {n: str(out / f"{n}.png") for n in ("patch-features", "feature-maps", "pooled-maps")}
    filter_grid(ae.encoder.weight.data, (side, side), paths["patch-features"], scale=6)
    with no_grad():
        maps = np.asarray(net[0](images[:1, None]).data)[0, :15]
        pooled = np.asarray(net[1](net[0](images[:1, None])).data)[0, :15]
    image = images[0]
    crop = image[: maps.shape[1], : maps.shape[2]]  # the image beside its maps, same size
    feature_map_grid(np.concatenate([crop[None], maps]), paths["feature-maps"], ncols=8)
    feature_map_grid(pooled, paths["pooled-maps"], ncols=8, scale=8)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m distnet.train.jobs.convfeatures TRAIN TEST [--out DIR] [--key value ...]``:
    every ``ConvPoolConfig`` field is an option (``--features 64 --pool-mode mean``)."""
    parser = argparse.ArgumentParser(prog="python -m distnet.train.jobs.convfeatures")
    parser.add_argument("train", help="distnet store of training images")
    parser.add_argument("test", help="distnet store of test images")
    parser.add_argument("--out", default="runs/conv-pool")
    parser.add_argument("--engine", default="auto", choices=["auto", "local", "mpi"])
    for name, value in asdict(ConvPoolConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    from distnet.parallel import init  # noqa: PLC0415
    from distnet.train.jobs.samples import read_store  # noqa: PLC0415

    comm = init(args.engine)
    config = ConvPoolConfig(**{k: getattr(args, k) for k in asdict(ConvPoolConfig())})
    x_train, y_train = read_store(args.train)
    x_test, y_test = read_store(args.test)
    side = int(round(x_train.shape[1] ** 0.5))
    report = run_conv_pool(x_train.reshape(-1, side, side), y_train, x_test.reshape(-1, side, side),
                           y_test, config, comm, args.out)  # fmt: skip
    if comm.rank == 0:
        print(f"test accuracy {report['test_accuracy']:.4f} in {report['seconds']}s; "
              f"report: {args.out}/report.json")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
