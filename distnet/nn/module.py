"""``Module``: layers and models, their parameters in one flat parameter buffer and one flat
gradient buffer (``distnet.nn.parameter``), modes, state and the Keras-style training API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from distnet import backend
from distnet.core.tensor import Tensor
from distnet.nn import training
from distnet.nn.parameter import Parameter, flat_buffers


def on_device_of(module: Module, x: Any) -> Any:
    """``x`` (an array, or None) on ``module``'s device: host data for a model on a GPU is
    copied there, everything else is returned as it is (Tensors too: moving one would cut
    it from its graph).

    The one place where inputs follow the model: ``fit``, ``evaluate``, ``predict`` and the
    job's pictures and reports call it, so a model moved with ``.to("cuda")`` takes the host
    arrays a user or a store hands it.
    """
    if x is None or isinstance(x, Tensor) or isinstance(x, (int, float)):
        return x
    device = module.device
    if device == "cpu" or backend.device_of(x) == device:
        return x
    return backend.to_device(x, device)


class Module:
    """Base class of layers and models (PyTorch's shape: parameters(), state_dict(), ...).

    Subclasses assign ``Parameter`` and ``Module`` attributes in ``__init__`` and implement
    ``forward``. Registration order is parameter order, and so flat-buffer order.
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_params" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() first")
        self._params.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            if value.name is None:
                value.name = name
            self._params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # -- parameters -------------------------------------------------------------------
    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter) pairs; a parameter shared by two modules appears once."""
        seen: set[int] = set()
        stack: list[tuple[str, Module]] = [(prefix, self)]
        # iterative pre-order walk: own parameters first, then children in registration order
        while stack:
            path, module = stack.pop()
            for name, p in module._params.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{path}{name}", p)
            for name, child in reversed(list(module._modules.items())):
                stack.append((f"{path}{name}.", child))

    def parameters(self) -> list[Parameter]:
        """All parameters, in flat-buffer order."""
        return [p for _, p in self.named_parameters()]

    def modules(self) -> Iterator[Module]:
        """This module and every module below it (pre-order)."""
        yield self
        for child in self._modules.values():
            yield from child.modules()

    def num_parameters(self) -> int:
        return int(np.sum([p.size for p in self.parameters()]))

    def flat_params(self) -> Any:
        """The one contiguous 1-D buffer of all parameters (each Parameter.data is a view)."""
        return flat_buffers(self.parameters())[0]

    def flat_grads(self) -> Any:
        """The one contiguous 1-D buffer of all gradients (each Parameter.grad is a view)."""
        return flat_buffers(self.parameters())[1]

    def lay_out_flat(self, zeros: Callable[[int, Any], Any]) -> tuple[Any, Any]:
        """Moves the flat (data, grad) buffers (n,) into new ones made by ``zeros(n, dtype)``
        (memory an engine shares with other processes): values and gradients are copied, a
        pinned layout stays pinned, optimisers made before follow (``follow_layout``).
        Returns the new (data, grad)."""
        params = self.parameters()
        data, grad = flat_buffers(params)
        owners = [p._layout_owner for p in params]
        new_data, new_grad = zeros(data.size, data.dtype), zeros(grad.size, grad.dtype)
        new_data[...] = data
        new_grad[...] = grad
        offset = 0
        for p, owner in zip(params, owners, strict=True):
            n, shape = p.size, p.shape
            p.bind_flat(new_data[offset : offset + n].reshape(shape),
                        new_grad[offset : offset + n].reshape(shape),
                        (new_data, new_grad, offset))  # fmt: skip
            p._layout_owner = owner
            offset += n
        return new_data, new_grad

    def zero_grad(self) -> None:
        """Sets every gradient to zero. The memset is deferred: the next backward writes the
        first contribution straight into the buffer; a reader before that sees zeros."""
        params = self.parameters()
        flat_buffers(params)
        for p in params:
            p.zero_grad_()

    @property
    def device(self) -> str:
        """'cpu' or 'cuda:N': where the parameters live ('cpu' for a module without any)."""
        for _, p in self.named_parameters():
            return p.device
        return "cpu"

    def to(self, device: str) -> Module:
        """Moves every parameter to ``device`` ('cpu', 'cuda', 'cuda:N'), in place.

        The flat buffers are rebuilt there on next use, so create optimisers after moving.
        """
        for p in self.parameters():
            p.bind_flat(backend.to_device(p.data, device), None, None)
        return self

    # -- modes ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Training mode (dropout active, batch norm uses batch statistics)."""
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        """Evaluation mode (dropout off, batch norm uses running statistics)."""
        return self.train(False)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[Module]:
        """Evaluation mode inside the block; afterwards every module gets its own mode back
        (a frozen BatchNorm a user put in eval mode stays frozen)."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            yield self
        finally:
            for m, mode in modes:
                object.__setattr__(m, "training", mode)

    # -- state ------------------------------------------------------------------------
    def buffers(self) -> dict[str, Any]:
        """Non-parameter state arrays of this module only (e.g. running means); override."""
        return {}

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        for name, b in self.buffers().items():
            yield f"{prefix}{name}", b
        for cname, child in self._modules.items():
            yield from child.named_buffers(f"{prefix}{cname}.")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter and buffer as numpy arrays, by dotted name."""
        state = {
            name: backend.to_device(p.data, "cpu").copy() for name, p in self.named_parameters()
        }
        for name, b in self.named_buffers():
            state[name] = backend.to_device(b, "cpu").copy()
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Copies values in place (flat-buffer views stay views).

        Raises:
            KeyError: with ``strict``, on missing or unexpected keys (all of them named).
            ValueError: on a shape mismatch (key, expected and found shapes named).
        """
        targets = dict(self.named_parameters())
        targets.update({k: b for k, b in self.named_buffers()})
        missing = sorted(set(targets) - set(state))
        unexpected = sorted(set(state) - set(targets))
        if strict and (missing or unexpected):
            raise KeyError(
                f"load_state_dict({type(self).__name__}): missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        for name, value in state.items():
            if name not in targets:
                continue
            target = targets[name]
            array = target.data if isinstance(target, Tensor) else target
            value = np.asarray(value) if not backend.is_gpu_array(value) else value
            if tuple(value.shape) != tuple(array.shape):
                raise ValueError(
                    f"load_state_dict({type(self).__name__}): {name!r} has shape "
                    f"{tuple(value.shape)}, the model expects {tuple(array.shape)}"
                )
            xp = backend.array_module(array)
            array[...] = xp.asarray(value, dtype=array.dtype)

    def __repr__(self) -> str:
        children = "".join(
            f"\n  ({n}): {repr(m).replace(chr(10), chr(10) + '  ')}"
            for n, m in self._modules.items()
        )
        return f"{type(self).__name__}({self.extra_repr()}{children}{chr(10) if children else ''})"

    def extra_repr(self) -> str:
        return ""

    # -- Keras-style training API (the loop lives in distnet.train; see nn/training.py) ----
    def fit(self, x: Any, y: Any = None, **kwargs: Any) -> Any:
        """Trains this model; see ``distnet.train.loop.fit`` (returns a ``History``)."""
        return training.trainer().fit(self, x, y, **kwargs)

    def evaluate(self, x: Any, y: Any = None, **kwargs: Any) -> dict[str, float]:
        """Mean loss and metrics on (x, y); see ``distnet.train.evaluate``."""
        return training.trainer().evaluate(self, x, y, **kwargs)

    def predict(self, x: Any, batch_size: int = 256) -> Any:
        """Outputs (N, ...) for x (N, ...) as a numpy array; see ``distnet.train.predict``."""
        return training.trainer().predict(self, x, batch_size)
