"""The training loop behind ``model.fit``, ``model.evaluate`` and ``model.predict``.

One step is exactly ``optimizer.zero_grad(); loss.backward(); optimizer.step()``, so any
object with those methods can stand in for the optimiser, e.g. a ``DistributedOptimizer``
that allreduces the flat gradient buffer inside ``step()``. When the optimiser has its own
``backward(loss)`` (Horovod-style wrappers do: it folds the rank's batch share into the seed
gradient, saving a pass over the gradient buffer), that is called instead of
``loss.backward()``.

Data is either arrays ``x`` (N, ...) and ``y`` (N,) / (N, ...) / None, or an iterable loader
yielding ``(x, y)`` batches (``distnet.data.StreamLoader``; ``set_epoch(e)`` is called before
each epoch when the loader has it). With ``y=None`` the objective is ``model.loss(x)``
(autoencoders) or, when ``loss`` is given, ``loss(model(x), x)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from distnet import backend, trace
from distnet.core import functional as F
from distnet.core.tensor import Tensor, no_grad
from distnet.nn.module import on_device_of
from distnet.train.callbacks import Callback, CallbackList, History, Loop

LOSSES: dict[str, Callable[[Tensor, Any], Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "sparse_categorical_crossentropy": F.cross_entropy,
    "nll": F.nll_loss,
    "mse": F.mse_loss,
    "binary_cross_entropy": F.binary_cross_entropy,
    "bce_with_logits": lambda z, t: F.binary_cross_entropy(z, t, from_logits=True),
}


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN or infinite during training."""


def _accuracy(out: Tensor, y: Any) -> float:
    xp = backend.array_module(out.data)
    return float((out.data.argmax(axis=1) == xp.asarray(y)).mean())


METRICS: dict[str, Callable[[Tensor, Any], float]] = {"accuracy": _accuracy, "acc": _accuracy}


# -- setup helpers -------------------------------------------------------------------------
def make_optimizer(spec: Any, model: Any, lr: float | None = None) -> Any:
    """An optimiser for ``model`` from an instance (returned as is), a name, a class or a
    factory.

    Names: 'adam' (lr 1e-3), 'sgd' (lr 0.01), 'rmsprop' (lr 1e-3), 'adagrad' (lr 1e-2). A
    class (``optim.Adam``) is called as ``cls(model)`` (with ``lr`` when given), a factory as
    ``factory(model)``.
    """
    from distnet import optim  # noqa: PLC0415  (train sits above optim; lazy keeps imports light)

    if spec is None:
        spec = "adam"
    if isinstance(spec, type):  # a class has step() too, but is no optimiser yet
        return spec(model) if lr is None else spec(model, lr=lr)
    if hasattr(spec, "step") and hasattr(spec, "zero_grad"):
        return spec
    if callable(spec):
        return spec(model)
    defaults = {"adam": (optim.Adam, 1e-3), "sgd": (optim.SGD, 1e-2),
                "rmsprop": (optim.RMSProp, 1e-3), "adagrad": (optim.AdaGrad, 1e-2)}  # fmt: skip
    name = str(spec).lower()
    if name not in defaults:
        raise ValueError(
            f"unknown optimizer {spec!r}: pass an optimiser, a class, a factory or one of "
            f"{sorted(defaults)}"
        )
    cls, default_lr = defaults[name]
    return cls(model, lr=lr or default_lr)


class Objective:
    """(model, x, y) -> (loss Tensor, output or None), resolved on the first batch.

    Resolution waits for a batch because a loader's label type is only known then.
    """

    def __init__(self, loss: Any, metrics: Sequence[str] | None):
        if isinstance(loss, str) and loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)} or a callable")
        unknown = [m for m in (metrics or []) if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {sorted(METRICS)}")
        self.loss, self.metrics = loss, None if metrics is None else list(metrics)
        self.fn: Callable[[Tensor, Any], Tensor] | None = None
        self.unsupervised = False

    def _resolve(self, model: Any, yb: Any) -> None:
        is_labels = yb is not None and yb.dtype.kind in "iu"
        if self.loss is None and yb is None:
            if not hasattr(model, "loss"):
                raise TypeError(f"y is None and {type(model).__name__} has no loss(x) method")
            self.unsupervised = True
        else:
            name = self.loss if self.loss is not None else ("cross_entropy" if is_labels else "mse")
            self.fn = LOSSES[name] if isinstance(name, str) else name
        if self.metrics is None:
            classify = self.loss in (None, "cross_entropy", "sparse_categorical_crossentropy")
            self.metrics = ["accuracy"] if is_labels and classify else []

    def __call__(self, model: Any, xb: Any, yb: Any) -> tuple[Tensor, Tensor | None]:
        if self.metrics is None:
            self._resolve(model, yb)
        if self.unsupervised:
            return model.loss(xb), None
        out = model(xb)
        return self.fn(out, xb if yb is None else yb), out  # type: ignore[misc]

    def metric_values(self, out: Tensor | None, yb: Any) -> dict[str, float]:
        if out is None or yb is None:
            return {}
        return {m: METRICS[m](out, yb) for m in self.metrics or []}


def _like_model(batch: Any, model: Any) -> Any:
    """A batch on the model's device (loaders yield numpy; the model may live on a GPU)."""
    if not hasattr(model, "device"):  # a bare callable with parameters(): no device known
        return batch
    return on_device_of(model, batch)


def _batches(
    x: Any, y: Any, batch_size: int, shuffle: bool, seed: int, epoch: int
) -> tuple[Iterator[tuple[Any, Any]], int]:
    """(x, y) batches of one epoch and how many there are; the order depends on (seed, epoch)
    only, so a run resumed at an epoch boundary sees the same batches."""
    if not hasattr(x, "shape"):  # a loader
        if y is not None:
            raise TypeError("fit: with a loader for x, y must be None (the loader yields it)")
        if hasattr(x, "set_epoch"):
            x.set_epoch(epoch)
        n_batches = len(x) if hasattr(x, "__len__") else -1
        return iter(x), n_batches
    n = len(x)
    if y is not None and len(y) != n:
        raise ValueError(f"fit: x has {n} samples but y has {len(y)}")
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n)
    else:
        order = np.arange(n)
    starts = range(0, n, batch_size)

    def gen() -> Iterator[tuple[Any, Any]]:
        for s in starts:
            idx = order[s : s + batch_size]
            if backend.is_gpu_array(x):
                idx = backend.to_device(idx, backend.device_of(x))
            yield x[idx], (None if y is None else y[idx])

    return gen(), len(starts)


def _check_finite(loss_value: float, model: Any, grads: Any, step: int, epoch: int, batch: int):
    xp = backend.array_module(grads)
    grads_ok = bool(xp.isfinite(grads).all())
    if grads_ok and np.isfinite(loss_value):
        return
    named = list(model.named_parameters())
    bad = [name for name, p in named if p.grad is not None and not xp.isfinite(p.grad).all()]
    where = f"step {step} (epoch {epoch}, batch {batch})"
    if bad:
        # backward runs output layer first, so the last bad parameter went non-finite first
        first = bad[-1]
        layer = first.rsplit(".", 1)[0] if "." in first else type(model).__name__
        raise NonFiniteError(
            f"non-finite gradient at {where}: first in backward order {first!r} "
            f"(layer {layer!r}) "
            f"(loss={loss_value}; non-finite gradients in {len(bad)} of {len(named)} "
            f"parameters: {', '.join(bad)})"
        )
    raise NonFiniteError(f"non-finite loss {loss_value} at {where}; gradients are finite")


# -- the public API ------------------------------------------------------------------------
def fit(
    model: Any,
    x: Any,
    y: Any = None,
    batch_size: int = 32,
    epochs: int = 1,
    validation_data: Any = None,
    callbacks: Sequence[Callback] | None = None,
    shuffle: bool = True,
    optimizer: Any = None,
    loss: Any = None,
    metrics: Sequence[str] | None = None,
    initial_epoch: int = 0,
    seed: int | None = None,
    lr: float | None = None,
    verbose: int = 0,
    check_finite: bool = True,
) -> History:
    """Trains ``model`` for ``epochs - initial_epoch`` epochs (Keras's ``fit``).

    Args:
        x: inputs (N, ...) or a loader of (x, y) batches. y: targets (N,) int labels or
            (N, ...) floats, or None (see the module docstring).
        validation_data: (x_val, y_val), x_val alone, or a loader; evaluated after every
            epoch into ``val_loss`` and ``val_<metric>``.
        callbacks: ``Callback`` objects (EarlyStopping, ModelCheckpoint, ...).
        optimizer: an optimiser (or wrapper with zero_grad/step), a factory
            ``module -> optimiser``, or a name; default 'adam' with ``lr``.
        loss: a name in ``LOSSES``, a callable (output, target) -> Tensor, or None (cross
            entropy for int labels, MSE for float targets, ``model.loss(x)`` when y is None).
        metrics: names in ``METRICS``; default ['accuracy'] for int labels.
        initial_epoch: epoch to start at (resuming); ``seed`` fixes the shuffling order,
            a function of (seed, epoch); by default drawn from ``distnet.backend``'s generator.
        verbose: 1 adds a ``ProgressBar``.
        check_finite: stop with ``NonFiniteError`` naming the step and parameter when the
            loss or a gradient is NaN/inf (checked before ``optimizer.step()``).
    Returns:
        ``History``: ``history["loss"]``, ``["val_loss"]``, ... one value per epoch.
    """
    from distnet.train.callbacks import ProgressBar  # noqa: PLC0415

    objective = Objective(loss, metrics)
    optimizer = make_optimizer(optimizer, model, lr)
    grads = getattr(optimizer, "flat_grads", None)
    grads = grads if hasattr(grads, "shape") else model.flat_grads()
    if seed is None:
        seed = int(backend.default_rng().integers(2**31))

    history = History()
    cbs = list(callbacks or [])
    if verbose and not any(isinstance(c, ProgressBar) for c in cbs):
        cbs.append(ProgressBar())
    # a resumed run goes on counting from the restored optimiser's steps
    loop = Loop(model=model, optimizer=optimizer, epochs=epochs, seed=seed,
                step=int(getattr(optimizer, "steps", 0)))  # fmt: skip
    callback_list = CallbackList([history, *cbs], loop)

    model.train()
    backward = getattr(optimizer, "backward", None) or Tensor.backward
    callback_list.on_train_begin({})
    for epoch in range(initial_epoch, epochs):
        if loop.stop_training:
            break
        loop.epoch = epoch
        batches, loop.batches_per_epoch = _batches(x, y, batch_size, shuffle, seed, epoch)
        callback_list.on_epoch_begin(epoch, {})
        model.train()
        sums: dict[str, float] = {"loss": 0.0}
        seen = 0
        for b, (xb, yb) in enumerate(trace.timed(batches, "input_wait")):
            xb, yb = _like_model(xb, model), _like_model(yb, model)
            optimizer.zero_grad()
            with trace.span("forward"):
                loss_t, out = objective(model, xb, yb)
            with trace.span("backward"):
                backward(loss_t)
            loss_value = float(loss_t.data)
            if check_finite:
                _check_finite(loss_value, model, grads, loop.step, epoch, b)
            with trace.span("optimizer_step"):  # holds the allreduce of a distributed step
                optimizer.step()
            loop.step += 1
            n = len(xb)
            seen += n
            batch_logs = {"loss": loss_value, **objective.metric_values(out, yb)}
            for k, v in batch_logs.items():
                sums[k] = sums.get(k, 0.0) + v * n
            callback_list.on_batch_end(b, {**batch_logs, "size": n, "step": loop.step})
        logs = _epoch_means(sums, seen, getattr(optimizer, "comm", None))
        if validation_data is not None:
            xv, yv = _split_validation(validation_data)
            val = _evaluate(model, xv, yv, max(batch_size, 256), objective)
            logs.update({f"val_{k}": v for k, v in val.items()})
        logs["lr"] = float(getattr(optimizer, "lr", float("nan")))
        callback_list.on_epoch_end(epoch, logs)
    callback_list.on_train_end({})
    return history


def _epoch_means(sums: dict[str, float], seen: int, comm: Any) -> dict[str, float]:
    """Per-sample means of the epoch's sums, over all ranks when training is distributed.

    Every rank must see the same numbers: ReduceLROnPlateau or EarlyStopping deciding on a
    rank's own shard would change one replica's learning rate, or stop one rank while the
    others wait in an allreduce.
    """
    keys = list(sums)  # the same order on every rank: loss first, then the metrics
    if comm is not None and comm.size > 1:
        buf = np.array([sums[k] for k in keys] + [seen], dtype=np.float64)
        comm.allreduce(buf, op="sum")
        sums, seen = dict(zip(keys, buf[:-1].tolist(), strict=True)), int(buf[-1])
    return {k: sums[k] / max(seen, 1) for k in keys}


def _split_validation(data: Any) -> tuple[Any, Any]:
    if isinstance(data, tuple):
        if len(data) != 2:
            raise ValueError(f"validation_data: expected (x, y), got a tuple of {len(data)}")
        return data
    return data, None


def _eval_batches(x: Any, y: Any, batch_size: int) -> Iterable[tuple[Any, Any]]:
    if not hasattr(x, "shape"):
        return x
    return ((x[s : s + batch_size], None if y is None else y[s : s + batch_size])
            for s in range(0, len(x), batch_size))  # fmt: skip


def evaluate(
    model: Any,
    x: Any,
    y: Any = None,
    batch_size: int = 256,
    loss: Any = None,
    metrics: Sequence[str] | None = None,
) -> dict[str, float]:
    """Mean loss and metrics over (x, y) in eval mode, without a graph.

    Shapes as for ``fit``. Returns ``{"loss": ..., "accuracy": ..., ...}`` (sample-weighted).
    """
    return _evaluate(model, x, y, batch_size, Objective(loss, metrics))


def _evaluate(model: Any, x: Any, y: Any, batch_size: int, objective: Objective) -> dict:
    sums: dict[str, float] = {"loss": 0.0}
    seen = 0
    with model.evaluating():
        with no_grad():
            for xb, yb in _eval_batches(x, y, batch_size):
                xb, yb = _like_model(xb, model), _like_model(yb, model)
                loss_t, out = objective(model, xb, yb)
                n = len(xb)
                for k, v in {
                    "loss": float(loss_t.data),
                    **objective.metric_values(out, yb),
                }.items():
                    sums[k] = sums.get(k, 0.0) + v * n
                seen += n
    return {k: v / max(seen, 1) for k, v in sums.items()}


def predict(model: Any, x: Any, batch_size: int = 256) -> np.ndarray:
    """Model outputs for x (N, ...) -> (N, ...) as one numpy array (eval mode, no graph)."""
    outs = []
    with model.evaluating(), no_grad():
        for xb, _ in _eval_batches(x, None, batch_size):
            outs.append(backend.to_device(model(_like_model(xb, model)).data, "cpu"))
    return np.concatenate(outs) if outs else np.empty((0,))
