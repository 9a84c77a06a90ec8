"""Batch shares that follow each MPI rank's measured compute rate (``[dist] rebalance``).

``ThroughputShares`` (``distnet.parallel.shares``, engine-neutral, the Ray engine's wrapper)
times each step's compute (``zero_grad`` to the first wait for other ranks: forward and
backward, not the collectives, not the input wait), fits each rank's step time as a fixed
cost plus a cost per sample (``distnet.parallel.steptime``) and splits the global batch again
at an epoch end; ``EpochRebalancer`` is that wrapper for the ranks of ``ProcessEngine``
(``engine = "mpi"``), with three additions:

- a decision rule: the ranks allgather their fitted step times (every rank then holds the same
  numbers) and compute the same split with equal predicted step times
  (``steptime.equal_time_split``: deterministic rounding, ties to the lower rank, so every
  rank derives the same integers, summing to the global batch). ``rebalance = true`` takes it
  at every measurement; ``"auto"`` only where it would shorten the predicted step,
  ``max_r(fixed_r + per_sample_r * b_r)``, by more than ``threshold`` (10 %): with equal
  speeds and an equal split nothing changes, and measurement noise below that never re-splits;
- the split in force goes into the stage's checkpoint (the optimiser state's ``batch_split``,
  written only while it is not the equal split) and a resumed stage takes it back, so a run
  resumed from an epoch checkpoint iterates the same samples per step as one that never
  stopped;
- a log line per decision on rank 0.

Gradients are weighted by each rank's share through the wrapped optimiser's weighted backward
(``SyncOptimizer.backward`` / ``DistributedOptimizer.backward``, as on Ray), so a step still
equals a single process's step on the whole global batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from distnet.optim.protocol import BATCH_SPLIT_KEY
from distnet.parallel.shares import BatchSplit, ThroughputShares
from distnet.parallel.steptime import StepTime, equal_time_split, step_time
from distnet.parallel.sync import GatheredState

__all__ = [
    "DELAY_ENV",
    "SLOW_ENV",
    "SPLIT_KEY",
    "THRESHOLD",
    "EpochRebalancer",
    "Rebalancing",
    "choose_split",
    "step_time",
]

THRESHOLD = 0.10  # "auto": least relative gain in step time worth a new split
SPLIT_KEY = BATCH_SPLIT_KEY  # the optimiser-state key a checkpoint keeps the split under
# per-rank injected delay (tests, demonstrations): seconds per sample, comma-separated by rank
DELAY_ENV = "DISTNET_DELAY_PER_SAMPLE_S"
# per-rank slow-down factor (benchmarks): after each backward a rank with factor k sleeps k - 1
# times its step's compute so far, comma-separated by rank ("1,3": rank 1 computes 3x slower)
SLOW_ENV = "DISTNET_SLOW_FACTOR"


def choose_split(
    sizes: Sequence[int], models: Sequence[StepTime], mode: bool | str, threshold: float = THRESHOLD
) -> list[int] | None:
    """The new per-rank batch sizes for the ranks' fitted step times (``models``, one per
    rank), or None to keep ``sizes``: the split with equal predicted step times, taken when
    ``mode`` is True, or (``"auto"``) when it shortens the predicted step by more than
    ``threshold``. Deterministic: the same inputs give the same integers on every rank."""
    new = equal_time_split(int(sum(sizes)), models, current=sizes)
    if list(new) == list(sizes):
        return None
    if mode is True or step_time(sizes, models) > (1.0 + threshold) * step_time(new, models):
        return new
    return None


def _rank_value(name: str, rank: int, default: float) -> float:
    """This rank's entry of the comma-separated variable ``name`` (``default`` when absent)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    values = [v.strip() for v in text.split(",")]
    try:
        return float(values[rank]) if rank < len(values) and values[rank] else default
    except ValueError:
        raise ValueError(f"{name}={text!r}: give one number per rank") from None


def _injected_delay(rank: int) -> float:
    """This rank's entry of ``DISTNET_DELAY_PER_SAMPLE_S`` ("0,0.004": rank 1 sleeps 4 ms per
    sample in each backward), 0 when absent."""
    return _rank_value(DELAY_ENV, rank, 0.0)


def _slow_factor(rank: int) -> float:
    """This rank's entry of ``DISTNET_SLOW_FACTOR`` ("1,3": rank 1 computes 3x slower), 1 when
    absent; a factor below 1 is refused."""
    factor = _rank_value(SLOW_ENV, rank, 1.0)
    if not factor >= 1.0:
        raise ValueError(f"{SLOW_ENV}: rank {rank}'s factor must be >= 1, got {factor}")
    return factor


def _some_rank_slowed(size: int) -> bool:
    """Whether any of ``size`` ranks has an injected delay or a slow-down factor (the same
    answer on every rank: each reads every rank's entry)."""
    return any(_injected_delay(r) > 0 or _slow_factor(r) > 1.0 for r in range(size))


class EpochRebalancer(ThroughputShares):
    """``ThroughputShares`` with the decision rule, the checkpointed split and a log line.

    Args:
        inner, loader, comm, rebalance_every, delay_per_sample_s, split: as
            ``ThroughputShares``.
        mode: True (re-split at every measurement) or "auto" (only when it pays, see
            ``choose_split``).
        threshold: "auto"'s least gain.
        say: where a decision's line goes (rank 0's log).
    """

    _OWN = ThroughputShares._OWN | {"mode", "threshold", "say"}
    takes_batch_split = True  # a checkpoint's split comes back through load_state_dict

    def __init__(
        self,
        inner: Any,
        loader: Any,
        comm: Any,
        *,
        mode: bool | str = "auto",
        threshold: float = THRESHOLD,
        say: Callable[[str], None] = lambda line: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(inner, loader, comm, **kwargs)
        self.mode, self.threshold, self.say = mode, threshold, say

    def rebalance(self) -> list[int]:
        """Collective: the rates allgathered, the same decision on every rank; returns the
        split in force after it."""
        models = self.gather_models()
        sizes = list(self.loader.batch_sizes)
        if models is None:  # a rank measured nothing: keep the split
            return sizes
        new = choose_split(sizes, models, self.mode, self.threshold)
        record = self.record(sizes, models, sizes if new is None else new)
        fixed = ", ".join(f"{1000 * s:.2f}" for s in record["fixed_s"])
        shown = f"samples/s {record['throughput']}, batch split {sizes}"
        if new is None:
            self.say(f"rebalance: {shown} kept (fixed ms per step [{fixed}])")
            return sizes
        self.split.change(self.loader, new)
        self.history.append(record)
        self.say(f"rebalance: {shown} -> {new} (fixed ms per step [{fixed}])")
        return new

    # --- the split goes into the checkpoint ---------------------------------------------------
    def _even(self) -> bool:
        sizes = self.loader.batch_sizes
        return len(set(sizes)) == 1

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.optimizer.state_dict())
        if not self._even():
            state[SPLIT_KEY] = list(self.loader.batch_sizes)
        return state

    def gathered_state(self) -> Any:
        """Collective (ZeRO-1 gathers): the wrapped optimiser's full state plus the split."""
        inner = self.optimizer.gathered_state()
        if self._even():
            return inner
        state = {**inner.state_dict(), SPLIT_KEY: list(self.loader.batch_sizes)}
        return GatheredState(inner, state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The wrapped optimiser's state; a saved split that fits this group (as many ranks,
        the same global batch) becomes the split in force (a checkpoint from another world
        size starts from the job's split)."""
        state = dict(state)
        sizes = state.pop(SPLIT_KEY, None)
        self.optimizer.load_state_dict(state)
        loader = self.loader
        if sizes is not None:
            sizes = [int(s) for s in sizes]
            if len(sizes) == loader.world_size and sum(sizes) == loader.global_batch:
                self.split.change(loader, sizes)


class Rebalancing:
    """What ``ProcessEngine`` holds when its ranks rebalance: the job's ``BatchSplit`` (every
    stage's loader takes the split in force from it) and the wrapper of each stage.

    Args:
        engine: a started ``ProcessEngine`` (``comm``, ``dist``, ``say``).
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.mode = engine.dist.get("rebalance", "auto")
        # rebalance = false with an injected delay: the slow rank, never re-split
        self.every = 0 if self.mode is False else int(engine.dist.get("rebalance_every", 200))
        self.split = BatchSplit()
        self.history: list[dict[str, Any]] = []
        self.delay = _injected_delay(engine.comm.rank)
        self.slow_factor = _slow_factor(engine.comm.rank)

    @staticmethod
    def wanted(engine: Any) -> bool:
        """Whether ``engine``'s job rebalances (or has a rank slowed on purpose): several
        ranks, strategy allreduce (local SGD averages parameters unweighted), ``rebalance =
        true`` and ``rebalance_every`` > 0, or some rank slowed by ``DISTNET_DELAY_PER_SAMPLE_S``
        or ``DISTNET_SLOW_FACTOR``: then every rank wraps (the same answer on every rank, so
        that a measurement's allgather finds every rank there)."""
        dist, comm = engine.dist, engine.comm
        if comm.size == 1 or dist.get("strategy", "allreduce") != "allreduce":
            return False
        # opt-in on MPI: a split that follows measured speed makes the result depend on
        # timing, so a resumed or repeated run would no longer equal the undisturbed one
        on = dist.get("rebalance", "auto") is True and int(dist.get("rebalance_every", 200))
        return bool(on) or _some_rank_slowed(comm.size)

    def share(self, loader: Any) -> Any:
        return self.split.hand_to(loader)

    def wrap(self, inner: Any, loader: Any) -> EpochRebalancer:
        """``inner`` (the strategy's optimiser) measured and re-split at epoch ends."""
        return EpochRebalancer(
            inner, loader, self.engine.comm, mode=self.mode, say=self.engine.say,
            rebalance_every=self.every, delay_per_sample_s=self.delay,
            slow_factor=self.slow_factor,
            history=self.history, split=self.split,
        )  # fmt: skip
