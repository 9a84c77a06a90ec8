"""Keras-style ``model.fit`` / ``evaluate`` / ``predict`` without ``nn`` knowing the loop.

``nn`` sits below ``train`` in the layers (docs/design.md), so it must not import the training
loop, yet ``model.fit(x, y)`` is what Keras users reach for. ``nn`` therefore declares what it
needs, a *trainer* (an object with ``fit(model, x, y, **kw)``, ``evaluate(model, x, y, **kw)``
and ``predict(model, x, batch_size)``, i.e. the module ``distnet.train.loop.fit``), and the
composition root provides it: the package's ``distnet/__init__.py``, the one module that wires
the layers together, names the default trainer and imports it on the first call. So the
methods work without importing ``distnet.train`` first, the loop and its imports (optim, data,
parallel) load only when a model is trained, ``import distnet`` stays lazy, and no module of
``nn`` imports upwards (tests/unit/test_layering.py checks it statically).
``provide_trainer`` replaces the default (a test, or another training loop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_provider: Callable[[], Any] | None = None


def provide_trainer(provider: Callable[[], Any] | None) -> None:
    """Registers ``provider() -> trainer`` in place of the default; None restores it."""
    global _provider
    _provider = provider


def trainer() -> Any:
    """The registered trainer, else the package root's default (``distnet.train.loop.fit``)."""
    if _provider is not None:
        return _provider()
    import distnet  # noqa: PLC0415  (the package root, which nn's modules sit inside)

    return distnet._default_trainer()
