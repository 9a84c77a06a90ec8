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

import asyncio
import hmac
import json
import math
import os
import threading
import time
from typing import Any

import numpy as np

from distnet.parallel.ps import link
from distnet.parallel.ps.autostale import AutoStaleness
from distnet.parallel.ps.membership import Membership
from distnet.parallel.ps.optimizers import build_optimizer
from distnet.parallel.ps.pushcheck import PushRecord, push_record, round_mismatch
from distnet.parallel.ps.shardlink import ShardLink
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


class CallRefused(ValueError):
    """A call that did not carry this job's token (never retried)."""


class PushRefused(CallRefused):
    """A push that was not from this job or did not fit the shard (never retried)."""


class RoundFailed(RuntimeError):
    """A sync round or an ssp wait that timed out or was aborted (names shard and workers)."""


class _Round:
    """One sync round: the gradients pending by worker, and how it ended."""

    def __init__(self) -> None:
        # worker -> (gradient, share, clock, seen version, linked, PushRecord or None)
        self.pending: dict[int, tuple] = {}
        self.done = asyncio.Event()
        self.deadline: float | None = None  # set by the round's first push
        self.result: Any = None
        self.error: str | None = None


class ParameterServerShard(Membership, ShardLink):
    """One shard's state and update rules (wrapped by ``ray.remote`` in ``server.py``).

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
        self._aborted: str | None = None  # fails ssp waits (sync rounds end one by one)
        self._round = _Round()
        self._clock_changed = asyncio.Condition()
        self._last_sum: np.ndarray | None = None
        self._scratch_buf: np.ndarray | None = None
        self._init_link()  # the same-node road (shardlink.py)
        self.opt = None
        self._init_membership()  # async/ssp: workers that leave and join (membership.py)
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

    # --- checks ---------------------------------------------------------------------------
    def _check(
        self,
        token: str,
        worker: int,
        grad: Any,
        share: float,
        clock: Any,
        seen: Any,
        lr: Any,
        site: Any = None,
    ) -> None:
        problem = self._sender_problem(token, worker) or self._push_problem(
            worker, grad, share, clock, seen, lr
        )
        if problem:
            self._refuse(problem if site is None else f"{problem} (pushed at {site})")

    def _refuse(self, problem: str) -> None:
        self.refused += 1
        raise PushRefused(f"{self._where()}: refused: {problem}")

    def _push_problem(
        self, worker: int, grad: Any, share: Any, clock: Any, seen: Any, lr: Any
    ) -> str | None:
        if grad is None:  # a skipped step; in sync every worker skips it, and none pushes
            if self.mode == "sync":
                return f"worker {worker} pushed a skipped step in sync mode"
        elif not isinstance(grad, np.ndarray) or grad.dtype != np.float32:
            kind = getattr(grad, "dtype", type(grad).__name__)
            return f"worker {worker} pushed {kind}, expected a float32 numpy array"
        elif grad.shape != (self.hi - self.lo,):
            return f"worker {worker} pushed shape {grad.shape}, expected {(self.hi - self.lo,)}"
        if not (isinstance(share, float | int) and math.isfinite(share) and 0 <= share <= 1):
            return f"worker {worker} pushed batch share {share!r}, expected a number in [0, 1]"
        if not (isinstance(clock, int) and isinstance(seen, int) and clock > 0 and seen >= 0):
            return f"worker {worker} pushed clock {clock!r} / version {seen!r}: not counts"
        if lr is not None and not (isinstance(lr, float | int) and math.isfinite(lr) and lr > 0):
            return f"worker {worker} pushed learning rate {lr!r}, expected a positive number"
        return None

    def _sender_problem(self, token: Any, worker: Any) -> str | None:
        if not self._from_job(token):
            return "the push does not carry this job's token"
        if not isinstance(worker, int) or not 0 <= worker < self.num_workers:
            return f"worker index {worker!r} is not in [0, {self.num_workers})"
        return None

    def _from_job(self, token: Any) -> bool:
        return isinstance(token, str) and hmac.compare_digest(token, self._token)

    def _check_caller(self, token: Any, what: str) -> None:
        """Refuses ``what`` (a call other than a push) without this job's token."""
        if not self._from_job(token):
            self.refused += 1
            raise CallRefused(f"{self._where()}: {what} refused: not this job's token")

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
            raise RoundFailed(
                f"{self._where()}: push of worker {worker} at clock {clock} failed: {self._aborted}"
            )
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
        if skipped:
            self.steps_skipped[worker] += 1
            self.clocks[worker] = max(self.clocks[worker], clock)
        else:
            self._apply(grad, float(share))
            self.pushes_applied[worker] += 1
            self._record(worker, clock, seen_version)
            self._maybe_snapshot()
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
            raise RoundFailed(
                f"{self._where()}: ssp wait of worker {worker} at clock {clock} failed: "
                f"{reason}; missing worker(s) {behind} (clocks {self.clocks})"
            )

    def _fail_round(self, round_: _Round, reason: str) -> None:
        """Ends ``round_`` with an error for every worker waiting in it (once)."""
        if round_.error is not None or round_.done.is_set():
            return
        missing = sorted(set(range(self.num_workers)) - set(round_.pending))
        clocks = sorted({entry[2] for entry in round_.pending.values()})
        round_.error = (
            f"{self._where()}: sync round of clock {clocks} failed: {reason}; "
            f"missing worker(s) {missing}"
        )
        self.rounds_failed += 1
        if round_ is self._round:
            self._round = _Round()  # later pushes start a new round
        round_.done.set()

    async def abort(self, token: str, reason: str) -> int:
        """Fails the waiting sync round and every ssp wait with ``reason`` (the group that
        pushes here is gone; every later push fails at once too); returns how many workers
        were waiting in the sync round."""
        self._check_caller(token, "abort")
        waiting = len(self._round.pending)
        if waiting:
            self._fail_round(self._round, f"aborted: {reason}")
        self._aborted = f"aborted: {reason}"
        async with self._clock_changed:
            self._clock_changed.notify_all()
        return waiting

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
            self._step()
            for w in sorted(pending):
                self.pushes_applied[w] += 1
                self._record(w, pending[w][2], pending[w][3])
            self._maybe_snapshot()
            round_done.result = self._round_result(pending)
            self._round = _Round()
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
            raise RoundFailed(round_done.error)
        version, put_ref = round_done.result
        if linked and self._board is not None:
            return version, self._board.ref  # the board holds this round's result until the next
        return version, put_ref

    def _round_result(self, pending: dict[int, tuple]) -> tuple[int, Any]:
        """A completed round's ``(version, put-once reference or None)``: one copy into the
        object store for all the round's array-pushing workers (not one per reply), and the
        board written for the linked ones."""
        self._publish()
        unlinked = any(not entry[4] for entry in pending.values())
        return self.version, _ray().put(self._reply()) if unlinked else None

    def _settle_lost_round(self, round_: _Round) -> None:
        """Ends ``round_``, whose waiting workers' step a lost incarnation of this shard had
        completed, with what the shard holds now (nothing applied: that step's update was
        lost with the incarnation, like every update since the snapshot)."""
        for w, entry in round_.pending.items():
            self.clocks[w] = max(self.clocks[w], entry[2])
        self.rounds_lost += 1
        round_.result = self._round_result(round_.pending)
        self._round = _Round()
        round_.done.set()

    def _sum_buffer(self) -> np.ndarray:
        if self._last_sum is None:
            self._last_sum = np.empty(self.hi - self.lo, dtype=np.float32)
        return self._last_sum

    def _scratch(self) -> np.ndarray:
        if self._scratch_buf is None:
            self._scratch_buf = np.empty(self.hi - self.lo, dtype=np.float32)
        return self._scratch_buf

    # --- updates ----------------------------------------------------------------------------
    def _apply(self, grad: np.ndarray, weight: float) -> None:
        """One update with ``weight * grad`` (async/ssp: optimiser on the shards)."""
        g = self.opt.flat_grads
        np.multiply(grad, np.float32(weight), out=g) if weight != 1.0 else np.copyto(g, grad)
        self._step()

    def _step(self) -> None:
        """The optimiser's step on ``flat_grads`` (a summing shard keeps the sum instead)."""
        if self.opt is not None:
            self._limit_kernel_threads()
            self.opt.step()
        self.version += 1
        if self.mode != "sync":  # a sync round publishes once it is complete
            self._publish()

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

    def _maybe_snapshot(self) -> None:
        if self.snapshot_path and self.snapshot_every and self.version % self.snapshot_every == 0:
            save_snapshot(self.snapshot_path, self._state())

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

    # --- state ------------------------------------------------------------------------------
    def state_dict(self, token: str) -> dict[str, Any]:
        """Arrays (params and optimiser state, numpy) and the counters; shapes ``(hi - lo,)``."""
        self._check_caller(token, "state_dict")
        return self._state()

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"params": self.params.copy()}
        if self.opt is not None:
            for k, v in self.opt.state_dict().items():
                state[f"opt/{k}"] = v
        state["meta"] = json.dumps(
            {"version": self.version, "clocks": self.clocks, "lo": self.lo, "hi": self.hi,
             "applied": self.pushes_applied, **self.membership_state()}
        )  # fmt: skip
        return state

    def load_state_dict(self, token: str, state: dict[str, Any]) -> None:
        """Restores what ``state_dict`` gave (the same range); checked before anything moves."""
        self._check_caller(token, "load_state_dict")
        self._load_state(state)

    def _load_state(self, state: dict[str, Any]) -> None:
        meta = json.loads(str(state["meta"]))
        if (meta["lo"], meta["hi"]) != (self.lo, self.hi):
            raise ValueError(
                f"shard {self.index}: state is for range [{meta['lo']}:{meta['hi']}), "
                f"this shard holds [{self.lo}:{self.hi})"
            )
        params = np.asarray(state["params"], dtype=np.float32)
        if params.shape != self.params.shape:
            raise ValueError(
                f"shard {self.index}: params shape {params.shape}, expected {self.params.shape}"
            )
        if self.opt is not None:
            self.opt.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("opt/")})
        self.params[...] = params
        self.version = int(meta["version"])
        self._publish()
        self.clocks = [int(c) for c in meta["clocks"]]
        self.pushes_applied = [int(c) for c in meta.get("applied", self.clocks)]
        self.load_membership(meta)
        if self.snapshot_path:  # a restart now must come back to this state, not the old one
            save_snapshot(self.snapshot_path, self._state())

    def _restore(self, state: dict[str, Any]) -> None:
        self._load_state(state)
        self.restored_from_snapshot = True

    def get_reply(self, token: str) -> tuple[int, np.ndarray]:
        """``(version, reply)`` as an array (a copy, as ``_answer``'s): for a worker that
        cannot map this shard's board."""
        self._check_caller(token, "get_reply")
        return self.version, self._reply().copy()

    def get_params(self, token: str) -> np.ndarray:
        """A copy of this shard's slice of the parameters, shape ``(hi - lo,)``."""
        self._check_caller(token, "get_params")
        return self.params.copy()

    def set_params(self, token: str, params: np.ndarray) -> None:
        """Overwrites the slice (the optimiser-on-workers mode publishes worker 0's) with
        ``params``, shape ``(hi - lo,)`` float32."""
        self._check_caller(token, "set_params")
        if not (
            isinstance(params, np.ndarray) and params.dtype == np.float32
            and params.shape == self.params.shape
        ):  # fmt: skip
            self.refused += 1
            raise CallRefused(
                f"{self._where()}: set_params refused: "
                f"{getattr(params, 'dtype', type(params).__name__)} of shape "
                f"{getattr(params, 'shape', None)}, expected float32 {self.params.shape}"
            )
        self.params[...] = params
        if self.opt is not None:
            self._publish()

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
            "placement_group": _ray().get_runtime_context().get_placement_group_id(),
            "node_id": _ray().get_runtime_context().get_node_id(),
        }

    def ping(self) -> int:
        return os.getpid()
