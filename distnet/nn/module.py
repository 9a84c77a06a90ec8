"""``Module`` and ``Parameter``, with one flat parameter buffer and one flat gradient buffer.

Every parameter's ``.data`` and ``.grad`` are views into two contiguous 1-D buffers, in
``parameters()`` order. Optimisers update the flat buffer in one pass; the distributed layer
allreduces slices (buckets) of the gradient buffer with no copies; parameter-server shards are
contiguous ranges of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from distnet import backend
from distnet.core.tensor import Tensor
from distnet.nn import training

_DATA = Tensor.data  # the slot behind Tensor.data, for the re-binding below
_GRAD = Tensor.grad  # Tensor's grad property (deferred zeroing)


class Parameter(Tensor):
    """A leaf tensor that a ``Module`` owns and an optimiser updates (requires_grad=True).

    Once laid into a model's flat buffers, ``.data`` and ``.grad`` stay views into them, so
    the PyTorch idioms keep the link instead of silently breaking it:

    - ``p.data = array`` copies ``array`` into the view (same shape; dtype cast within its
      kind, e.g. float64 -> float32); a shape change or another device is refused.
    - ``p.grad = None`` means zero (deferred, as ``zero_grad``): the next backward writes the
      gradient into the flat buffer, and a reader before that sees zeros, not None.
    - ``p.grad = array`` copies into the gradient view (same shape).
    """

    __slots__ = ("_flat", "_layout_owner")

    def __init__(self, data: Any, *, name: str | None = None):
        self._flat: tuple[Any, Any, int] | None = None  # (data buffer, grad buffer, offset)
        self._layout_owner: str | None = None  # set by pin_layout: no re-layout allowed
        super().__init__(data, requires_grad=True, name=name)

    def _set_data(self, value: Any) -> None:
        if self._flat is None:
            _DATA.__set__(self, value)
            return
        _copy_into(self, "data", _DATA.__get__(self), value)

    def _set_grad(self, value: Any) -> None:
        if self._flat is None:
            _GRAD.fset(self, value)
        elif value is None:
            self.zero_grad_()  # the flat gradient view stays; it reads as zeros
        else:
            _copy_into(self, "grad", self._grad, value)
            self._grad_zeroed = False

    # Reads are on every op's path: the getters are Tensor's own (the slot's C-level __get__
    # and Tensor.grad's getter), so a Parameter reads as fast as a Tensor; only writes check.
    data = property(_DATA.__get__, _set_data)
    grad = property(_GRAD.fget, _set_grad)

    def bind_flat(self, data_view: Any, grad_view: Any, flat: tuple[Any, Any, int] | None) -> None:
        """Points ``.data`` / ``.grad`` at views of flat buffers (``flat``: data buffer, grad
        buffer, offset), or detaches the parameter from them (``flat=None``)."""
        _DATA.__set__(self, data_view)
        _GRAD.fset(self, grad_view)
        self._flat = flat
        if flat is None:
            self._layout_owner = None

    def __repr__(self) -> str:
        return f"Parameter(name={self.name!r}, shape={self.shape}, dtype={self.dtype})"


def _copy_into(p: Parameter, what: str, view: Any, value: Any) -> None:
    """``view[...] = value`` after checking that it keeps the parameter what it is."""
    if value is view:
        return
    value = value.data if isinstance(value, Tensor) else value
    where = f"Parameter {p.name or '?'}: .{what} is a view into the model's flat buffer"
    if backend.is_gpu_array(value) != backend.is_gpu_array(view):
        raise ValueError(
            f"{where} on {backend.device_of(view)}; the new value is on another device "
            "(move the model with model.to(device) instead)"
        )
    xp = backend.array_module(view)
    array = xp.asarray(value)
    if tuple(array.shape) != tuple(view.shape):
        raise ValueError(
            f"{where} of shape {tuple(view.shape)}; cannot assign shape {tuple(array.shape)} "
            "(the optimiser and the allreduce work on that buffer: build a new model to "
            "change shapes)"
        )
    if not np.can_cast(array.dtype, view.dtype, "same_kind"):
        raise TypeError(f"{where} of dtype {view.dtype}; cannot assign {array.dtype}")
    view[...] = array


def _is_flat_view(p: Parameter, data_buf: Any, grad_buf: Any, offset: int) -> bool:
    return (
        p._flat is not None
        and p._flat[0] is data_buf
        and p._flat[2] == offset
        and p.data.base is data_buf
        and p.grad is not None
        and p.grad.base is grad_buf
    )


def consecutive_views(params: list[Parameter]) -> tuple[Any, Any] | None:
    """(data, grad) views covering ``params`` when they lie consecutively, in order, in one
    pair of flat buffers (the whole buffers when they cover them exactly); else None."""
    first = params[0]
    if first._flat is None:
        return None
    data_buf, grad_buf, start = first._flat
    offset = start
    for p in params:
        if not _is_flat_view(p, data_buf, grad_buf, offset):
            return None
        offset += p.size
    if start == 0 and offset == data_buf.size:
        return data_buf, grad_buf
    return data_buf[start:offset], grad_buf[start:offset]


def layout_of(params: list[Parameter]) -> list[tuple[int, int] | None]:
    """Where each parameter lives: (id of its flat buffer, offset), to notice a re-layout."""
    return [(id(p._flat[0]), p._flat[2]) if p._flat is not None else None for p in params]


def flat_buffers(params: list[Parameter]) -> tuple[Any, Any]:
    """The contiguous (data, grad) buffers behind ``params``, made once and then reused.

    When the parameters already lie consecutively in one pair of buffers, those buffers (or
    the slices of them that the parameters cover) are returned: a stacked autoencoder laid
    out once serves every layer's optimiser without moving anything. Otherwise new buffers
    are allocated, the current values (and gradients) copied in, and every parameter
    re-pointed at its slice; an optimiser made earlier over them follows if it can
    (``Optimizer.follow_layout``).

    Returns:
        (data, grad): 1-D arrays of length sum(p.size for p in params).
    """
    if not params:
        raise ValueError("flat_buffers: the model has no parameters")
    views = consecutive_views(params)
    if views is not None:
        return views
    pinned = [p for p in params if p._layout_owner is not None]
    if pinned:
        raise RuntimeError(
            f"flat_buffers: {pinned[0].name or 'a parameter'} belongs to the flat buffers of "
            f"{pinned[0]._layout_owner}, and these parameters do not lie consecutively in "
            f"them; laying them out again would detach every optimiser over that model. "
            f"Train the {pinned[0]._layout_owner} itself, or a part of it that is consecutive"
        )
    first = params[0]
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        found = ", ".join(f"{p.name or '?'}: {p.dtype} on {p.device}" for p in params)
        raise TypeError(f"flat_buffers: parameters must share one dtype and device ({found})")
    xp = backend.array_module(first.data)
    total = int(np.sum([p.size for p in params]))
    data_buf = backend.flat_zeros(xp, total, first.dtype)
    grad_buf = backend.flat_zeros(xp, total, first.dtype)
    offset = 0
    for p in params:
        n = p.size
        data_buf[offset : offset + n] = p.data.reshape(-1)
        if p.grad is not None:
            grad_buf[offset : offset + n] = p.grad.reshape(-1)
        shape = p.shape
        p.bind_flat(
            data_buf[offset : offset + n].reshape(shape),
            grad_buf[offset : offset + n].reshape(shape),
            (data_buf, grad_buf, offset),
        )
        offset += n
    return data_buf, grad_buf


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


def pin_layout(params: list[Parameter], owner: str) -> tuple[Any, Any]:
    """Lays ``params`` out (if not yet) and pins the layout: a later ``flat_buffers`` over a
    subset that does not lie consecutively in it raises instead of moving the parameters.

    A model with several views of one set of parameters (a stacked autoencoder: each layer's
    autoencoder for pretraining, the whole stack for fine-tuning) pins its one layout so that
    every view's optimiser works on slices of the same buffers. Returns (data, grad).
    """
    buffers = flat_buffers(params)
    for p in params:
        p._layout_owner = owner
    return buffers


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
