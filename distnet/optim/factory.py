"""``make_optimizer``: the one optimiser factory behind ``fit(optimizer=...)`` and job files.

Names are Keras's (``"sgd"``, ``"adam"``, ``"rmsprop"``, ``"adagrad"``, any case), each with
Keras's default learning rate; an unknown name is one error listing the known ones.
"""

from __future__ import annotations

from typing import Any

from distnet.optim.adaptive import AdaGrad, Adam, RMSProp
from distnet.optim.optimizer import SGD, Optimizer
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
        spec: an optimiser (returned as is), a name in ``OPTIMIZERS``, an ``Optimizer``
            class (called as ``cls(model, lr=lr, **options)``), a factory ``model ->
            optimiser``, or None ('adam').
        lr: learning rate; None takes the name's default (or the class's own).
        options: further constructor arguments (``momentum``, ``weight_decay``, ...).
    """
    if spec is None:
        spec = "adam"
    if isinstance(spec, type):  # a class has step() too, but is no optimiser yet
        kwargs = dict(options) if lr is None else {"lr": lr, **options}
        return spec(model, **kwargs)
    if hasattr(spec, "step") and hasattr(spec, "zero_grad"):
        return spec
    if callable(spec):
        return spec(model)
    cls = optimizer_class(spec)
    default_lr = OPTIMIZERS[str(spec).lower()][1]
    return cls(model, lr=default_lr if lr is None else lr, **options)
