"""Batch shares that follow each worker's measured speed (heterogeneous workers), for any engine.

``ThroughputShares`` wraps a stage's data-parallel optimiser (a ``DistributedOptimizer`` or a
parameter-server optimiser). It times each step's compute (from ``zero_grad`` to the first
wait for other workers: forward and backward, not the communication), and at the first epoch
end after every ``rebalance_every`` steps the workers exchange their fitted step-time models
(``distnet.parallel.steptime``: a fixed cost per step plus a cost per sample) and split the
global batch again so that the predicted step times are equal: the loader's per-rank batch
sizes from the next epoch on, and the same fraction as each rank's ``batch_share`` of the
gradient. The global batch stays exactly the same and the shares sum to 1, so the update is
still the one a single worker would make on the whole global batch.

Shares change only at epoch ends: every rank's loader yields the same number of batches per
epoch, so every rank reaches the exchange at the same step.

The split in force lives in one place per worker, a ``BatchSplit``: the engine hands it to
every loader a stage iterates (the inputs, or a later stage's cached codes, made mid-job)
before the stage starts, and a rebalance changes it there and in the loader being iterated.

The Ray engine (``rayengine/rank.py``) wraps every stage's optimiser in ``ThroughputShares``;
the MPI engine's ``EpochRebalancer`` (``parallel/rebalance.py``) extends it with a decision
rule and a checkpointed split. This module imports no engine.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from distnet.backend import array_module, is_gpu_array
from distnet.data import order
from distnet.parallel.steptime import StepTime, StepTimeWindow, equal_time_split
from distnet.parallel.sync import PassThrough

__all__ = ["BatchSplit", "ThroughputShares", "set_batch_sizes"]


def set_batch_sizes(loader: Any, sizes: list[int]) -> None:
    """Splits ``loader``'s global batch as ``sizes`` (one per rank, same sum) from its next
    iteration on (a prefetch started under the old sizes is dropped by the loader)."""
    if len(sizes) != loader.world_size or sum(sizes) != loader.global_batch or min(sizes) < 1:
        raise ValueError(
            f"batch sizes {sizes} do not split the global batch {loader.global_batch} over "
            f"{loader.world_size} ranks"
        )
    loader.batch_sizes = [int(s) for s in sizes]
    loader.batch_size = loader.batch_sizes[loader.rank]


class BatchSplit:
    """A worker's batch split across the stages of its job (see the module docstring).

    Args:
        rank_weights: the split the job starts with, in proportion to these (None: equal).
    """

    def __init__(self, rank_weights: list[float] | None = None) -> None:
        self.rank_weights = rank_weights
        self.sizes: list[int] | None = None  # None: not yet made (no loader seen)

    def hand_to(self, loader: Any) -> Any:
        """Gives ``loader`` (a stage's, about to be iterated) the split in force; returns it."""
        if self.sizes is None:
            self.sizes = order.split_global_batch(
                loader.global_batch, loader.world_size, self.rank_weights
            )
        set_batch_sizes(loader, self.sizes)
        return loader

    def change(self, loader: Any, sizes: list[int]) -> None:
        """A new split (a rebalance) for ``loader``, the one iterated now, and later ones."""
        set_batch_sizes(loader, sizes)
        self.sizes = [int(s) for s in sizes]


class ThroughputShares(PassThrough):
    """A step-for-step stand-in for the optimiser it wraps, plus shares that follow speed.

    Args:
        inner: the data-parallel optimiser (``step(batch_share=...)``; a
            ``DistributedOptimizer`` also takes the share in ``backward``).
        loader: the ``StreamLoader`` the stage iterates on this rank (input samples or cached
            codes): ``fit``'s ``batch_share`` is checked against it, and a rebalance changes
            its ``batch_sizes`` in place.
        comm: the group's communicator (an ``allgather`` per rebalance).
        rebalance_every: least number of steps between two measurements (0: never).
        delay_per_sample_s: sleep this long per sample in each backward (a deliberately slow
            worker, to test and demonstrate the balancing).
        slow_factor: k >= 1: after each backward but the first, sleep k - 1 times the step's
            compute so far (forward and backward): a worker k times slower at computing,
            whatever the load of the host (benchmarks).
        history: a list the rebalances are appended to (``{"step", "throughput",
            "fixed_s", "batch_sizes"}``: samples/s measured at the old split, the fitted fixed
            seconds per step, the new split), shared across stages.
        on_step: called with the step number after every finished step (fault injection and
            sample accounting hang on it).
        split: the worker's ``BatchSplit`` that a rebalance changes (None: one of its own).
    """

    _OWN = frozenset(
        "optimizer loader comm rebalance_every delay_per_sample_s slow_factor history on_step "
        "split _t0 _backward_done timing _since step_count".split()
    )

    def __init__(
        self,
        inner: Any,
        loader: Any,
        comm: Any,
        *,
        rebalance_every: int = 200,
        delay_per_sample_s: float = 0.0,
        slow_factor: float = 1.0,
        history: list[dict[str, Any]] | None = None,
        on_step: Any = None,
        split: BatchSplit | None = None,
    ) -> None:
        self.optimizer, self.loader, self.comm = inner, loader, comm
        self.split = split if split is not None else BatchSplit()
        self.rebalance_every = rebalance_every
        self.delay_per_sample_s = delay_per_sample_s
        self.slow_factor = slow_factor
        self.history = history if history is not None else []
        self.on_step = on_step
        self._t0: float | None = None
        self._backward_done = False
        self.timing = StepTimeWindow()  # this stage's steps: its fixed and per-sample cost
        self._since = 0  # steps since the last rebalance
        self.step_count = 0

    @property
    def batch_share(self) -> float:
        """This rank's fraction of the global batch now."""
        return self.loader.batch_size / self.loader.global_batch

    # --- the optimiser interface -------------------------------------------------------
    def zero_grad(self) -> None:
        self._t0 = time.perf_counter()
        self._backward_done = False
        self.optimizer.zero_grad()

    def backward(self, loss: Any, batch_share: float | None = None) -> None:
        """``batch_share`` (what ``fit`` reads from the loader) must be this worker's share."""
        if batch_share is not None and abs(batch_share - self.batch_share) > 1e-12:
            raise ValueError(f"batch_share {batch_share} is not this worker's {self.batch_share}")
        if self.delay_per_sample_s:
            time.sleep(self.delay_per_sample_s * self.loader.batch_size)
        # the share goes into backward's seed gradient (no extra pass over the gradients)
        self.optimizer.backward(loss, batch_share=self.batch_share)
        # not the first step: its compile and cache warm-up is no measure of the worker's speed
        if self.slow_factor > 1.0 and self._t0 is not None and self.step_count > 0:
            time.sleep((self.slow_factor - 1.0) * (time.perf_counter() - self._t0))
        self._backward_done = True

    def synchronize(self, batch_share: float | None = None) -> Any:
        """Waits for the wrapped optimiser's reductions (fit's finite check reads them) and
        returns what it returns (None when it has nothing to wait for: a parameter server
        gets this worker's own gradient); the wait for the other workers is not this
        worker's compute time. ``batch_share=0.0``: fit's step without samples here."""
        if batch_share != 0.0:
            self._stop_clock()
        return self.optimizer.synchronize(batch_share=batch_share)

    @property
    def finite_comm(self) -> Any:
        """The workers that take fit's non-finite decision together: the wrapped optimiser's
        group when it has one (a parameter server in async mode: none), else all (one
        worker left, a plain optimiser)."""
        inner = self.optimizer
        return inner.finite_comm if inner.comm is not None else self.comm

    def _stop_clock(self) -> None:
        """Ends this step's compute time (zero_grad to the first wait for other workers)."""
        if self._t0 is None:
            return
        grads = self.optimizer.flat_grads
        if is_gpu_array(grads):  # kernels run ahead of the host
            array_module(grads).cuda.get_current_stream().synchronize()
        self.timing.add_step(self.loader.batch_size, time.perf_counter() - self._t0)
        self._t0 = None

    def step(self, batch_share: float | None = None) -> None:
        if batch_share is not None and abs(batch_share - self.batch_share) > 1e-12:
            if batch_share == 0.0:  # fit: no samples here in a short last batch
                self.optimizer.step(batch_share=0.0)
                return
            raise ValueError(f"batch_share {batch_share} is not this worker's {self.batch_share}")
        self._stop_clock()
        if self._backward_done:
            self.optimizer.step()
        else:
            self.optimizer.step(batch_share=self.batch_share)
        self._step_taken()

    def skip_step(self) -> None:
        """``fit`` skipped this step (non-finite): the wrapped optimiser hears of it (a
        parameter server's clock), and it counts as a step taken. A worker that decides
        alone (async/ssp) must still reach the epoch's last step, where the rebalance is a
        collective, and the engine's step hooks follow the loader, which moved on."""
        self._stop_clock()
        self.optimizer.skip_step()
        self._step_taken()

    def _step_taken(self) -> None:
        self.step_count += 1
        self._since += 1
        if self.on_step is not None:
            self.on_step(self.step_count)
        if self.rebalance_every and self._since >= self.rebalance_every:
            if self.loader.steps_remaining() == 0:  # the epoch's last step, on every rank
                self.rebalance()

    def gather_models(self) -> list[StepTime] | None:
        """Collective: ends this period's measurement and allgathers every worker's fitted
        step time (the same list on every rank); None when a worker measured no step."""
        mine = self.timing.close_period()
        self._since = 0
        sent = None if mine is None else (mine.fixed_s, mine.per_sample_s)
        gathered = self.comm.allgather(sent)
        if any(g is None for g in gathered):
            return None
        return [StepTime(float(a), float(b)) for a, b in gathered]

    def rebalance(self) -> list[int]:
        """Collective: the split with equal predicted step times; returns it."""
        models = self.gather_models()
        if models is None:  # a rank measured nothing: keep the split
            return list(self.loader.batch_sizes)
        return self.resplit(models)

    def resplit(self, models: list[StepTime]) -> list[int]:
        """Splits the global batch (exactly, each rank at least one sample) so that the
        ``models`` (one per rank, from ``gather_models``) predict equal step times, and records
        it in ``history``; returns the new sizes. Not collective: every rank calls it with the
        same models and gets the same sizes."""
        old = list(self.loader.batch_sizes)
        sizes = equal_time_split(self.loader.global_batch, models, current=old)
        self.split.change(self.loader, sizes)
        self.history.append(self.record(old, models, sizes))
        return sizes

    def record(self, old: list[int], models: list[StepTime], sizes: list[int]) -> dict[str, Any]:
        """A rebalance for ``history``: measured samples/s at the ``old`` split (the fitted
        model passes through the latest measurement), fixed seconds per step, new ``sizes``."""
        rates = [m.samples_per_s(b) for b, m in zip(old, models, strict=True)]
        return {"step": self.step_count, "throughput": np.round(rates, 1).tolist(),
                "fixed_s": [round(m.fixed_s, 5) for m in models],
                "batch_sizes": list(sizes)}  # fmt: skip

    # --- everything else is the wrapped optimiser's (``PassThrough``) --------------------
    def __setattr__(self, name: str, value: Any) -> None:
        # lr from schedules and ReduceLROnPlateau must reach the optimiser that updates
        if name not in self._OWN and hasattr(self.optimizer, name):
            setattr(self.optimizer, name, value)
        else:
            object.__setattr__(self, name, value)
