"""The shards' optimiser: a ``distnet.optim`` optimiser over one slice of the flat buffer,
built from the settings of the workers' one (``optimizer_settings``, its inverse)."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np


def build_optimizer(config: dict[str, Any], params: np.ndarray, mask: np.ndarray | None) -> Any:
    """A ``distnet.optim`` optimiser over a copy of ``params`` (1-D float32), from
    ``config = {"name": "adam", "lr": ..., ...}``; ``mask`` is the slice of the penalty mask
    (1 where weight decay / L1 apply) when the config has any (``optim.flat_optimizer``)."""
    from distnet.optim import flat_optimizer

    kwargs = {k: v for k, v in config.items() if k != "name"}
    name = str(config.get("name", "sgd")).lower()
    try:
        return flat_optimizer(name, params, mask, **kwargs)
    except ValueError as e:
        if "unknown optimizer" in str(e):
            raise ValueError(f"parameter server: {e}") from None
        raise


def optimizer_settings(opt: Any) -> dict[str, Any]:
    """``{"name": "adam", "lr": ..., ...}``: every keyword argument of the constructor of the
    ``distnet.optim`` optimiser ``opt``, read back from ``opt`` (what ``build_optimizer``
    takes). Read from the signature, so that no setting (AdaGrad's
    ``initial_accumulator_value`` was one) is left behind on the shards."""
    cls = type(opt)
    settings: dict[str, Any] = {"name": cls.__name__.lower()}
    for name in list(inspect.signature(cls.__init__).parameters)[2:]:  # after self, params
        if name == "betas":  # Adam keeps them apart
            settings[name] = (opt.beta1, opt.beta2)
        elif hasattr(opt, name):
            settings[name] = getattr(opt, name)
        else:
            raise ValueError(
                f"parameter server: {cls.__name__}'s argument {name!r} is not an attribute "
                "of the optimiser: the shards could not build the same one"
            )
    return settings
