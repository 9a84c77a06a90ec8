"""``make_optimizer``: the one optimiser factory behind ``fit(optimizer=...)`` and job files.

Names are Keras's (``"sgd"``, ``"adam"``, ``"rmsprop"``, ``"adagrad"``, any case), each with
Keras's default learning rate; an unknown name is one error listing the known ones.
"""

from __future__ import annotations

from typing import Any

from distnet.optim.adaptive import AdaGrad, Adam, RMSProp
from distnet.optim.optimizer import SGD, Optimizer
from distnet.optim.protocol import ForeignOptimizer, LoopProtocol
from distnet.suggest import did_you_mean

# name -> (class, default lr)
OPTIMIZERS: dict[str, tuple[type[Optimizer], float]] = {
    "sgd": (SGD, 1e-2),
    "adam": (Adam, 1e-3),
    "rmsprop": (RMSProp, 1e-3),
    "adagrad": (AdaGrad, 1e-2),
}


def optimizer_class(name: str) -> type[Optimizer]:
    """The optimiser class of a name in ``OPTIMIZERS`` (case-insensitive).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}{did_you_mean(key, OPTIMIZERS)}; known: "
                         f"{', '.join(sorted(OPTIMIZERS))}")  # fmt: skip
    return OPTIMIZERS[key][0]


def make_optimizer(spec: Any, model: Any, lr: float | None = None, **options: Any) -> Any:
    """An optimiser for ``model`` (a Module or its parameters).

    Args:
        spec: an optimiser (returned as is; another object with ``zero_grad`` and ``step``
            comes back as a ``ForeignOptimizer`` around it), a name in ``OPTIMIZERS``, an
            ``Optimizer`` class (called as ``cls(model, lr=lr, **options)``), a factory
            ``model -> optimiser``, or None ('adam').
        lr: learning rate; None takes the name's default (or the class's own).
        options: further constructor arguments (``momentum``, ``weight_decay``, ...).
    """
    if spec is None:
        spec = "adam"
    if isinstance(spec, type):  # a class has step() too, but is no optimiser yet
        kwargs = dict(options) if lr is None else {"lr": lr, **options}
        return spec(model, **kwargs)
    if isinstance(spec, LoopProtocol):
        return spec
    if hasattr(spec, "step") and hasattr(spec, "zero_grad"):  # not ours: seen through the protocol
        return ForeignOptimizer(spec, model)
    if callable(spec):
        return spec(model)
    cls = optimizer_class(spec)
    default_lr = OPTIMIZERS[str(spec).lower()][1]
    return cls(model, lr=default_lr if lr is None else lr, **options)


def flat_optimizer(name: str, params: Any, penalty_mask: Any = None, **options: Any) -> Optimizer:
    """The optimiser ``name`` (in ``OPTIMIZERS``) over a copy of one flat float32 array
    ``params`` (n,): the update rules at the array level, for code that holds slices of a flat
    buffer and no model (the parameter server's shards). ``penalty_mask`` (n,): 1 where weight
    decay / L1 apply (None: the optimiser's own rule for a 1-D parameter).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    import numpy as np  # noqa: PLC0415

    from distnet.nn.parameter import Parameter  # noqa: PLC0415  (optim sits above nn)

    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    flat = Parameter(np.array(params, dtype=np.float32, copy=True))
    opt = optimizer_class(name)([flat], **options)
    if penalty_mask is not None:
        opt._penalty_mask = np.asarray(penalty_mask, dtype=np.float32)
    return opt
