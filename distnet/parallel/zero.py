"""``ShardedOptimizer``: optimiser state sharded over ranks (ZeRO stage 1).

What DeepSpeed calls ZeRO stage 1 and PyTorch ``ZeroRedundancyOptimizer``, over distnet's flat
buffers: the parameter server's sharding idea inside an allreduce job. Every step

1. reduce-scatters the weighted flat gradient: rank r receives the sum over ranks of its own
   contiguous slice ``[lo_r, hi_r)`` of the buffer;
2. updates that slice of the parameters with its slice of the optimiser state (momentum,
   Adam's moments, ...), which is all of the state this rank ever holds;
3. all-gathers the parameter slices, so every replica holds the whole updated model.

The bytes on the wire equal one allreduce's (a ring allreduce *is* a reduce-scatter followed
by an all-gather); the update work and the state memory per rank are 1/N of the unsharded
optimiser's. Use it like ``DistributedOptimizer``::

    opt = ShardedOptimizer(Adam(model, lr=1e-3), comm)
    opt.zero_grad(); opt.backward(loss); opt.step()

``state_dict()`` is collective (every rank calls it; it gathers the full state, in the same
format as the unsharded optimiser's, so checkpoints move between the two);
``load_state_dict(full_state)`` keeps this rank's slice.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import trace
from distnet.backend import is_gpu_array
from distnet.optim import in_backward
from distnet.parallel.comm import Communicator
from distnet.parallel.sync import GatheredState, SyncOptimizer

__all__ = ["GatheredState", "ShardedOptimizer", "shard_bounds", "sharding_pays"]


def shard_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """Contiguous slices ``[lo, hi)`` of an n-element buffer, one per rank, sizes differing
    by at most one (the first ``n % size`` ranks take one more)."""
    base, extra = divmod(n, size)
    bounds, lo = [], 0
    for r in range(size):
        hi = lo + base + (1 if r < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def sharding_pays(comm: Communicator, optimizer: Any, compression: str | None = None) -> bool:
    """Whether ``shard_optimizer = "auto"`` shards: when the reduce-scatter and all-gather go
    through shared memory (``comm.shm``: every MPI rank on this node) on CPU buffers without
    compression, large enough to take that road (``shm.min_bytes``). Measured on the
    headline job, 2 ranks: 115.6 s sharded against 123.5 s unsharded, both through shared
    memory; through MPI's messages sharding did not pay (30.2 s against 30.0 s on the
    smaller job of docs/performance.md's table). The same on every rank: in a mixed group
    (a GPU rank beside CPU ranks) no rank shards, so every rank runs the same collectives
    (collective where the other conditions hold, which are alike on every rank)."""
    shm = getattr(comm, "shm", None)
    return (
        comm.size > 1
        and shm is not None
        and shm.enabled
        and compression is None
        and optimizer.flat_params.nbytes >= shm.min_bytes
        and not any(comm.allgather(is_gpu_array(optimizer.flat_params)))
    )


class ShardedOptimizer(SyncOptimizer):
    """Data-parallel wrapper that shards the wrapped optimiser's state over ranks.

    Args:
        optimizer: a ``distnet.optim`` optimiser (``flat_params``, ``flat_grads``, ``step``,
            ``state_dict``, ``_state``); created fresh (its state is replaced by slices).
        comm: from ``distnet.parallel.init()`` (MPI engine, or local for one process).
        batch_share: this rank's fraction of every global batch (None: ``1/size``).
    """

    def __init__(self, optimizer: Any, comm: Communicator, batch_share: float | None = None):
        if is_gpu_array(optimizer.flat_params):
            raise NotImplementedError(
                "ShardedOptimizer: GPU buffers are not supported yet; use DistributedOptimizer"
            )
        if comm.size > 1 and comm.engine != "mpi":
            raise ValueError(f"ShardedOptimizer needs the MPI engine, got {comm.engine!r}")
        self.optimizer = optimizer
        self.comm = comm
        self.params = list(optimizer.params)
        self.batch_share = batch_share
        self.full_params = self.flat_params = optimizer.flat_params
        self.full_grads = self.flat_grads = optimizer.flat_grads  # callers see whole buffers
        n = self.full_params.size
        self.bounds = shard_bounds(n, comm.size)
        self.lo, self.hi = self.bounds[comm.rank]
        self.counts = [hi - lo for lo, hi in self.bounds]
        self.displs = [lo for lo, _ in self.bounds]
        self.grad_shard = np.empty(self.hi - self.lo, dtype=self.full_grads.dtype)
        self.init_sync()
        self._synchronized = False  # fit calls synchronize() before step(): reduce once
        self._broadcast_parameters()
        self._shard_optimizer()

    # --- setup ----------------------------------------------------------------------------
    def _broadcast_parameters(self) -> None:
        if self.comm.size == 1:
            return
        lr, steps = self.comm.allgather((self.optimizer.lr, self.optimizer.steps))[0]
        self.optimizer.lr, self.optimizer.steps = lr, steps
        self.comm.broadcast(self.full_params, 0)

    def _shard_optimizer(self) -> None:
        """Points the wrapped optimiser at this rank's slice: its update, state arrays and
        penalty mask then cover ``[lo, hi)`` only."""
        opt, lo, hi = self.optimizer, self.lo, self.hi
        in_backward.decline(opt, "ZeRO-1 (one reduce-scatter of the whole gradient after backward)")
        full_state = {k: v[lo:hi].copy() for k, v in opt._state.items()}
        opt._state.clear()
        opt._scratch_bufs.clear()
        opt.flat_params = self.full_params[lo:hi]
        opt.flat_grads = self.grad_shard
        if opt._penalty_mask is not None:
            opt._penalty_mask = opt._penalty_mask[lo:hi].copy()
        opt._init_state()
        for k, v in full_state.items():  # an optimiser that had state keeps its slice
            opt._state_buffer(k)[...] = v

    # --- the optimiser interface ----------------------------------------------------------
    def zero_grad(self) -> None:
        """Zeroes the full gradient buffer (deferred, as the wrapped optimiser does)."""
        self._synchronized = False
        super().zero_grad()

    def backward(self, loss: Any, batch_share: float | None = None) -> None:
        """``loss.backward()`` seeded with this rank's weight; ``step()`` then skips scaling."""
        super().backward(loss, batch_share)
        self._synchronized = False

    def resume_check(self, steps: int) -> bool:
        """False: this rank holds a slice of the optimiser state, no carry is taken from it."""
        return False

    def _settle_full_grads(self) -> None:
        for p in self.params:  # deferred zeros of parameters backward did not reach
            if p._grad_zeroed:
                p.grad  # noqa: B018  (the getter writes the zeros)

    def synchronize(self, batch_share: float | None = None) -> Any:
        """Reduce-scatters the weighted gradient (once per step: a second call returns the
        same slice); returns this rank's summed slice."""
        if self._synchronized:
            return self.grad_shard
        self._synchronized = True
        self._settle_full_grads()
        weight = self.step_weight(batch_share)
        if weight != 1.0:
            self.full_grads *= weight
        if self.comm.size == 1:
            self.grad_shard[...] = self.full_grads
            return self.grad_shard
        mpi = self.comm.MPI
        with trace.span("allreduce", part="reduce_scatter"):  # counted in metrics' comm_s
            self.comm.trace.enter("reduce_scatter(sum)", self.full_grads)
            shm = getattr(self.comm, "shm", None)
            if shm is None or not shm.reduce_scatter(self.full_grads, self.bounds, self.grad_shard):
                self.comm.comm.Reduce_scatter(self.full_grads, self.grad_shard, self.counts,
                                              op=mpi.SUM)  # fmt: skip
        return self.grad_shard

    def step(self, batch_share: float | None = None) -> None:
        """Reduce-scatter, update this rank's slice, all-gather the parameters."""
        self.synchronize(batch_share)
        opt = self.optimizer
        opt.steps += 1
        opt._update(opt.flat_params, opt.penalised_grads())
        if self.comm.size > 1:
            mpi = self.comm.MPI
            with trace.span("allreduce", part="allgather"):
                self.comm.trace.enter("allgather(params)", self.full_params)
                shm = getattr(self.comm, "shm", None)
                if shm is not None and shm.allgather(self.full_params, self.bounds):
                    return
                self.comm.comm.Allgatherv(
                    mpi.IN_PLACE, [self.full_params, self.counts, self.displs, mpi.FLOAT]
                    if self.full_params.dtype == np.float32
                    else [self.full_params, self.counts, self.displs, mpi.DOUBLE]
                )  # fmt: skip

    def _gather(self, shard: Any) -> Any:
        full = np.empty(self.full_params.size, dtype=shard.dtype)
        if self.comm.size == 1:
            full[...] = shard
            return full
        mpi = self.comm.MPI
        kind = mpi.FLOAT if shard.dtype == np.float32 else mpi.DOUBLE
        self.comm.trace.enter("allgather(state)", full)
        self.comm.comm.Allgatherv(shard, [full, self.counts, self.displs, kind])
        return full

    def state_dict(self) -> dict[str, Any]:
        """Collective: the whole optimiser state (every rank gets it), as the unsharded
        optimiser would return it."""
        opt = self.optimizer
        opt._init_state()
        state: dict[str, Any] = {"lr": opt.lr, "steps": opt.steps}
        for k in sorted(opt._state):
            state[k] = self._gather(opt._state[k])
        return state

    def gathered_state(self) -> GatheredState:
        """Collective: a snapshot of the full state that one rank alone can then checkpoint
        (``save_checkpoint(path, model, opt.gathered_state())`` on rank 0)."""
        return GatheredState(self.optimizer, self.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads a full state (from ``state_dict`` or an unsharded optimiser's checkpoint);
        every rank keeps its slice. Call on every rank."""
        n = self.full_params.size
        sliced = {}
        for k, v in state.items():
            if hasattr(v, "shape"):
                if tuple(v.shape) != (n,):
                    raise ValueError(
                        f"ShardedOptimizer.load_state_dict: {k!r} has shape {tuple(v.shape)}, "
                        f"expected the full buffer ({n},)"
                    )
                v = np.asarray(v)[self.lo : self.hi]
            sliced[k] = v
        self.optimizer.load_state_dict(sliced)
