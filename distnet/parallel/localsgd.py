"""``LocalSGD``: H local steps, then the parameters averaged over ranks (periodic averaging).

Each rank steps its own replica on its own mean gradient for ``sync_every = H`` steps, then
one allreduce averages the parameters (and, with ``average_state``, the optimiser's state
arrays, in the same buffer) over the ranks, weighted by the share of the samples each rank
saw since the last average. Strategy ``local_sgd`` of ``[dist]`` (``distnet.parallel.strategy``):

    [dist]
    strategy = "local_sgd"
    sync_every = 8          # H: one allreduce every 8 steps instead of one every step
    average_state = true    # momentum / Adam's moments averaged too

With H = 1 and plain SGD (or SGD with momentum and ``average_state``) it is synchronous
allreduce SGD: sum_r s_r (w - lr g_r) = w - lr sum_r s_r g_r. Larger H trades gradient
freshness for H times fewer collectives over the model (Lin et al., "Don't use large
mini-batches, use local SGD", 2020; Stich, "Local SGD converges fast and communicates
little", 2019).
"""

from __future__ import annotations

import sys
from typing import Any

from distnet.backend import array_module
from distnet.parallel.comm import Communicator
from distnet.parallel.sync import SyncOptimizer

__all__ = ["LocalSGD"]


class LocalSGD(SyncOptimizer):
    """Local steps on every rank, parameters averaged every ``sync_every`` steps.

    Args:
        optimizer: a ``distnet.optim`` optimiser over this rank's replica (flat buffers (n,)).
        comm: the ranks that average (any engine's communicator).
        sync_every: H, local steps between two averages (>= 1).
        average_state: also average the optimiser's state arrays (momentum, moments).
        batch_share: this rank's fraction of every global batch (None: ``1/size``); it
            weights the average, not the gradient (each local step takes the rank's mean).
    """

    def __init__(
        self,
        optimizer: Any,
        comm: Communicator,
        sync_every: int = 1,
        average_state: bool = False,
        batch_share: float | None = None,
    ) -> None:
        if int(sync_every) < 1:
            raise ValueError(f"LocalSGD: sync_every must be >= 1, got {sync_every}")
        self.optimizer, self.comm = optimizer, comm
        self.sync_every, self.average_state = int(sync_every), bool(average_state)
        self.batch_share = batch_share
        self.init_sync()
        self._share = 0.0  # this step's share of the global batch (set by weight())
        self.averages = 0  # allreduces of the model made so far
        self._since = 0  # steps (taken or skipped) since the last average
        self._weight_sum = 0.0  # this rank's shares of those steps' global batches
        self._steps_taken = 0  # of those steps, the ones every rank took
        self._buffer: Any = None
        self._broadcast()

    def _broadcast(self) -> None:
        """Collective: every replica starts from rank 0's parameters, state, lr and steps."""
        if self.comm.size == 1:
            return
        opt = self.optimizer
        opt.lr, opt.steps = self.comm.allgather((opt.lr, opt.steps))[0]
        self.comm.broadcast(opt.flat_params, 0)
        for buf in opt.state_buffers():
            self.comm.broadcast(buf, 0)

    # --- the synchronisation protocol ------------------------------------------------------
    def backward(self, loss: Any, batch_share: float | None = None) -> None:
        """``loss.backward()`` unweighted (the local step takes this rank's mean gradient);
        the share is noted for the average."""
        super().backward(loss, batch_share)

    def weight(self, share: float | None) -> float:
        self._share = super().weight(share)  # what the average weights this step with
        return 1.0

    def step(self, batch_share: float | None = None) -> None:
        """One local step (none for a rank without samples: ``batch_share=0.0``), and the
        average when H steps have passed since the last."""
        if not self._prescaled:
            self.weight(batch_share)
        self._prescaled = False
        if self._share > 0.0:
            self.optimizer.step()
        else:
            self.optimizer.steps += 1  # every rank counts the same steps
        self._weight_sum += self._share
        self._steps_taken += 1
        self._count_step()

    def skip_step(self) -> None:
        """A step fit skipped on every rank (non-finite): it counts towards H, adds nothing."""
        self.init_sync()
        self._count_step()

    def _count_step(self) -> None:
        self._since += 1
        if self._since >= self.sync_every:
            self.average()

    def average(self) -> None:
        """Collective: parameters (and state) <- their share-weighted mean over ranks."""
        opt, since = self.optimizer, self._since
        taken, weight = self._steps_taken, self._weight_sum
        self._since, self._steps_taken, self._weight_sum = 0, 0, 0.0
        if self.comm.size == 1 or since == 0:
            return
        # every rank took the same steps (skips are collective), and each step's shares sum
        # to 1 over the ranks: the weights sum to ``taken`` (0: every step was skipped)
        scale = weight / taken if taken else 1.0 / self.comm.size
        parts = [opt.flat_params, *(opt.state_buffers() if self.average_state else [])]
        n = opt.flat_params.size
        xp = array_module(opt.flat_params)
        if self._buffer is None or self._buffer.size != n * len(parts):
            self._buffer = xp.empty(n * len(parts), dtype=opt.flat_params.dtype)
        for i, part in enumerate(parts):  # one allreduce for everything
            xp.multiply(part, scale, out=self._buffer[i * n : (i + 1) * n])
        self.comm.allreduce(self._buffer, "sum")
        for i, part in enumerate(parts):
            part[...] = self._buffer[i * n : (i + 1) * n]
        self.averages += 1

    def resume_check(self, steps: int) -> bool:
        """False: between two averages the replicas differ, no rank's state is the job's."""
        return False

    def close(self) -> None:
        """Averages the steps taken since the last average (collective), so that the stage
        ends with one model on every rank; not on an exception (called from a ``finally``:
        the peers may be elsewhere)."""
        if self._since and sys.exc_info()[0] is None:
            self.average()
        super().close()
