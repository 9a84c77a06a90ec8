"""distnet: data-parallel neural-network training you can read and own.

Layers (each imports only those above it): backend, core, nn, optim, data, parallel, train, cli.
The subpackages load on first use (PEP 562): `import distnet as dn; dn.nn.Dense(...)`.
"""

from distnet import functional
from distnet.core import (
    Tensor,
    abs,
    clip,
    concatenate,
    exp,
    leaky_relu,
    log,
    matmul,
    no_grad,
    relu,
    sigmoid,
    sqrt,
    tanh,
)

__version__ = "0.1.0"


def _default_trainer():
    """The training loop behind ``Module.fit`` (see distnet/nn/training.py): this package is
    the composition root that wires the layers, so nn asks it instead of importing train."""
    import importlib  # noqa: PLC0415

    return importlib.import_module("distnet.train.loop.fit")


_SUBPACKAGES = ("backend", "bench", "core", "data", "nn", "optim", "parallel", "train", "viz")


def __getattr__(name: str):
    """Import `distnet.<subpackage>` on first attribute access (PEP 562); `dist` is the old name."""
    import importlib  # noqa: PLC0415

    if name in _SUBPACKAGES or name == "dist":
        return importlib.import_module(f"distnet.{name}")
    raise AttributeError(f"module 'distnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES))


__all__ = [
    "Tensor",
    "no_grad",
    "functional",
    "concatenate",
    "matmul",
    "exp",
    "log",
    "sqrt",
    "abs",
    "tanh",
    "sigmoid",
    "relu",
    "leaky_relu",
    "clip",
    "__version__",
]
