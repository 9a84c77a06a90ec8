"""``Tensor`` and the reverse-mode engine.

A non-leaf tensor remembers its parents and one closure, ``_backward(g) -> grads``, that maps
the gradient of its output to one gradient per parent (``None`` where a parent needs none).
``backward()`` walks the graph once in reverse topological order (iteratively, so depth is
bounded by memory, not by Python's recursion limit), frees each intermediate gradient as soon
as it has been passed on, and drops each closure after use (what it captured is only what
backward needs, so the forward activations go with it).

Leaves (``requires_grad=True`` and no parents) accumulate into ``.grad`` in place when it
already exists: a model's parameters keep ``.grad`` as a view into one flat buffer, and the
distributed layer reduces slices of that buffer. A leaf's grad-ready hooks run the moment its
gradient for this pass is complete, last layer first, so allreduce can overlap backward.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from distnet import backend

_state = threading.local()


def is_grad_enabled() -> bool:
    """False inside ``no_grad()``."""
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Context in which operations record no graph (inference, optimiser updates)."""
    previous = is_grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = previous


class Tensor:
    """An ``xp`` array (numpy or cupy) with an optional gradient and graph history.

    Args:
        data: array-like; float arrays keep their dtype, anything else becomes float32.
        requires_grad: whether ``backward()`` should compute ``.grad`` for this leaf.
    """

    __slots__ = (
        "data",
        "_grad",
        "_grad_zeroed",
        "requires_grad",
        "_parents",
        "_backward",
        "_op",
        "_hooks",
        "name",
        "__weakref__",
    )
    __array_priority__ = 1000  # so that ndarray + Tensor calls Tensor.__radd__

    def __init__(self, data: Any, requires_grad: bool = False, *, name: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        self.data = backend.as_float_array(data)
        self._grad: Any = None
        self._grad_zeroed = False
        self.requires_grad = bool(requires_grad)
        self._parents: tuple[Tensor, ...] = ()
        self._backward: Callable[[Any], tuple[Any, ...]] | None = None
        self._op = ""
        self._hooks: list[Callable[[Tensor], None]] | None = None
        self.name = name

    # -- gradient buffer ---------------------------------------------------------------
    @property
    def grad(self) -> Any:
        """The accumulated gradient (same shape as data), or None before any backward."""
        if self._grad_zeroed:  # zero_grad() deferred the memset to the first reader
            self._grad[...] = 0
            self._grad_zeroed = False
        return self._grad

    @grad.setter
    def grad(self, value: Any) -> None:
        self._grad = value
        self._grad_zeroed = False

    def zero_grad_(self) -> None:
        """Marks the gradient as zero without touching memory: the next backward overwrites
        it instead of adding to it, and any earlier reader gets real zeros."""
        if self._grad is not None:
            self._grad_zeroed = True

    def grad_target(self) -> Any:
        """The buffer an op may write this leaf's whole gradient into directly (``out=``), or
        None when it must return the gradient for the engine to add instead."""
        if self._grad_zeroed and self._backward is None:
            self._grad_zeroed = False
            return self._grad
        return None

    # -- basic properties -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._backward is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        op = f", op={self._op}" if self._op else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device}{grad}{op})"

    def numpy(self) -> np.ndarray:
        """The data as a numpy array (copied from the GPU when needed)."""
        return backend.to_device(self.data, "cpu")

    def item(self) -> float:
        return float(self.data.reshape(-1)[0]) if self.size == 1 else self._not_scalar("item")

    def _not_scalar(self, what: str) -> float:
        raise ValueError(f"{what}: tensor of shape {self.shape} is not a scalar")

    def detach(self) -> Tensor:
        """The same data with no history and no gradient."""
        return Tensor(self.data)

    def to(self, device: str) -> Tensor:
        """A copy on ``device`` ('cpu', 'cuda', 'cuda:N') that keeps ``requires_grad``."""
        return Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)

    def register_grad_ready_hook(self, fn: Callable[[Tensor], None]) -> Callable[[], None]:
        """Calls ``fn(self)`` during ``backward()`` once this leaf's gradient is complete.

        Returns a function that removes the hook again (a wrapper that is done with the
        parameters must remove its hooks, or it keeps acting on every later backward).
        """
        if self._hooks is None:
            self._hooks = []
        self._hooks.append(fn)

        def remove() -> None:
            if self._hooks and fn in self._hooks:
                self._hooks.remove(fn)

        return remove

    # -- the engine --------------------------------------------------------------------
    def backward(self, grad: Any = None) -> None:
        """Accumulates d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

        Args:
            grad: gradient of the final objective w.r.t. ``self`` (same shape); may be omitted
                only when ``self`` holds a single element (a loss).
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward: this tensor does not require grad (no input had requires_grad=True,"
                " or it was computed under no_grad())"
            )
        if grad is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward: output of shape {self.shape} is not a scalar; pass grad= of "
                    "the same shape (the gradient of the objective w.r.t. this tensor)"
                )
            xp = backend.array_module(self.data)
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else grad
            if tuple(grad.shape) != self.shape:
                raise ValueError(f"backward: grad of shape {grad.shape} for output {self.shape}")

        grads: dict[int, Any] = {id(self): grad}
        for node in reversed(_topological_order(self)):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            g = _as_ndarray(g)  # a sum of two 0-d gradients is a numpy scalar again
            if node._backward is None:  # a leaf that requires grad
                _accumulate_leaf(node, g)
                continue
            parent_grads = node._backward(g)
            for parent, pg in zip(node._parents, parent_grads, strict=True):
                if pg is None or not parent.requires_grad:
                    continue
                key = id(parent)
                prev = grads.get(key)
                if pg is WRITTEN:  # the op wrote into parent's buffer: nothing to carry
                    if prev is None:
                        grads[key] = WRITTEN
                elif prev is None or prev is WRITTEN:
                    grads[key] = pg
                else:  # never in place: pg may alias another gradient (add passes g on)
                    grads[key] = prev + pg
            # retain_graph=False: free what the closure kept alive (forward activations)
            node._backward = _released
            node._parents = ()


def _as_ndarray(x: Any) -> Any:
    """``x`` itself, or a 0-d ndarray for a numpy scalar."""
    return np.asarray(x) if isinstance(x, np.generic) else x


def _released(g: Any) -> tuple[Any, ...]:
    raise RuntimeError(
        "backward: this part of the graph was already used by an earlier backward() and its "
        "intermediate values were freed; run the forward pass again"
    )


def _topological_order(root: Tensor) -> list[Tensor]:
    """Nodes that need gradients, each after all of its parents (iterative post-order DFS)."""
    order: list[Tensor] = []
    # marked when expanded, not when pushed: a node pushed early may be reached again through
    # a longer path, and must still be finished only after every parent it has.
    expanded_ids: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            order.append(node)
            continue
        if id(node) in expanded_ids:
            continue
        expanded_ids.add(id(node))
        stack.append((node, True))
        # first parent explored first: a layer's input subgraph finishes before its weights,
        # so in reverse order the weights come right after the layer (hooks fire early)
        for parent in reversed(node._parents):
            if parent.requires_grad and id(parent) not in expanded_ids:
                stack.append((parent, False))
    return order


WRITTEN = object()
"""Returned by an op's backward for a parent whose ``grad_target()`` it wrote into."""


def _accumulate_leaf(leaf: Tensor, g: Any) -> None:
    if g is WRITTEN:
        pass
    elif g.shape != leaf.shape:  # an op's backward is wrong: fail here, not in an optimiser
        raise RuntimeError(
            f"backward: gradient of shape {g.shape} for a leaf of shape {leaf.shape} "
            f"({leaf.name or 'unnamed'})"
        )
    elif leaf._grad is None:
        # copy: g may alias a gradient that is also flowing elsewhere
        leaf._grad = g.astype(leaf.dtype, copy=True) if g.dtype != leaf.dtype else g.copy()
    elif leaf._grad_zeroed:
        backend.array_module(g).copyto(leaf._grad, g)
        leaf._grad_zeroed = False
    else:
        leaf._grad += g
    if leaf._hooks:
        for hook in leaf._hooks:
            hook(leaf)


def make_result(
    data: Any,
    parents: tuple[Tensor, ...],
    backward: Callable[[Any], tuple[Any, ...]],
    op: str,
) -> Tensor:
    """Wraps an op's output; records history only when some parent needs a gradient.

    numpy reductions to a scalar (``a.sum()``, ``a.max()``) return numpy scalars, which ufuncs
    refuse as ``out=`` and which lack ``.base``; every op's output is made an ndarray here,
    once, so no op has to remember it (cupy always returns 0-d arrays).
    """
    out = Tensor.__new__(Tensor)
    out.data = _as_ndarray(data)
    out._grad = None
    out._grad_zeroed = False
    out._hooks = None
    out.name = None
    out._op = op
    if is_grad_enabled() and any(p.requires_grad for p in parents):
        out.requires_grad = True
        out._parents = parents
        out._backward = backward
    else:
        out.requires_grad = False
        out._parents = ()
        out._backward = None
    return out
