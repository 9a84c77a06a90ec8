"""``Optimizer``: updates a model's flat parameter buffer in place from its flat gradient buffer.

Subclasses implement ``_update(params, grads, part)`` on 1-D arrays (``part``: the slice of
the flat buffers they are, for the state arrays) and keep their state in flat arrays
registered with ``_state_buffer`` (so ``state_dict`` and the distributed layer's broadcast of
rank 0's state both see every array). With ``update_in_backward=True`` the update runs on
buckets of the buffer during backward (``distnet.optim.in_backward``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from distnet import backend, kernels
from distnet.nn.module import Module
from distnet.nn.parameter import Parameter, consecutive_views, flat_buffers, layout_of
from distnet.optim.in_backward import BackwardUpdates, log_fallback
from distnet.optim.protocol import LoopProtocol

_WHOLE = slice(None)


class Optimizer(LoopProtocol):
    """Base optimiser over one flat buffer; the training loop's protocol (``LoopProtocol``)
    with the defaults of one process.

    Args:
        params: a Module, or its parameters (they are laid into one flat buffer if not yet).
        lr: learning rate (schedules change ``opt.lr``).
        weight_decay: L2 penalty coefficient added to the gradient (coupled, like torch SGD).
        l1: L1 penalty coefficient (adds l1 * sign(w)).
        decay_biases: when False (the default), penalties apply to weights only, not to
            1-D parameters (biases, batch-norm scales), as the seed lectures teach.
        update_in_backward: update each bucket of the flat buffer as soon as backward has
            completed its gradient (bit-identical to updating in ``step()``; falls back to
            that while ``require_whole_gradient`` holds a reason, see
            ``distnet.optim.in_backward``). One backward per ``step()``.
    """

    def __init__(
        self,
        params: Module | Iterable[Parameter],
        lr: float,
        weight_decay: float = 0.0,
        l1: float = 0.0,
        decay_biases: bool = False,
        update_in_backward: bool = False,
    ):
        self.params = params.parameters() if isinstance(params, Module) else list(params)
        if lr <= 0:
            raise ValueError(f"{type(self).__name__}: lr must be positive, got {lr}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.l1 = float(l1)
        self.decay_biases = decay_biases
        self.steps = 0
        self._state: dict[str, Any] = {}
        self._scratch_bufs: dict[str, Any] = {}
        self.flat_params, self.flat_grads = flat_buffers(self.params)
        self._layout = layout_of(self.params)
        backend.tune_malloc()  # a training run starts here: keep step memory mapped
        self._penalty_mask = self._make_penalty_mask() if (weight_decay or l1) else None
        self.whole_gradient_reasons: set[str] = set()
        self._in_backward: BackwardUpdates | None = None
        self._asked_in_backward = bool(update_in_backward)  # the fallback is logged then
        if update_in_backward:
            self._in_backward = BackwardUpdates(self)

    @property
    def update_in_backward(self) -> bool:
        """Whether buckets are updated during backward in the coming steps (hooks armed and
        no reason to wait for the whole gradient)."""
        return self._in_backward is not None and not self.whole_gradient_reasons

    def require_whole_gradient(self, reason: str, required: bool = True) -> None:
        """Until released (``required=False`` with the same reason), ``step()`` updates after
        backward: the caller needs the whole gradient first (a non-finite check, clipping by
        the global norm, a reduction over ranks). Call it between steps."""
        if required:
            if self._asked_in_backward and reason not in self.whole_gradient_reasons:
                log_fallback(self.algorithm(), reason)
            self.whole_gradient_reasons.add(reason)
        else:
            self.whole_gradient_reasons.discard(reason)

    def close(self) -> None:
        """Removes the update-in-backward hooks from the parameters (if any)."""
        if self._in_backward is not None:
            self._in_backward.close()
            self._in_backward = None

    def algorithm(self) -> str:
        """The update rule's name (the class name; a distributed wrapper gives its base's)."""
        return type(self).__name__

    def _make_penalty_mask(self) -> Any:
        xp = backend.array_module(self.flat_params)
        mask = xp.zeros_like(self.flat_params)
        offset = 0
        for p in self.params:
            if p.ndim > 1 or self.decay_biases:
                mask[offset : offset + p.size] = 1
            offset += p.size
        return mask

    def _state_buffer(self, name: str) -> Any:
        """A zero-initialised flat state array (e.g. momentum), created once."""
        if name not in self._state:
            xp = backend.array_module(self.flat_params)
            self._state[name] = xp.zeros_like(self.flat_params)
        return self._state[name]

    def state_buffers(self) -> list[Any]:
        """The flat state arrays, in a fixed order (the distributed layer broadcasts them)."""
        self._init_state()
        return [self._state[k] for k in sorted(self._state)]

    def _init_state(self) -> None:
        """Creates every state buffer up front; override to name them."""

    def zero_grad(self) -> None:
        for p in self.params:
            p.zero_grad_()

    def follow_layout(self) -> bool:
        """Re-binds to the parameters' flat buffers if a later layout moved them (another
        optimiser or ``model.flat_params()`` over a larger model); True when it did.

        Without this the optimiser would go on updating the old buffer while the parameters
        no longer change. It can follow when its parameters still lie consecutively and in
        the same order (state arrays then still line up); otherwise it raises.
        """
        layout = layout_of(self.params)
        if layout == self._layout:
            return False
        views = consecutive_views(self.params)
        if views is None:
            raise RuntimeError(
                f"{type(self).__name__}: its parameters were laid out again, in another "
                "order, by an optimiser or model created later; create this optimiser after "
                "that one (or pass fit/pretrain an optimiser factory)"
            )
        self.flat_params, self.flat_grads = views
        self._layout = layout
        return True

    def settle_grads(self) -> Any:
        """The flat gradient buffer with every deferred zero written out (a parameter that
        took no part in the last backward has a zero gradient, not a stale one)."""
        self.follow_layout()
        for p in self.params:
            if p._grad_zeroed:
                p.grad  # noqa: B018  (the getter writes the zeros)
        return self.flat_grads

    def _scratch(self, name: str) -> Any:
        """A flat work array reused across steps (not optimiser state: never saved)."""
        buf = self._scratch_bufs.get(name)
        if buf is None:
            buf = backend.array_module(self.flat_params).empty_like(self.flat_params)
            self._scratch_bufs[name] = buf
        return buf

    def penalised_grads(self, part: slice = _WHOLE) -> Any:
        """The gradient (of the slice ``part`` of the flat buffer) with L2 / L1 penalties
        added on the masked entries.

        Returns ``flat_grads[part]`` itself when there is no penalty; otherwise a slice of a
        scratch buffer that is reused by the next step (``flat_grads`` is never modified, so
        the gradient the distributed layer reduced stays what it was). Elementwise: a slice
        gives the bits the whole buffer gives there.
        """
        g = self.flat_grads[part]
        if not (self.weight_decay or self.l1):
            return g
        if self._penalty_mask is None:  # decay switched on after construction
            self._penalty_mask = self._make_penalty_mask()
        xp = backend.array_module(g)
        w = self.flat_params[part]
        # out= everywhere: this runs every step over the whole model
        pen = self._scratch("penalty")[part]
        if self.weight_decay:
            xp.multiply(w, self.weight_decay, out=pen)
            if self.l1:
                l1 = self._scratch("l1")[part]
                xp.sign(w, out=l1)
                l1 *= self.l1
                pen += l1
        else:
            xp.sign(w, out=pen)
            pen *= self.l1
        pen *= self._penalty_mask[part]
        pen += g
        return pen

    def step(self) -> None:
        """One update of the flat parameter buffer, in place (with ``update_in_backward``:
        of the buckets that backward did not update already)."""
        if self._in_backward is not None and self._in_backward.finish_step():
            return
        self.steps += 1
        self.settle_grads()
        self._update(self.flat_params, self.penalised_grads())

    def _update(self, params: Any, grads: Any, part: slice = _WHOLE) -> None:
        """Updates ``params`` (the slice ``part`` of ``flat_params``) from ``grads``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """lr, step count and every state array (as numpy copies)."""
        self._init_state()
        state = {"lr": self.lr, "steps": self.steps}
        for k, v in self._state.items():
            state[k] = backend.to_device(v, "cpu").copy()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what ``state_dict`` returned; arrays are copied in place.

        Raises:
            KeyError: on missing or unexpected keys (all of them named); an unexpected array
                usually means the state came from an optimiser with other settings.
            ValueError: on a state array whose shape does not fit this model.
        """
        self._init_state()
        name = type(self).__name__
        expected = {"lr", "steps", *self._state}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise KeyError(
                f"{name}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}"
            )
        for k, target in self._state.items():
            value = state[k]
            value = value if backend.is_gpu_array(value) else np.asarray(value)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"{name}.load_state_dict: {k!r} has shape {tuple(value.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
        # checked everything first: a bad state leaves the optimiser untouched
        self.lr = float(state["lr"])
        self.steps = int(state["steps"])
        for k, target in self._state.items():
            target[...] = backend.array_module(target).asarray(state[k], dtype=target.dtype)


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum.

    v <- momentum * v + g;  w <- w - lr * v  (Nesterov: w <- w - lr * (g + momentum * v)).
    """

    def __init__(
        self,
        params: Module | Iterable[Parameter],
        lr: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        l1: float = 0.0,
        decay_biases: bool = False,
        update_in_backward: bool = False,
    ):
        super().__init__(params, lr, weight_decay, l1, decay_biases, update_in_backward)
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        self.momentum = float(momentum)
        self.nesterov = nesterov

    def _init_state(self) -> None:
        if self.momentum:
            self._state_buffer("velocity")

    def _update(self, params: Any, grads: Any, part: slice = _WHOLE) -> None:
        v = self._state_buffer("velocity")[part] if self.momentum else None
        kernels.sgd_update(params, grads, v, self.lr, self.momentum, self.nesterov,
                           self._scratch("work")[part])  # fmt: skip
