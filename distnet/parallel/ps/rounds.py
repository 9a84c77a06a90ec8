"""When a push's reply may leave a shard: the sync round and the ssp wait.

Mixed into ``ParameterServerShard``. In ``sync`` a round is complete when every worker has one
pending gradient; they are summed in worker order (deterministic), each already weighted by its
batch share, and applied once. In ``ssp`` (bound s) the reply waits until the slowest live
worker's clock is at least this worker's clock minus s. No wait is unbounded: a sync round that
has not heard from every worker within ``round_timeout_s`` of its first push, or an ssp wait
that long, fails with ``RoundFailed`` naming the shard and the missing worker(s); ``abort``
fails them at once. After a restart from a snapshot, rounds of different clocks meet by design
(``rounds_lost`` counts what the lost incarnation had completed).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from distnet.parallel.ps.pushcheck import PushRecord, round_mismatch


class RoundFailed(RuntimeError):
    """A sync round or an ssp wait that timed out or was aborted (names shard and workers)."""


class RoundAborted(RoundFailed):
    """A round or wait that the shard's ``abort`` ended: the group pushing here lost a worker.
    Any survivor's abort ends the shared shards' rounds, so a worker may see this before its
    own group's abort (``WorkerLostError``) reaches it; ``calls.call_shards`` waits for that."""


class SyncRound:
    """One sync round: the gradients pending by worker, and how it ended."""

    def __init__(self) -> None:
        # worker -> (gradient, share, clock, seen version, linked, PushRecord or None)
        self.pending: dict[int, tuple] = {}
        self.done = asyncio.Event()
        self.deadline: float | None = None  # set by the round's first push
        self.result: Any = None
        self.error: str | None = None
        self.aborted = False  # ended by the shard's abort (RoundAborted), not a timeout


class RoundRules:
    """The sync round and the ssp wait of a shard (needs the counters and ``opt``, ``params``,
    ``version``, ``staleness``, ``round_timeout_s`` set by ``ParameterServerShard``, and its
    ``_step``, ``_record``, ``_reply``, ``_refuse``, ``_maybe_snapshot``, ``_publish``,
    ``_answer``, ``_where`` and ``live_slowest``)."""

    num_workers: int
    staleness: int
    round_timeout_s: float
    clocks: list[int]
    left: set[int]
    pushes_applied: list[int]
    rounds_failed: int
    rounds_lost: int
    restored_from_snapshot: bool
    ledger: Any
    incarnations: list[int]
    _settle: Any
    version: int
    opt: Any
    params: np.ndarray
    lo: int
    hi: int
    _aborted: str | None
    _round: SyncRound
    _clock_changed: asyncio.Condition
    _board: Any
    _step: Any
    _record: Any
    _reply: Any
    _refuse: Any
    _maybe_snapshot: Any
    _publish: Any
    _answer: Any
    _where: Any
    live_slowest: Any

    def _init_rounds(self) -> None:
        self._round = SyncRound()
        self._clock_changed = asyncio.Condition()
        self._last_sum: np.ndarray | None = None
        self._scratch_buf: np.ndarray | None = None

    async def _ssp_wait(self, worker: int, clock: int) -> None:
        """Waits (holding ``_clock_changed``) until ``clock`` is within s of the slowest."""

        def ready() -> bool:  # the slowest *live* worker: one that left is not waited for
            return self._aborted is not None or clock - self.live_slowest() <= self.staleness

        reason = self._aborted
        try:
            await asyncio.wait_for(self._clock_changed.wait_for(ready), self.round_timeout_s)
            reason = self._aborted
        except TimeoutError:
            reason = f"no push within {self.round_timeout_s:g} s"
        if clock - self.live_slowest() > self.staleness:
            behind = [
                w
                for w, c in enumerate(self.clocks)
                if clock - c > self.staleness and w not in self.left
            ]
            self.rounds_failed += 1
            raise (RoundFailed if self._aborted is None else RoundAborted)(
                f"{self._where()}: ssp wait of worker {worker} at clock {clock} failed: "
                f"{reason}; missing worker(s) {behind} (clocks {self.clocks})"
            )

    def _fail_round(self, round_: SyncRound, reason: str, aborted: bool = False) -> None:
        """Ends ``round_`` with an error for every worker waiting in it (once); ``aborted``:
        by the shard's ``abort``."""
        if round_.error is not None or round_.done.is_set():
            return
        round_.aborted = aborted
        missing = sorted(set(range(self.num_workers)) - set(round_.pending))
        clocks = sorted({entry[2] for entry in round_.pending.values()})
        round_.error = (
            f"{self._where()}: sync round of clock {clocks} failed: {reason}; "
            f"missing worker(s) {missing}"
        )
        self.rounds_failed += 1
        if round_ is self._round:
            self._round = SyncRound()  # later pushes start a new round
        round_.done.set()

    async def _sync_push(
        self,
        worker: int,
        clock: int,
        seen: int,
        grad: np.ndarray,
        share: float,
        linked: bool,
        record: PushRecord | None = None,
    ) -> tuple[int, Any]:
        # A round is complete when every worker has one pending gradient (keyed by worker, so
        # a retried push replaces its own entry instead of counting twice).
        round_done = self._round
        # the collective check: after a restart from a snapshot rounds of different clocks
        # meet by design (below); otherwise every push of a round has the same clock and op
        mismatch = round_mismatch(record, round_done.pending, not self.restored_from_snapshot)
        if mismatch is not None:
            self._fail_round(round_done, mismatch)  # the workers waiting in it raise too
            self._refuse(mismatch)
        clocks = {entry[2] for w, entry in round_done.pending.items() if w != worker}
        if clocks and min(clocks) > clock:
            # the others are past this clock: they finished this round in an incarnation that
            # died before this worker got its reply, and the snapshot this one restored
            # predates it. This is the retry; joining their round would pair different steps
            # from now on, and at the end one round would wait for a push that never comes.
            self.clocks[worker] = max(self.clocks[worker], clock)
            self.rounds_lost += 1
            return self._answer(linked)
        if clocks and max(clocks) < clock and worker not in round_done.pending:
            # the mirror case: this worker got that round's reply before the restart
            self._settle_lost_round(round_done)
            round_done = self._round
        round_done.pending[worker] = (grad, float(share), clock, seen, linked, record)
        loop = asyncio.get_running_loop()
        if round_done.deadline is None:
            round_done.deadline = loop.time() + self.round_timeout_s
        if len(round_done.pending) == self.num_workers:
            pending = round_done.pending
            total = self.opt.flat_grads if self.opt is not None else self._sum_buffer()
            for n, w in enumerate(sorted(pending)):  # fixed order: the same sum on every run
                g, weight = pending[w][0], np.float32(pending[w][1])
                if n == 0:
                    np.multiply(g, weight, out=total) if weight != 1 else np.copyto(total, g)
                elif weight == 1:
                    total += g
                else:
                    total += np.multiply(g, weight, out=self._scratch())
            # the backup steps on the sum while this replica does (replica.py)
            rows = [(w, self.incarnations[w], pending[w][2], 1) for w in sorted(pending)]
            sent = self._step(rows)
            for w in sorted(pending):
                self.ledger.note(w, self.incarnations[w], pending[w][2], 1)
                self.pushes_applied[w] += 1
                self._record(w, pending[w][2], pending[w][3])
            self._maybe_snapshot()
            self._round = SyncRound()  # later pushes (and a retry while it forwards) start anew
            await self._settle(sent)  # every worker answered once the backup holds it too
            round_done.result = self._round_result(pending)
            round_done.done.set()
        else:
            # bounded: a worker that died never pushes, and nobody may wait for it forever
            left = max(0.0, round_done.deadline - loop.time())
            try:
                await asyncio.wait_for(round_done.done.wait(), left)
            except TimeoutError:
                self._fail_round(
                    round_done, f"no push within {self.round_timeout_s:g} s of the round's first"
                )
        if round_done.error is not None:
            raise (RoundAborted if round_done.aborted else RoundFailed)(round_done.error)
        version, put_ref = round_done.result
        if linked and self._board is not None:
            return version, self._board.ref  # the board holds this round's result until the next
        return version, put_ref

    def _round_result(self, pending: dict[int, tuple]) -> tuple[int, Any]:
        """A completed round's ``(version, put-once reference or None)``: one copy into the
        object store for all the round's array-pushing workers (not one per reply), and the
        board written for the linked ones."""
        import ray  # noqa: PLC0415 (the shard runs inside a Ray actor)

        self._publish()
        unlinked = any(not entry[4] for entry in pending.values())
        return self.version, ray.put(self._reply()) if unlinked else None

    def _settle_lost_round(self, round_: SyncRound) -> None:
        """Ends ``round_``, whose waiting workers' step a lost incarnation of this shard had
        completed, with what the shard holds now (nothing applied: that step's update was
        lost with the incarnation, like every update since the snapshot)."""
        for w, entry in round_.pending.items():
            self.clocks[w] = max(self.clocks[w], entry[2])
        self.rounds_lost += 1
        round_.result = self._round_result(round_.pending)
        self._round = SyncRound()
        round_.done.set()

    def _sum_buffer(self) -> np.ndarray:
        if self._last_sum is None:
            self._last_sum = np.empty(self.hi - self.lo, dtype=np.float32)
        return self._last_sum

    def _scratch(self) -> np.ndarray:
        if self._scratch_buf is None:
            self._scratch_buf = np.empty(self.hi - self.lo, dtype=np.float32)
        return self._scratch_buf
