"""``LoopProtocol``: what the training loop, checkpoints and pipelines call on an optimiser.

Declared once, here, with the defaults of a world of one: every ``distnet.optim`` optimiser is
one (``Optimizer`` derives from it), and every synchronising wrapper
(``distnet.parallel.sync.SyncOptimizer``, ``DistributedOptimizer``) overrides what it does
differently. The loop calls these members on whatever optimiser it holds and never asks which
one it holds (Horovod's ``DistributedOptimizer`` is the model: a wrapper is an optimiser).

The protocol lives in ``optim`` because ``optim`` must not know about distribution (the
layering test says so): the wrappers' shared implementation is ``distnet.parallel.sync``.

Members (besides ``params``, ``lr``, ``steps``, ``flat_params``/``flat_grads`` (n,),
``zero_grad()``, ``step()``, ``state_dict()``/``load_state_dict()``):

- ``comm``: the communicator the ranks step together over (None: one process).
- ``finite_comm``: the ranks that take fit's non-finite decision together (default ``comm``;
  None: this rank decides alone, as an asynchronous parameter-server worker does).
- ``grads_agree``: after ``synchronize()`` ``flat_grads`` holds the same reduced gradient on
  every rank of ``comm`` (the finite decision then rides on the reduction).
- ``backward_passes_per_step``: backward passes accumulated before each ``step()``.
- ``backward(loss, batch_share)``: ``loss.backward()`` seeded with this rank's weight.
- ``synchronize(batch_share)``: waits for the gradient reduction; returns the reduced gradient
  this rank's update reads when it is another buffer than ``flat_grads`` (else None/it).
- ``skip_step()``: fit skipped this step (non-finite gradient) on this rank.
- ``gathered_state()``: collective; what one rank can checkpoint (``state_dict()``).
- ``resume_check(steps)``: whether this rank's ``state_dict()`` is the state after ``steps``
  finished steps (a carry for a mid-epoch resume may be taken from it).
- ``require_whole_gradient(reason, required)``: until released, no update before the whole
  gradient is there (fit's non-finite check holds it): an optimiser made with
  ``update_in_backward=True`` updates after backward (wrappers pass it to the optimiser in).
- ``release()``: a peer died; give up what waits on it. ``close()``: the stage is done.
- ``takes_batch_split``: whether ``load_state_dict`` restores a per-rank batch split saved
  under ``BATCH_SPLIT_KEY`` (ranks that rebalance, ``distnet.parallel.rebalance``, keep an
  uneven split there). A checkpoint loaded into an optimiser that does not (one process,
  ranks that keep their split) goes without it: the split says how ranks divided a batch,
  nothing about the update rule.
"""

from __future__ import annotations

from typing import Any

from distnet.backend import array_module

BATCH_SPLIT_KEY = "batch_split"  # see ``takes_batch_split`` in the module docstring


def check_share(share: float | None) -> float | None:
    """``share`` itself when it is a batch share (in [0, 1]) or None; else ValueError."""
    if share is not None and not 0.0 <= share <= 1.0:
        raise ValueError(f"batch_share must be in [0, 1], got {share}")
    return share


def seeded_backward(loss: Any, weight: float) -> None:
    """``loss.backward()`` with ``weight`` as the seed gradient (``loss``: a scalar Tensor):
    the gradients come out weighted, with no pass over the gradient buffer."""
    if weight == 1.0:
        loss.backward()
        return
    loss.backward(array_module(loss.data).full(loss.shape, weight, dtype=loss.dtype))


class LoopProtocol:
    """The training loop's optimiser protocol (see the module docstring), with the defaults
    of one process that synchronises with nobody."""

    comm: Any = None
    grads_agree: bool = False
    backward_passes_per_step: int = 1
    takes_batch_split: bool = False

    @property
    def finite_comm(self) -> Any:
        """The ranks that decide together whether a step is finite (default: ``comm``)."""
        return self.comm

    def algorithm(self) -> str:
        """The update rule's name (what checkpoints record; a wrapper gives its optimiser's)."""
        return type(self).__name__

    def backward(self, loss: Any, batch_share: float | None = None) -> None:
        """``loss.backward()``, seeded with ``batch_share`` when given (one process: 1)."""
        share = check_share(batch_share)
        seeded_backward(loss, 1.0 if share is None else float(share))

    def synchronize(self, batch_share: float | None = None) -> Any:
        """Nothing to wait for: the gradient is this process's own."""
        return None

    def skip_step(self) -> None:
        """Nobody else counts this process's steps."""

    def gathered_state(self) -> Any:
        """This optimiser: its ``state_dict()`` is already the whole state."""
        return self

    def resume_check(self, steps: int) -> bool:
        """True: this process's state is the state after its last finished step."""
        return True

    def require_whole_gradient(self, reason: str, required: bool = True) -> None:
        """Nothing here updates before the whole gradient is there."""

    def release(self) -> None:
        """Nothing waits on a peer."""

    def close(self) -> None:
        """Nothing to release."""


class ForeignOptimizer(LoopProtocol):
    """An object with ``zero_grad()`` and ``step()`` that is not a distnet optimiser (a
    user's own, a recording stand-in), seen through the loop's protocol: only those two
    methods (and ``lr`` when it has one) are ever called on it.

    Args:
        inner: the object. model: what it trains (its gradient buffer is ``flat_grads``).
    """

    def __init__(self, inner: Any, model: Any) -> None:
        self.inner, self.model = inner, model
        self.steps = 0

    @property
    def lr(self) -> float:
        return float(getattr(self.inner, "lr", float("nan")))

    @lr.setter
    def lr(self, value: float) -> None:
        self.inner.lr = value

    @property
    def flat_grads(self) -> Any:
        """The model's flat gradient buffer (n,)."""
        return self.model.flat_grads()

    def algorithm(self) -> str:
        return type(self.inner).__name__

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def step(self) -> None:
        self.inner.step()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
