"""``Parameter``, and the flat buffers its ``.data`` and ``.grad`` are views of.

Every parameter's ``.data`` and ``.grad`` are views into two contiguous 1-D buffers, in
``parameters()`` order. Optimisers update the flat buffer in one pass; the distributed layer
allreduces slices (buckets) of the gradient buffer with no copies; parameter-server shards are
contiguous ranges of it. Here: the parameter, laying a list of parameters out in new buffers
(``flat_buffers``), finding the buffers they already share (``consecutive_views``,
``layout_of``) and pinning a layout (``pin_layout``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import backend
from distnet.core.tensor import Tensor

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
