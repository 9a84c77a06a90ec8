"""Keras-style ``model.fit`` / ``evaluate`` / ``predict`` without ``nn`` knowing the loop.

``nn`` sits below ``train`` in the layers (DESIGN.md), so it must not import the training
loop, yet ``model.fit(x, y)`` is what Keras users reach for. ``nn`` therefore declares what it
needs, a *trainer* (an object with ``fit(model, x, y, **kw)``, ``evaluate(model, x, y, **kw)``
and ``predict(model, x, batch_size)``, i.e. the module ``distnet.train.fit``), and the
composition root provides it: the package's ``distnet/__init__.py``, the one module that wires
the layers together, registers a provider that imports the loop on the first call. So the
methods work after any ``import distnet...`` (the root always runs first), the loop and its
imports (optim, data, parallel) load only when a model is trained, and no module of ``nn``
imports upwards (tests/test_layering.py checks it statically).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_provider: Callable[[], Any] | None = None


def provide_trainer(provider: Callable[[], Any]) -> None:
    """Registers ``provider() -> trainer``; called by the composition root (or a test)."""
    global _provider
    _provider = provider


def trainer() -> Any:
    """The registered trainer (``distnet.train.fit`` in a normal install)."""
    if _provider is None:
        raise RuntimeError(
            "model.fit/evaluate/predict need a trainer, and none is registered: "
            "import distnet (the package registers distnet.train's loop) or call "
            "distnet.nn.training.provide_trainer"
        )
    return _provider()
