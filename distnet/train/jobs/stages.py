"""A job's model and its stages: what ``run_job`` trains, on any engine.

``build_model`` makes the job's model (an MLP, a stacked autoencoder, a cnn); ``build_stages``
its stages (greedy layer-wise pretraining, then the supervised stage), each one's optimiser
made data-parallel by the ``wrap`` it is given (the engine's, see
``distnet.parallel.engine``); ``EpochPrinter`` and ``RankNoise`` are their callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distnet.train.jobs.jobspec import JobError
from distnet.train.loop.callbacks import Callback

__all__ = ["EpochPrinter", "RankNoise", "build_model", "build_stages", "per_layer"]


def per_layer(value: Any, k: int) -> Any:
    """Layer k's value of a [pretrain] key given once for all layers or as a list."""
    return value[k] if isinstance(value, list) else value


class EpochPrinter(Callback):
    """Prints one line every ``every`` epochs (and the last), so logs stay short."""

    def __init__(self, log: Callable[[str], None], every: int = 5):
        self.log, self.every = log, every

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        if (epoch + 1) % self.every and epoch + 1 != self.loop.epochs:
            return
        shown = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if k != "lr")
        self.log(f"    epoch {epoch + 1:3d}/{self.loop.epochs}  {shown}")


class RankNoise(Callback):
    """Keys the noise generator (dropout, masking noise) before every step by (seed, stage,
    rank, step): ranks draw different masks for their different samples, and a step drawn
    again (a run resumed mid-epoch, a replaced worker redoing its part of a global batch, a
    stand-in finishing a dead rank's epoch) draws exactly the masks the uninterrupted run
    drew. Noise as a function of a key, not of the history (as JAX's keys); ``step`` is fit's
    global step, which a resumed run takes from the optimiser's restored ``steps``. Cost
    (``backend.seed_key``): about 1 us a step, 10 us more in a step that draws noise."""

    def __init__(self, seed: int, stage: int, rank: int):
        self.key = [seed, stage, rank]

    def on_batch_begin(self, batch: int, logs: dict[str, Any]) -> None:
        from distnet import backend  # noqa: PLC0415

        backend.seed_key(*self.key, logs["step"])


def _make_optimizer(spec: dict[str, Any], params: Any) -> Any:
    """The [finetune] optimiser, through the one factory (``distnet.optim.make_optimizer``)."""
    from distnet.optim import SGD, make_optimizer, optimizer_class  # noqa: PLC0415

    name = spec["optimizer"]
    try:
        cls = optimizer_class(name)
    except ValueError as e:
        raise JobError(f"[finetune] optimizer: {e}") from None
    options = {"weight_decay": spec["weight_decay"]}
    if issubclass(cls, SGD):  # momentum is SGD's alone
        options["momentum"] = spec["momentum"]
    return make_optimizer(name, params, lr=spec["lr"], **options)


def build_model(
    job: dict, n_in: int, n_classes: int, input_shape: tuple[int, ...] | None = None
) -> Any:
    """The job's model: a StackedAutoEncoder, an MLP (Sequential of Dense [+ Dropout]) or a
    cnn (``[model] layers``, for images (N, C, H, W) with ``input_shape`` (C, H, W))."""
    from distnet import nn  # noqa: PLC0415

    m, pre = job["model"], job["pretrain"]
    if m["type"] == "cnn":
        from distnet.train.jobs.cnnspec import (  # noqa: PLC0415
            LayerSpecError,
            build_cnn,
            flat_samples_error,
        )

        if input_shape is None or len(input_shape) != 3:
            raise JobError(flat_samples_error(n_in))
        try:
            return build_cnn(m["layers"], input_shape, n_classes)
        except LayerSpecError as e:
            raise JobError(f"[model] layers: {e}") from None
    sizes = [n_in, *m["hidden"]]
    if m["type"] == "stacked_autoencoder":
        return nn.StackedAutoEncoder(
            sizes, n_classes, activation=m["activation"], corruption=pre["corruption"],
            sparsity_target=pre["sparsity_target"], sparsity_weight=pre["sparsity_weight"],
            loss=pre["loss"], tied_weights=m["tied_weights"],
        )  # fmt: skip
    layers: list[Any] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers.append(nn.Dense(a, b, m["activation"]))
        if m["dropout"]:
            layers.append(nn.Dropout(m["dropout"]))
    return nn.Sequential(*layers, nn.Dense(sizes[-1], n_classes))


def build_stages(
    job: dict,
    model: Any,
    loader: Any,
    wrap: Callable[[Any, Any], Any],
    log: Callable[[str], None],
    on_pretrained: Callable[[int], None],
    rank: int = 0,
    watch: Callable[[Any], list[Callback]] | None = None,
    layer_loader: Callable[[int], Any] | None = None,
    validation: tuple[Any, Any] | None = None,
) -> list:
    """Pretraining stages (stacked autoencoders) and the supervised stage. ``watch(ctx)``
    gives the callbacks that report a stage's progress (default: an ``EpochPrinter``).
    ``wrap(optimizer, loader)`` makes a stage's optimiser data-parallel; ``loader`` is the one
    the stage iterates (an engine that splits batches unevenly hands it its split).

    ``layer_loader(k)`` (collective) may return a loader of layer k's input codes (then
    closed after the stage), or None to compute them from ``loader`` batch by batch.
    ``validation``: (x (n, ...), y (n,)), this rank's part of the held-out samples, evaluated
    after every supervised epoch (``val_loss``, ``val_accuracy``: means over all ranks)."""
    from distnet.optim import Adam  # noqa: PLC0415
    from distnet.train.loop.fit import fit  # noqa: PLC0415
    from distnet.train.loop.lrcallbacks import finetune_schedule  # noqa: PLC0415
    from distnet.train.loop.pipeline import Stage  # noqa: PLC0415

    pre, ft, every = job["pretrain"], job["finetune"], job["run"]["log_every"]
    seed = job["run"]["seed"]
    watch = watch or (lambda ctx: [EpochPrinter(log, every)])

    def pretrain(k: int) -> Callable[[Any], dict[str, Any]]:
        def fn(ctx: Any) -> dict[str, Any]:
            # the codes first: the stage iterates their loader. Encoders 0..k-1 are frozen
            # here, as the pipeline loaded them (an epoch checkpoint of this stage holds the
            # same), so the codes need not wait for ctx.restore
            codes = layer_loader(k) if layer_loader is not None and k > 0 else None
            try:
                opt = wrap(Adam(model.autoencoders[k], lr=per_layer(pre["lr"], k)), codes or loader)
            except BaseException:
                if codes is not None:
                    codes.close()
                raise
            start = ctx.restore(opt)
            saver = ctx.epoch_checkpoint(opt)
            try:
                model.pretrain_layer(
                    k, codes or loader, epochs=per_layer(pre["epochs"], k), optimizer=opt,
                    seed=seed + k, initial_epoch=start, encoded=codes is not None,
                    on_nonfinite=job["run"]["on_nonfinite"],
                    callbacks=[RankNoise(seed, ctx.index, rank), saver, *watch(ctx)],
                )  # fmt: skip
            finally:  # the next stage's wrapper must be the only one reducing
                opt.close()
                if codes is not None:
                    codes.close()
            if ctx.writer:
                on_pretrained(k)
            return {"kind": "pretrain", "layer": k, "history": saver.history}

        return fn

    def supervised(ctx: Any) -> dict[str, Any]:
        net = model  # a stacked autoencoder's forward is its classifier, over its one layout
        opt = wrap(_make_optimizer(ft, net), loader)
        start = ctx.restore(opt)
        saver = ctx.epoch_checkpoint(opt)
        schedule = finetune_schedule(ft)  # [finetune] schedule: plateau, cosine or step
        try:
            fit(
                net,
                loader,
                epochs=ft["epochs"],
                optimizer=opt,
                seed=seed + 100,
                initial_epoch=start,
                on_nonfinite=job["run"]["on_nonfinite"],
                validation_data=validation,
                callbacks=[
                    RankNoise(seed, ctx.index, rank),
                    saver,
                    schedule,
                    *watch(ctx),
                ],
            )
        finally:
            opt.close()
        return {"kind": "finetune", "history": saver.history}

    stages = []
    if hasattr(model, "autoencoders"):
        stages = [Stage(f"pretrain-{k}", pretrain(k)) for k in range(len(model.autoencoders))]
    return stages + [Stage("finetune" if stages else "train", supervised)]
