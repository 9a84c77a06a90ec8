"""The synchronisation base: what every synchronising optimiser wrapper shares, once.

The training loop's protocol (``backward(loss, batch_share)``, ``synchronize()``, ``step()``,
``skip_step()``, ``state_dict()``, ``close()``, ...) is declared in
``distnet.optim.protocol.LoopProtocol`` with the defaults of one process; every plain optimiser
is one. A synchronising wrapper is one too:

- ``DistributedOptimizer`` (allreduce) is Horovod's shape, a subclass of the wrapped
  optimiser's class sharing its state, and overrides the protocol's members itself;
- the wrappers that hold their optimiser (``ShardedOptimizer``, ``ParameterServerOptimizer``,
  ``HybridOptimizer``, ``LocalSGD``) derive from ``SyncOptimizer`` here: ``lr``/``steps``
  delegation, the batch-share check, the weighted backward, state and closing live here;
- the wrappers that add something around another wrapper (``ThroughputShares``, the Ray
  engine's closing parameter server) derive from ``PassThrough``: every member of the
  protocol goes to the wrapper inside unless they override it.

A subclass keeps only what is its own: how it reduces (``synchronize``/``step``), its default
share (``default_share``), its state.
"""

from __future__ import annotations

from typing import Any

from distnet.optim.protocol import LoopProtocol, check_share, seeded_backward

__all__ = ["GatheredState", "PassThrough", "SyncOptimizer", "check_share"]


class SyncOptimizer(LoopProtocol):
    """Base of the wrappers that hold a ``distnet.optim`` optimiser (``self.optimizer``).

    A subclass sets ``optimizer``, ``comm`` (or None), ``batch_share`` (this rank's fraction of
    every global batch, None: ``default_share()``) and calls ``init_sync()``; it overrides
    ``step`` (and ``synchronize`` when it reduces before the step).
    """

    optimizer: Any
    batch_share: float | None = None

    def init_sync(self) -> None:
        """The per-step flags of the weighted backward."""
        self._prescaled = False  # backward seeded this step's gradient with the weight
        self._seed_weight = 0.0  # ... this weight

    # --- delegation ------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return self.optimizer.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.lr = value

    @property
    def steps(self) -> int:
        # the wrapped optimiser's count, which checkpoints and carries restore: fit numbers a
        # resumed run's steps on from it, and its steps key the dropout noise (``RankNoise``)
        return self.optimizer.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.optimizer.steps = int(value)

    def algorithm(self) -> str:
        return self.optimizer.algorithm()

    def __getattr__(self, name: str) -> Any:
        # flat buffers, params, momentum, weight_decay ... of the wrapped optimiser stay
        # readable, as in Horovod
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    # --- the weighted backward -------------------------------------------------------------
    def default_share(self) -> float:
        """This rank's weight when nobody gave a share: 1 / the ranks that sum gradients."""
        return 1.0 / self.comm.size

    def weight(self, share: float | None) -> float:
        """What this rank's gradient is multiplied by before the sum over ranks."""
        share = self.batch_share if share is None else share
        return self.default_share() if share is None else float(share)

    def backward(self, loss: Any, batch_share: float | None = None) -> None:
        """``loss.backward()`` seeded with this rank's weight (its batch share, or the default),
        so that ``step()`` sends the gradients as they are. ``loss``: a scalar Tensor, the mean
        loss over this rank's samples."""
        weight = self.weight(check_share(batch_share))
        self._prescaled, self._seed_weight = True, weight
        try:
            seeded_backward(loss, weight)
        except BaseException:
            self._prescaled = False
            raise

    def step_weight(self, batch_share: float | None) -> float:
        """The factor ``step()`` still applies to the gradient (1 when backward seeded it);
        clears the backward's note."""
        weight = 1.0 if self._prescaled else self.weight(check_share(batch_share))
        self._prescaled = False
        return weight

    # --- the rest of the protocol ----------------------------------------------------------
    def zero_grad(self) -> None:
        """Zeroes the gradients (the wrapped optimiser's ``zero_grad``)."""
        self._prescaled = False  # a step fit skipped (non-finite) never reached step()
        self.optimizer.zero_grad()

    def require_whole_gradient(self, reason: str, required: bool = True) -> None:
        """The optimiser inside's: it may update inside backward (local SGD's local step)."""
        self.optimizer.require_whole_gradient(reason, required)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def close(self) -> None:
        self.optimizer.close()


class PassThrough(SyncOptimizer):
    """A wrapper around a synchronising optimiser that adds something (shares that follow
    throughput, the end of a stage's server): every protocol member is the inner one's
    (``comm``, which a subclass sets, aside)."""

    @property
    def finite_comm(self) -> Any:
        return self.optimizer.finite_comm

    @property
    def grads_agree(self) -> bool:  # type: ignore[override]
        return self.optimizer.grads_agree

    @property
    def backward_passes_per_step(self) -> int:  # type: ignore[override]
        return self.optimizer.backward_passes_per_step

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def backward(self, loss: Any, batch_share: float | None = None) -> None:
        self.optimizer.backward(loss, batch_share=batch_share)

    def synchronize(self, batch_share: float | None = None) -> Any:
        return self.optimizer.synchronize(batch_share=batch_share)

    def step(self, batch_share: float | None = None) -> None:
        self.optimizer.step(batch_share=batch_share)

    def skip_step(self) -> None:
        self.optimizer.skip_step()

    def gathered_state(self) -> Any:
        return self.optimizer.gathered_state()

    def resume_check(self, steps: int) -> bool:
        return self.optimizer.resume_check(steps)

    def release(self) -> None:
        self.optimizer.release()


class GatheredState(LoopProtocol):
    """A full optimiser state gathered from every rank's slice, frozen, for one rank to
    checkpoint: ``state_dict()`` and ``algorithm()`` (the class doing the updates)."""

    def __init__(self, optimizer: Any, state: dict[str, Any]) -> None:
        self.optimizer = optimizer
        self._state = state

    def algorithm(self) -> str:
        return self.optimizer.algorithm()

    def state_dict(self) -> dict[str, Any]:
        return self._state
