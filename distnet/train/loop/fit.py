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

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from distnet import backend, trace
from distnet.core.tensor import Tensor, no_grad
from distnet.nn import losses
from distnet.nn.module import on_device_of
from distnet.optim.factory import make_optimizer
from distnet.train.loop.batches import epoch_batches
from distnet.train.loop.callbacks import Callback, CallbackList, History, Loop
from distnet.train.loop.finite import NonFiniteError as NonFiniteError  # where it lived before
from distnet.train.loop.finite import decide, poisoned

LOSSES = losses.LOSSES  # the one registry (distnet.nn.losses), Keras names included


def _accuracy(out: Tensor, y: Any) -> float:
    xp = backend.array_module(out.data)
    return float((out.data.argmax(axis=1) == xp.asarray(y)).mean())


METRICS: dict[str, Callable[[Tensor, Any], float]] = {"accuracy": _accuracy, "acc": _accuracy}


# -- setup helpers -------------------------------------------------------------------------
class Objective:
    """(model, x, y) -> (loss Tensor, output or None), resolved on the first batch.

    Resolution waits for a batch because a loader's label type is only known then.
    """

    def __init__(self, loss: Any, metrics: Sequence[str] | None):
        if isinstance(loss, str):
            losses.get_loss(loss)  # an unknown name fails now, listing the known ones
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
            self.fn = losses.get_loss(name)
        if self.metrics is None:
            classify = self.loss is None or isinstance(self.fn, losses.CrossEntropyLoss)
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
    on_nonfinite: str = "stop",
) -> History:
    """Trains ``model`` for ``epochs - initial_epoch`` epochs (Keras's ``fit``).

    Args:
        x: inputs (N, ...) or a loader of (x, y) batches. y: targets (N,) int labels or
            (N, ...) floats, or None (see the module docstring).
        batch_size: samples per step for arrays, over all ranks: under a distributed
            optimiser each rank takes its own part of every global batch
            (``distnet.train.loop.batches``); a loader brings its own batches and shares.
        validation_data: (x_val, y_val), x_val alone, or a loader; evaluated after every
            epoch into ``val_loss`` and ``val_<metric>``.
        callbacks: ``Callback`` objects (EarlyStopping, ModelCheckpoint, ...).
        optimizer: an optimiser (or wrapper with zero_grad/step), a factory
            ``module -> optimiser``, or a name (``distnet.optim.make_optimizer``); default
            'adam' with ``lr``.
        loss: a name in ``distnet.nn.losses.LOSSES`` (Keras names too), a callable
            (output, target) -> Tensor, or None (cross entropy for int labels, MSE for float
            targets, ``model.loss(x)`` when y is None).
        metrics: names in ``METRICS``; default ['accuracy'] for int labels.
        initial_epoch: epoch to start at (resuming); ``seed`` fixes the shuffling order,
            a function of (seed, epoch); by default drawn from ``distnet.backend``'s generator.
        verbose: 1 adds a ``ProgressBar``.
        check_finite: check the loss and the (reduced) gradients before every
            ``optimizer.step()``, and decide together with every rank (``finite.decide``:
            one small allreduce per step, none while the steps are finite when the wrapper
            reduces the whole gradient); the parameters never take a NaN/inf step.
        on_nonfinite: 'stop' raises ``NonFiniteError`` naming the step, the rank(s) and the
            parameter; 'skip' drops that step on every rank (a warning names the same; the
            count per epoch is ``history["skipped_steps"]``) and training goes on.
    Returns:
        ``History``: ``history["loss"]``, ``["val_loss"]``, ... one value per epoch.
    """
    from distnet.train.loop.callbacks import ProgressBar  # noqa: PLC0415

    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    objective = Objective(loss, metrics)
    optimizer = make_optimizer(optimizer, model, lr)
    grads = optimizer.flat_grads
    comm = optimizer.comm
    # the ranks that must take the same finite decision: every rank of a synchronous job; a
    # wrapper whose ranks step independently (an async parameter server) names a smaller
    # group, or None (each rank decides alone)
    agree = optimizer.finite_comm
    # the wrapper reduces the whole gradient in place over that group: the finite decision
    # rides on the reduction (no exchange of its own while every step is finite)
    grads_agree = optimizer.grads_agree and agree is comm
    grads_agree = grads_agree and comm is not None and comm.size > 1
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    if optimizer.backward_passes_per_step != 1:
        raise ValueError(
            "fit takes one backward pass per step; the optimiser expects "
            f"backward_passes_per_step={optimizer.backward_passes_per_step} (for a larger "
            "batch pass a larger batch_size, or write the loop with several backward passes)"
        )
    # the non-finite check needs the whole gradient before any parameter moves: no update
    # inside backward while it is on (a wrapper passes it to the optimiser inside)
    optimizer.require_whole_gradient("check_finite", check_finite)
    if seed is None:
        seed = int(backend.default_rng().integers(2**31))
    if size > 1:  # one shuffling order for all ranks, so that their shards are disjoint
        seed = int(comm.allgather(seed)[0])

    history = History()
    cbs = list(callbacks or [])
    if verbose and not any(isinstance(c, ProgressBar) for c in cbs):
        cbs.append(ProgressBar())
    # a resumed run goes on counting from the restored optimiser's steps
    loop = Loop(model=model, optimizer=optimizer, epochs=epochs, seed=seed,
                step=int(optimizer.steps))  # fmt: skip
    callback_list = CallbackList([history, *cbs], loop)

    model.train()
    # The optimiser's protocol (``distnet.optim.protocol``): ``backward`` weights the seed
    # gradient by this rank's share; a distributed optimiser reduces (and, with overlap, is
    # still reducing) the gradients, and the finite check reads them once synchronize() has
    # waited for every reduction; what each rank saw then goes through one tiny allreduce
    # (finite.decide; none when the whole reduced gradient is the same everywhere), so every
    # rank of the group stops or skips together whatever its wrapper reduced (a ZeRO-1
    # slice, or nothing before a parameter server's push). ``skip_step``: a wrapper whose
    # ranks skip alone (an async parameter server) counts a skipped step where others
    # count steps (the shards' clocks, an epoch-end collective).
    callback_list.on_train_begin({})
    for epoch in range(initial_epoch, epochs):
        if loop.stop_training:
            break
        loop.epoch = epoch
        batches, loop.batches_per_epoch = epoch_batches(
            x, y, batch_size, shuffle, seed, epoch, rank, size
        )
        callback_list.on_epoch_begin(epoch, {})
        model.train()
        sums = _zero_sums(objective)
        seen = skipped = 0
        for b, (xb, yb, share) in enumerate(trace.timed(batches, "input_wait")):
            callback_list.on_batch_begin(b, {"step": loop.step})
            xb, yb = _like_model(xb, model), _like_model(yb, model)
            n = len(xb)
            optimizer.zero_grad()
            if n:
                with trace.span("forward"):
                    loss_t, out = objective(model, xb, yb)
                loss_value = None  # read after backward (on a GPU: a wait for it all)
                if grads_agree and check_finite:
                    loss_value = float(loss_t.data)
                    if not np.isfinite(loss_value):  # so that the reduced gradient shows it
                        loss_t = poisoned(loss_t)
                with trace.span("backward"):
                    optimizer.backward(loss_t, batch_share=share)
                if loss_value is None:
                    loss_value = float(loss_t.data)
            else:  # no samples here in a short last global batch: reduce zeros, share 0,
                loss_value = 0.0  # and take part in the finite decision like every rank
            if check_finite:
                applied = optimizer.synchronize() if n else optimizer.synchronize(batch_share=0.0)
                error = decide(loss_value, model, grads, applied, agree, loop.step, epoch, b,
                               rank=rank if size > 1 else None,
                               grads_agree=grads_agree)  # fmt: skip
                if error is not None:
                    if on_nonfinite == "stop":
                        raise error
                    warnings.warn(f"skipped: {error}", RuntimeWarning, stacklevel=2)
                    skipped += 1
                    optimizer.zero_grad()  # every rank of the group took the same decision
                    optimizer.skip_step()  # a wrapper that counts steps taken counts it too
                    loop.step += 1
                    continue
            with trace.span("optimizer_step"):  # and the allreduce, unless synchronize() ran it
                if n:
                    optimizer.step()
                else:
                    optimizer.step(batch_share=0.0)
            loop.step += 1
            if not n:
                continue
            seen += n
            batch_logs = {"loss": loss_value, **objective.metric_values(out, yb)}
            for k, v in batch_logs.items():
                sums[k] = sums.get(k, 0.0) + v * n
            callback_list.on_batch_end(b, {**batch_logs, "size": n, "step": loop.step})
        logs = _epoch_means(sums, seen, comm)
        if on_nonfinite == "skip":  # the same count on every rank: they skip together
            logs["skipped_steps"] = skipped
        if validation_data is not None:
            xv, yv = _split_validation(validation_data)
            val_sums, val_seen = _evaluate_sums(model, xv, yv, max(batch_size, 256), objective)
            # each rank may hold its own validation shard: average over all of them, so that
            # EarlyStopping / ReduceLROnPlateau on val_* decide the same on every rank
            val = _epoch_means(val_sums, val_seen, comm)
            logs.update({f"val_{k}": v for k, v in val.items()})
        logs["lr"] = float(optimizer.lr)
        callback_list.on_epoch_end(epoch, logs)
    callback_list.on_train_end({})
    return history


def _zero_sums(objective: Objective) -> dict[str, float]:
    """Per-key sums, every key present from the start: a rank without samples must send the
    same keys as the others to the allreduce of the means."""
    return {"loss": 0.0, **{m: 0.0 for m in objective.metrics or []}}


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
    sums, seen = _evaluate_sums(model, x, y, batch_size, objective)
    return {k: v / max(seen, 1) for k, v in sums.items()}


def _evaluate_sums(
    model: Any, x: Any, y: Any, batch_size: int, objective: Objective
) -> tuple[dict[str, float], int]:
    """Sample-weighted sums of loss and metrics over (x, y), and the number of samples."""
    sums = _zero_sums(objective)
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
    return sums, seen


def predict(model: Any, x: Any, batch_size: int = 256) -> np.ndarray:
    """Model outputs for x (N, ...) -> (N, ...) as one numpy array (eval mode, no graph)."""
    outs = []
    with model.evaluating(), no_grad():
        for xb, _ in _eval_batches(x, None, batch_size):
            outs.append(backend.to_device(model(_like_model(xb, model)).data, "cpu"))
    return np.concatenate(outs) if outs else np.empty((0,))
