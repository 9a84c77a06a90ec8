"""``ParameterServerShard``: one contiguous range ``[lo, hi)`` of the flat parameter buffer.

A Ray actor (asyncio: one event loop, so updates to the slice never interleave). Workers call
``push_pull`` once per step: their gradient slice goes in, the shard's parameter slice (or, with
the optimiser on the workers, the summed gradient slice) comes back, after

- ``sync``: every worker's gradient of the round arrived; they are summed in worker order
  (deterministic), each already weighted by its batch share, and applied once;
- ``async`` (Downpour): the gradient is applied on arrival;
- ``ssp`` (bound s): applied on arrival; the reply waits until the slowest worker's clock is
  at least this worker's clock minus s, so no worker starts a step more than s clocks ahead.

Every push carries the job's token; anything not from this job, or not a float32 array of the
slice's shape, is refused before the parameters are touched. So is every call that reads or
writes the parameters or the optimiser state, or aborts (``get_params``, ``get_reply``,
``set_params``, ``state_dict``, ``load_state_dict``, ``abort``: the token comes first); only
``stats`` and ``ping`` (counters, no parameters) answer anyone. The slice and optimiser state are
snapshotted to a file every ``snapshot_every`` updates; a restarted actor (``max_restarts``)
reloads it in its constructor. The rounds since that snapshot are lost; in ``sync`` the
workers may then stand one step apart on this shard (one got the dead incarnation's reply,
the other retries), and the shard answers the retry with what it holds instead of pairing
different steps (``rounds_lost`` counts these).

No wait is unbounded: a sync round that has not heard from every worker within
``round_timeout_s`` of its first push, or an ssp wait for the slowest worker that long, fails
with ``RoundFailed`` naming the shard and the missing worker(s); ``abort(token, reason)`` fails
them, and every later push, at once (the Ray engine's workers call it through
``ParameterServer.attach`` when the driver tears their group down, a worker having died or
failed: the next group gets a new server, so the old one's rounds can never complete). In ssp
a retried push (its clock applied already) is not applied again but waits for the bound as its
first call does, else a worker whose call timed out would run ahead of it. Per-worker counters
of pushes received and applied (``stats``) show that every update is applied exactly once.
In async/ssp, workers may ``leave`` and ``join`` (``membership.py``): ssp then waits only
for the slowest live worker.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

from distnet.parallel.ps import link
from distnet.parallel.ps.autostale import AutoStaleness
from distnet.parallel.ps.ledger import Ledger
from distnet.parallel.ps.membership import Membership
from distnet.parallel.ps.optimizers import build_optimizer
from distnet.parallel.ps.pushcheck import push_record
from distnet.parallel.ps.replica import Replication
from distnet.parallel.ps.rounds import RoundAborted, RoundRules
from distnet.parallel.ps.shardchecks import ShardChecks
from distnet.parallel.ps.shardlink import ShardLink
from distnet.parallel.ps.shardstate import ShardState
from distnet.parallel.ps.snapshot import load_snapshot, save_snapshot

MODES = ("sync", "async", "ssp")
KEEP_CLOCK_RECORDS = 10_000  # per worker: enough for tests and reports, bounded for long runs


def _ray() -> Any:
    import ray

    return ray


def _was_restarted() -> bool:
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 (not inside a Ray actor)
        return False


class ParameterServerShard(ShardChecks, RoundRules, ShardState, Membership, ShardLink, Replication):
    """One shard: its counters, the one call per step and the updates (wrapped by
    ``ray.remote`` in ``server.py``); the checks, rounds, state and board are its mixins.

    Args:
        index: this shard's number; ``lo``, ``hi``: its range of the flat buffer.
        params: the whole initial flat buffer, shape ``(n,)`` float32 (the shard copies its
            range; ignored when a snapshot exists).
        mode: ``sync``, ``async`` or ``ssp``; ``staleness``: the ssp bound s.
        num_workers: workers that push; ``token``: the job's secret.
        optimizer: config dict; ``optimizer_on``: ``"server"`` (the shard steps) or ``"worker"``
            (the shard only sums; sync only, BytePS).
        snapshot_path: file for snapshots (None: off); ``snapshot_every``: updates between them.
        penalty_mask: the slice of the weight-decay mask, or None.
        round_timeout_s: the longest a sync round (from its first push) or an ssp wait may
            wait for the other workers before it fails with ``RoundFailed``.
        threads: threads of the shard's update kernels (numba). The shards already update
            in parallel, one process each, beside the workers: a multi-threaded kernel per
            shard oversubscribes the cores (``distnet bench ps``, 4 workers, 2 shards on 2
            cores: 1.6x Ray's example with numba's default 2 threads, 2.6x with 1).
    """

    def __init__(
        self,
        index: int,
        lo: int,
        hi: int,
        params: np.ndarray,
        *,
        mode: str,
        staleness: int,
        num_workers: int,
        token: str,
        optimizer: dict[str, Any],
        optimizer_on: str,
        snapshot_path: str | None,
        snapshot_every: int,
        penalty_mask: np.ndarray | None = None,
        round_timeout_s: float = 600.0,
        threads: int = 1,
        backup: Any = None,
        role: str = "single",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"parameter server: mode must be one of {MODES}, got {mode!r}")
        self.index, self.lo, self.hi = index, lo, hi
        # staleness "auto": the ssp bound follows the workers' measured speeds (autostale.py)
        self.auto = AutoStaleness(int(num_workers)) if staleness == "auto" else None
        staleness = 0 if self.auto is not None else staleness
        self.mode, self.staleness, self.num_workers = mode, int(staleness), int(num_workers)
        self._token = token
        self.optimizer_on = optimizer_on
        self.snapshot_path, self.snapshot_every = snapshot_path, int(snapshot_every)
        self.version = 0  # updates applied to this slice
        self.clocks = [0] * num_workers  # steps per worker: pushes applied, and skipped
        self.steps_skipped = [0] * num_workers  # async/ssp: steps a worker pushed no gradient
        self.staleness_counts: list[dict[int, int]] = [{} for _ in range(num_workers)]
        self.ahead_records: list[list[tuple[int, int]]] = [[] for _ in range(num_workers)]
        self.refused = 0
        self.restored_from_snapshot = False
        self.round_timeout_s = float(round_timeout_s)
        self.threads = max(1, int(threads))
        self._threads_set_in: int | None = None  # the thread whose kernel threads were set
        self.pushes_received = [0] * num_workers  # every push that passed the checks
        self.pushes_applied = [0] * num_workers  # ... whose gradient went into an update
        self.linked_pushes = [0] * num_workers  # ... that came through the worker's outbox
        self.rounds_failed = 0
        self.rounds_lost = 0  # sync rounds a restart from a snapshot lost (see _sync_push)
        self.ledger = Ledger(4)  # (worker, incarnation, clock, kind) per push taken (ledger.py)
        self._aborted: str | None = None  # fails ssp waits (sync rounds end one by one)
        self._init_rounds()  # the sync round and the ssp wait (rounds.py)
        self._init_link()  # the same-node road (shardlink.py)
        self.opt = None
        self._init_membership()  # async/ssp: workers that leave and join (membership.py)
        self._init_replication(backup, role)  # replicas = 2: the backup (replica.py)
        mine = np.asarray(params, dtype=np.float32)[lo:hi]
        if optimizer_on == "server":
            self.opt = build_optimizer(optimizer, mine, penalty_mask)
            self.params = self.opt.flat_params
        else:
            self.params = np.array(mine, dtype=np.float32, copy=True)
        # Only a restart reads the snapshot: a new job in the same run directory starts fresh.
        if snapshot_path and _was_restarted() and os.path.exists(snapshot_path):
            self._restore(load_snapshot(snapshot_path))
        elif snapshot_path:
            save_snapshot(snapshot_path, self._state())  # a restart before the first one

    # --- the one call per step ------------------------------------------------------------
    async def push_pull(
        self,
        token: str,
        worker: int,
        clock: int,
        seen_version: int,
        grad: np.ndarray | link.LinkRef,
        share: float,
        lr: float | None,
        incarnation: int = 0,
        site: str | None = None,
    ) -> tuple[Any, Any]:
        """Applies (or, in sync, contributes) ``grad`` (shape ``(hi - lo,)``), then returns
        ``(version, slice)``: the parameters, or the summed gradient when the optimiser runs
        on the workers. ``clock`` is this worker's step number (1, 2, ...); a push with a
        clock the shard already applied (a retry) is not applied twice, nor one of a worker
        that left or of an older ``incarnation`` of its index (``membership.py``).

        ``grad`` None (async/ssp): the worker skipped this step (a non-finite gradient, which
        it decides alone there): nothing is applied, but its clock advances and ssp waits as
        after a push, else the others would wait for a clock it never pushes.

        ``grad`` may be a ``LinkRef`` to the worker's outbox (``link.py``): the reply is then
        ``(version, the board's LinkRef)``, or ``("unlinked", None)`` with nothing applied
        when the outbox cannot be mapped here (the worker sends the array instead).

        ``site``: where the worker asked for this push, sent with the collective check on
        (``pushcheck.py``): a refusal names it, and a sync round compares its pushes."""
        linked = isinstance(grad, link.LinkRef)
        if linked:
            grad = self._open_outbox(token, worker, grad)
            if grad is None:
                return "unlinked", None
        self._check(token, worker, grad, share, clock, seen_version, lr, site)
        record = None if site is None else push_record(worker, clock, grad, str(site))
        skipped = grad is None
        self.pushes_received[worker] += 1
        self.linked_pushes[worker] += linked
        if self._aborted is not None:  # the group that pushes here is gone: nothing completes
            self.rounds_failed += 1
            raise RoundAborted(
                f"{self._where()}: push of worker {worker} at clock {clock} failed: {self._aborted}"
            )
        sent = None  # the forward to the backup this push waits for
        if not self._admits(worker, incarnation):
            return self._answer(linked)
        if lr is not None and self.opt is not None:
            self.opt.lr = float(lr)
        if clock <= self.clocks[worker]:  # a retried push that was applied already
            if self.mode == "ssp":
                # its first call may still be waiting for the slowest worker: the retry waits
                # as long (answered at once, it would let the worker run past the bound)
                async with self._clock_changed:
                    await self._ssp_wait(worker, clock)
            return self._answer(linked)
        if self.auto is not None:
            self.auto.arrived(worker, time.monotonic())
        if self.mode == "sync":
            return await self._sync_push(worker, clock, seen_version, grad, share, linked, record)
        self.ledger.note(worker, incarnation, clock, 0 if skipped else 1)
        if skipped:
            self.steps_skipped[worker] += 1
            self.clocks[worker] = max(self.clocks[worker], clock)
        else:
            sent = self._apply(grad, float(share), [(worker, incarnation, clock, 1)])
            self.pushes_applied[worker] += 1
            self._record(worker, clock, seen_version)
            self._maybe_snapshot()
        if skipped and self.replicated:
            sent = self._send(
                {"kind": "skip", "worker": worker, "incarnation": incarnation, "clock": clock}
            )
        await self._settle(sent)  # answered once the backup holds it too (replica.py)
        async with self._clock_changed:
            self._clock_changed.notify_all()
            if self.mode == "ssp":
                # Ho et al. 2013: the worker may start step clock+1 only if it is then at most
                # s clocks ahead of the slowest worker
                if self.auto is not None:
                    live = [w for w in range(self.num_workers) if w not in self.left]
                    self.staleness = self.auto.update(self.live_slowest(), live)
                await self._ssp_wait(worker, clock)
            self.ahead_records[worker].append((clock, self.live_slowest()))
            del self.ahead_records[worker][:-KEEP_CLOCK_RECORDS]
            if self.auto is not None:  # the bound in force beside each ahead record
                self.auto.answered(worker, time.monotonic(), self.staleness, KEEP_CLOCK_RECORDS)
        return self._answer(linked)

    def _where(self) -> str:
        return f"parameter-server shard {self.index} [{self.lo}:{self.hi})"

    async def abort(self, token: str, reason: str) -> int:
        """Fails the waiting sync round and every ssp wait with ``reason`` (the group that
        pushes here is gone; every later push fails at once too); returns how many workers
        were waiting in the sync round."""
        self._check_caller(token, "abort")
        waiting = len(self._round.pending)
        if waiting:
            self._fail_round(self._round, f"aborted: {reason}", aborted=True)
        self._aborted = f"aborted: {reason}"
        async with self._clock_changed:
            self._clock_changed.notify_all()
        return waiting

    # --- updates ----------------------------------------------------------------------------
    def _apply(self, grad: np.ndarray, weight: float, rows: list[tuple]) -> tuple | None:
        """One update with ``weight * grad`` (async/ssp: optimiser on the shards); ``rows``
        and the return as ``_step``'s."""
        g = self.opt.flat_grads
        np.multiply(grad, np.float32(weight), out=g) if weight != 1.0 else np.copyto(g, grad)
        return self._step(rows)

    def _step(self, rows: list[tuple]) -> tuple | None:
        """The optimiser's step on ``flat_grads`` (a summing shard keeps the sum instead).
        With a backup, its input goes to the backup first, as the update of the ledger
        ``rows`` (worker, incarnation, clock, 1), so that both replicas step at once; returns
        what the caller must ``_settle`` before it answers (replica.py)."""
        sent = None
        if self._backup is not None:  # the backup steps on the same input
            self._keep_step_input(self.opt.flat_grads if self.opt is not None else self._last_sum)
            sent = self._send(self._op_update(rows))
        if self.opt is not None:
            self._limit_kernel_threads()
            self.opt.step()
        self.version += 1
        if self.mode != "sync":  # a sync round publishes once it is complete
            self._publish()
        return sent

    def _limit_kernel_threads(self) -> None:
        """numba's thread count is per calling thread: set it in the thread that steps."""
        ident = threading.get_ident()
        if self._threads_set_in == ident:
            return
        self._threads_set_in = ident
        try:
            import numba  # noqa: PLC0415
        except ImportError:
            return
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))

    def _record(self, worker: int, clock: int, seen_version: int) -> None:
        self.clocks[worker] = max(self.clocks[worker], clock)
        # the version this gradient was computed on vs the one it was applied to
        stale = max(0, self.version - 1 - int(seen_version))
        counts = self.staleness_counts[worker]
        counts[stale] = counts.get(stale, 0) + 1

    def _reply(self) -> np.ndarray:
        if self.opt is None:
            return self._last_sum if self._last_sum is not None else np.zeros_like(self.params)
        return self.params

    # --- counters ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per-worker clocks, staleness histograms and ssp (clock, slowest clock) records."""
        return {
            "shard": self.index,
            "range": [self.lo, self.hi],
            "version": self.version,
            "clocks": list(self.clocks),
            "staleness": [dict(c) for c in self.staleness_counts],
            "ahead": [list(r) for r in self.ahead_records],
            "auto_staleness": None if self.auto is None else self.auto.stats(),
            "refused": self.refused,
            "pushes_received": list(self.pushes_received),
            "pushes_applied": list(self.pushes_applied),
            "steps_skipped": list(self.steps_skipped),
            "linked_pushes": list(self.linked_pushes),
            "rounds_failed": self.rounds_failed,
            "rounds_lost": self.rounds_lost,
            "left": sorted(self.left),
            "ignored_pushes": list(self.ignored_pushes),
            "membership": [dict(m) for m in self.membership],
            "restored_from_snapshot": self.restored_from_snapshot,
            "replica_role": self.replica_role,
            "backup_lost": self.backup_lost,
            "replica_seq": [self._seq_out, self._seq_in],  # operations sent, applied
            "backups_adopted": self.backups_adopted,  # new backups it filled (warden.py)
            "replica_forwards": dict(self.forwards),  # updates forwarded by link, by value
            "placement_group": _ray().get_runtime_context().get_placement_group_id(),
            "node_id": _ray().get_runtime_context().get_node_id(),
        }

    def ledger_rows(self, token: str) -> np.ndarray:
        """The ledger (``ledger.py``): one row ``(worker, incarnation, clock, kind)`` per push
        this shard took, in order, shape ``(n, 4)`` int64."""
        self._check_caller(token, "ledger_rows")
        return self.ledger.rows()

    def ping(self) -> int:
        return os.getpid()
