"""Primary-backup replication of a shard (``replicas = 2``; off by default).

Mixed into ``ParameterServerShard``. A replicated shard is two actors over the same range: the
primary, which the workers call, and its backup. Every change the primary makes to its state
(an update, a skipped step, a worker leaving or joining, a loaded state) goes to the backup as
an operation with a sequence number, and the primary answers the push only after the backup
applied it: an acknowledged push is held by every live replica. The backup applies the
operations in sequence order, each the same kernel on the same input as on the primary (the
gradient the optimiser stepped on, its learning rate), so both hold bit-identical parameters,
optimiser state, clocks and ledger. An update's gradient travels by the same-node road
(``link.py``) where it can: the primary writes it into a memfd segment of its own, the
operation carries the segment's ``LinkRef`` and the backup maps it, instead of 5.6 MB through
Ray's object store (a backup on another node gets the array); the operation leaves before the
primary's own step, so the two replicas step at once.

Primary-backup rather than chain replication: with two replicas the chain is the same two
hops, and the primary already orders every push (its event loop), so the backup needs no
ordering of its own, only the primary's sequence numbers.

When the primary dies, the workers' calls fail over to the backup (``calls.call_shards``):
it is then the shard, alone (a dead backup leaves its primary alone likewise). A push the
primary applied and forwarded but never answered comes again as a retry, which the backup
has applied already (its clock), so it is not applied twice; a sync round the primary was
gathering forms again on the backup from the workers' retries. Backups write no snapshots
(the primary's file is the shard's) and are not restarted by Ray (a restarted replica would
hold a stale state). A lost replica is rebuilt in the background (``warden.py``): the live one
becomes the primary and hands a new replica its state at a sequence number (``adopt_backup``,
``install``); the operations after that number follow as they happen, unawaited while the new
replica catches up, and once it has applied them every push waits for it again.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from distnet.parallel.ps import link


class Replication:
    """The primary's forwarding and the backup's applying (needs the shard's counters,
    ``opt``, ``params``, ``ledger``, ``round_timeout_s``, ``_token``, ``_check_caller``,
    ``_limit_kernel_threads``, ``_publish``, ``_load_state``, ``_state``)."""

    opt: Any
    params: np.ndarray
    ledger: Any
    version: int
    clocks: list[int]
    pushes_applied: list[int]
    steps_skipped: list[int]
    left: set[int]
    incarnations: list[int]
    round_timeout_s: float
    _token: str
    _check_caller: Any
    _limit_kernel_threads: Any
    _publish: Any
    _load_state: Any
    _last_sum: Any

    def _init_replication(self, backup: Any, role: str) -> None:
        self._backup = backup
        self.replica_role = role  # "single", "primary" or "backup"
        self._seq_out = 0  # operations sent to the backup
        self._seq_in = 0  # operations applied from the primary (a backup)
        self._seq_changed = asyncio.Condition()
        self.backup_lost: str | None = None
        self._step_grad: Any = None  # what the last step stepped on (array or link.Segment)
        # a rebuilt replica ("incoming") applies nothing before the live one's state arrived
        self._installed = role != "incoming"
        self._catching_up = False  # a new backup is loading: operations go to it unawaited
        self._last_unawaited: Any = None  # the last of those (awaited once it has loaded)
        self.backups_adopted = 0
        # the same-node road for the gradient a forward carries (see _keep_step_input)
        self._forward_by_link = link.enabled()
        self._forward_segments: list[link.Segment] = []  # free ones (one per forward in flight)
        self._forward_views = link.PeerViews()  # a backup's maps of its primary's segments
        self.forwards = {"link": 0, "value": 0}  # updates forwarded by ref, by array

    @property
    def replicated(self) -> bool:
        return self._backup is not None

    def _keep_step_input(self, stepped_on: np.ndarray) -> None:
        """Keeps what the step about to be made steps on (shape ``(hi - lo,)``) for the
        backup: in a memfd segment of this replica's when the backup may map it (the forward
        then carries its ``LinkRef``, a few bytes, and the backup reads the gradient from it as
        a shard reads a worker's outbox: no 5.6 MB through the object store), else a copy
        sent by value (a backup on another node, ``DISTNET_PS_SHM=0``, a catching-up one).
        A segment carries one forward at a time: it is reused only once the backup answered."""
        if self._forward_by_link and not self._catching_up:
            segment = self._forward_segments.pop() if self._forward_segments else None
            if segment is None:
                try:
                    segment = link.Segment(stepped_on.size, "distnet-ps-forward")
                except OSError:
                    self._forward_by_link = False
            if segment is not None:
                segment.publish(stepped_on, self.version + 1)
                self._step_grad = segment
                return
        self._step_grad = stepped_on.copy()

    def _op_update(self, rows: list[tuple[int, int, int, int]]) -> dict[str, Any]:
        """The operation of the update just made (``_step`` kept its input); a segment's
        under ``"segment"``, which ``_forward`` takes out before sending."""
        lr = None if self.opt is None else float(self.opt.lr)
        grad, self._step_grad = self._step_grad, None
        if isinstance(grad, link.Segment):
            return {"kind": "update", "grad": grad.ref, "segment": grad, "lr": lr, "rows": rows}
        return {"kind": "update", "grad": grad, "lr": lr, "rows": rows}

    def _op_members(self) -> dict[str, Any]:
        return {"kind": "members", "left": sorted(self.left),
                "incarnations": list(self.incarnations), "clocks": list(self.clocks)}  # fmt: skip

    async def _forward(self, op: dict[str, Any]) -> None:
        """Sends ``op`` to the backup and waits until it applied it (the caller answers its
        push only then): ``_send`` then ``_settle``."""
        await self._settle(self._send(op))

    def _send(self, op: dict[str, Any]) -> tuple | None:
        """Sends ``op`` to the backup, numbered here, before any wait: the order of the calls
        is the order of the changes. Returns what ``_settle`` waits on (None: nothing to wait
        for, no backup or a catching-up one)."""
        segment = op.pop("segment", None)
        if segment is not None and (self._backup is None or self._catching_up):
            op["grad"] = segment.data.copy()  # unawaited: the segment could not be reused
            self._forward_segments.append(segment)
            segment = None
        if self._backup is None:
            return None
        self._seq_out += 1
        seq, backup = self._seq_out, self._backup
        ref = backup.replicate.remote(self._token, seq, op)
        if self._catching_up:  # acknowledged by this replica alone until the new one caught up
            self._last_unawaited = ref
            self.forwards["value"] += op["kind"] == "update"
            return None
        return seq, backup, ref, op, segment

    async def _settle(self, sent: tuple | None) -> None:
        """Waits until the backup applied what ``_send`` sent. A backup that fails or does not
        answer within the round timeout is dropped: the shard goes on alone (``backup_lost``
        says why). A backup that cannot map the segment of a forward by link (another node)
        gets it again by value, under the same number, and every later one by value too."""
        if sent is None:
            return
        seq, backup, ref, op, segment = sent
        try:
            answer = await asyncio.wait_for(_awaited(ref), self.round_timeout_s)
            if answer == "unlinked":
                self._forward_by_link = False
                op["grad"] = segment.data.copy()
                ref = backup.replicate.remote(self._token, seq, op)
                await asyncio.wait_for(_awaited(ref), self.round_timeout_s)
            if op["kind"] == "update":
                self.forwards["link" if isinstance(op["grad"], link.LinkRef) else "value"] += 1
        except Exception as e:  # noqa: BLE001 (dead, refused or silent: on alone)
            self._drop_backup(backup, e)
        finally:
            if segment is not None:  # the backup read it, or is gone
                self._forward_segments.append(segment)

    def _drop_backup(self, backup: Any, err: BaseException) -> None:
        """Goes on without ``backup``, and kills it: a silent backup left alive could later
        be promoted with a state that misses what this replica acknowledged since (the
        warden sees it die and rebuilds another)."""
        if self._backup is backup:
            self._backup, self._catching_up = None, False
            self.backup_lost = f"{type(err).__name__}: {err}"
        try:
            import ray  # noqa: PLC0415

            ray.kill(backup, no_restart=True)
        except Exception:  # noqa: BLE001 (gone already)
            pass

    def _forward_nowait(self, op: dict[str, Any]) -> None:
        """``op`` to the backup without waiting (from a call that cannot wait: loading a
        state, setting the parameters). Its number orders it before every later operation,
        so a push acknowledged after it implies the backup applied it too."""
        if self._backup is None:
            return
        self._seq_out += 1
        self._backup.replicate.remote(self._token, self._seq_out, op)

    async def replicate(self, token: str, seq: int, op: dict[str, Any]) -> int | str:
        """Backup side: applies the primary's operation number ``seq`` after all the earlier
        ones (bounded wait for a missing one); returns ``seq``, or ``"unlinked"`` with
        nothing applied when its gradient is a ``LinkRef`` this process cannot map."""
        self._check_caller(token, "replicate")
        async with self._seq_changed:
            await asyncio.wait_for(
                self._seq_changed.wait_for(lambda: self._installed and self._seq_in >= seq - 1),
                self.round_timeout_s,
            )
            if seq > self._seq_in:  # not one applied already
                try:
                    self._apply_op(op)
                except link.LinkError:
                    return "unlinked"
                self._seq_in = seq
            self._seq_changed.notify_all()
        return seq

    def _apply_op(self, op: dict[str, Any]) -> None:
        kind = op["kind"]
        if kind == "update":  # the gradient is read first: a LinkError changes nothing
            if self.opt is not None:
                self._read_grad(op["grad"], self.opt.flat_grads)
                self.opt.lr = op["lr"]
                self._limit_kernel_threads()
                self.opt.step()
            else:  # a summing shard: its state is the last sum
                self._last_sum = self._read_grad(op["grad"], None)
            self.version += 1
            for w, inc, clock, applied in op["rows"]:
                self.ledger.note(w, inc, clock, applied)
                self.clocks[w] = max(self.clocks[w], clock)
                if applied:
                    self.pushes_applied[w] += 1
            self._publish()
        elif kind == "skip":
            w, inc, clock = op["worker"], op["incarnation"], op["clock"]
            self.ledger.note(w, inc, clock, 0)
            self.steps_skipped[w] += 1
            self.clocks[w] = max(self.clocks[w], clock)
        elif kind == "members":
            self.left = set(op["left"])
            self.incarnations = list(op["incarnations"])
            self.clocks = list(op["clocks"])
        elif kind == "state":
            self._load_state(op["state"])
        elif kind == "params":
            self.params[...] = op["params"]
            self._publish()
        else:
            raise ValueError(f"replicate: unknown operation {kind!r}")

    def _read_grad(self, grad: Any, out: np.ndarray | None) -> np.ndarray:
        """A forwarded gradient (array, or ``LinkRef`` to the primary's segment) copied into
        ``out`` (a new float32 array when None); raises ``LinkError`` when unmappable."""
        if isinstance(grad, link.LinkRef):
            view = self._forward_views.get(grad.fd, grad)
            if out is None:
                out = np.empty(grad.floats, np.float32)
            view.read(out)
            return out
        if out is None:
            return np.array(grad, np.float32, copy=True)
        np.copyto(out, grad)
        return out

    # --- rebuilding a lost replica (warden.py) -----------------------------------------------
    async def hold(self) -> None:
        """Never answers: the warden's standing call on every replica, which fails the moment
        this replica's process dies (Ray's notice of the death; no polling)."""
        await asyncio.Event().wait()

    def promote(self, token: str) -> str:
        """The warden made this replica its shard's primary (the primary died); returns the
        role."""
        self._check_caller(token, "promote")
        if self.replica_role == "backup":
            self.replica_role = "primary"
            self._forward_views = link.PeerViews()  # the dead primary's segments, unmapped
        return self.replica_role

    async def adopt_backup(self, token: str, backup: Any) -> int:
        """Makes ``backup`` (a new replica that holds nothing yet) this shard's backup while
        the pushes go on: it loads this replica's state as of operation number s
        (``install``); the operations after s go to it as they happen, unawaited while it
        loads; once it has applied them, every push waits for it again. Returns s. On a
        failure the backup is dropped (and killed) and this raises; the shard goes on alone."""
        self._check_caller(token, "adopt_backup")
        if self._backup is not None:  # dead, by the warden's word, though no push found out yet
            self._drop_backup(self._backup, RuntimeError("replaced: the warden saw it die"))
        self.replica_role = "primary"
        # the state and its number with no await between them: every later change is an
        # operation numbered after seq
        state, seq = self._transfer_state(), self._seq_out
        self._backup, self._catching_up, self._last_unawaited = backup, True, None
        self._forward_by_link = link.enabled()  # the new one may be on another node
        self.backup_lost = None
        try:
            loaded = backup.install.remote(self._token, seq, state)
            await asyncio.wait_for(_awaited(loaded), self.round_timeout_s)
            self._catching_up = False  # from here on every push waits for the backup
            last = self._last_unawaited
            if last is not None:  # applied in order: the last one implies the others
                await asyncio.wait_for(_awaited(last), self.round_timeout_s)
        except Exception as e:  # noqa: BLE001 (dead, refused or silent: on alone)
            self._drop_backup(backup, e)
            raise RuntimeError(f"{self._where()}: the new backup did not catch up: {e}") from e
        if self._backup is not backup:  # dropped by a push's wait meanwhile
            raise RuntimeError(f"{self._where()}: the new backup was lost: {self.backup_lost}")
        self.backups_adopted += 1
        return seq

    def _transfer_state(self) -> dict[str, Any]:
        """What a new replica loads: ``_state()`` (copies) and what only replicas share (a
        summing shard's last sum, the skipped steps)."""
        state = {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v
                 for k, v in self._state().items()}  # fmt: skip
        if self._last_sum is not None:
            state["replica/last_sum"] = self._last_sum.copy()
        state["replica/skipped"] = np.asarray(self.steps_skipped, np.int64)
        return state

    async def install(self, token: str, seq: int, state: dict[str, Any]) -> int:
        """A new replica's side of ``adopt_backup``: loads the live replica's ``state`` as of
        its operation ``seq``; the operations after it, waiting meanwhile, apply then."""
        self._check_caller(token, "install")
        async with self._seq_changed:
            self._load_state({k: v for k, v in state.items() if not k.startswith("replica/")})
            if "replica/last_sum" in state:
                self._last_sum = np.array(state["replica/last_sum"], np.float32, copy=True)
            self.steps_skipped = [int(c) for c in state["replica/skipped"]]
            self._seq_in, self._installed, self.replica_role = int(seq), True, "backup"
            self._seq_changed.notify_all()
        return int(seq)

    def replica_state(self, token: str) -> dict[str, Any]:
        """This replica's whole state for comparing replicas byte for byte: parameters,
        optimiser state, version, clocks, ledger (arrays, numpy)."""
        self._check_caller(token, "replica_state")
        state = self._state()
        state["version"] = np.int64(self.version)
        state["clocks"] = np.asarray(self.clocks, np.int64)
        return state

    _state: Any
    _where: Any


async def _awaited(ref: Any) -> Any:
    return await ref
