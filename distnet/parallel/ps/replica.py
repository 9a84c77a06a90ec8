"""Primary-backup replication of a shard (``replicas = 2``; off by default).

Mixed into ``ParameterServerShard``. A replicated shard is two actors over the same range: the
primary, which the workers call, and its backup. Every change the primary makes to its state
(an update, a skipped step, a worker leaving or joining, a loaded state) goes to the backup as
an operation with a sequence number, and the primary answers the push only after the backup
applied it: an acknowledged push is held by every live replica. The backup applies the
operations in sequence order, each the same kernel on the same input as on the primary (the
gradient the optimiser stepped on, its learning rate), so both hold bit-identical parameters,
optimiser state, clocks and ledger.

Primary-backup rather than chain replication: with two replicas the chain is the same two
hops, and the primary already orders every push (its event loop), so the backup needs no
ordering of its own, only the primary's sequence numbers.

When the primary dies, the workers' calls fail over to the backup (``calls.call_shards``):
it is then the shard, alone (a dead backup leaves its primary alone likewise). A push the
primary applied and forwarded but never answered comes again as a retry, which the backup
has applied already (its clock), so it is not applied twice; a sync round the primary was
gathering forms again on the backup from the workers' retries. Backups write no snapshots
(the primary's file is the shard's) and are not restarted by Ray (a restarted replica would
hold a stale state).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np


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
        self._step_grad: np.ndarray | None = None  # what the last step stepped on

    @property
    def replicated(self) -> bool:
        return self._backup is not None

    def _op_update(self, rows: list[tuple[int, int, int, int]]) -> dict[str, Any]:
        """The operation of the update just made (``_step`` kept its input)."""
        lr = None if self.opt is None else float(self.opt.lr)
        return {"kind": "update", "grad": self._step_grad, "lr": lr, "rows": rows}

    def _op_members(self) -> dict[str, Any]:
        return {"kind": "members", "left": sorted(self.left),
                "incarnations": list(self.incarnations), "clocks": list(self.clocks)}  # fmt: skip

    async def _forward(self, op: dict[str, Any]) -> None:
        """Sends ``op`` to the backup and waits until it applied it (the caller answers its
        push only then). Numbered here, before any wait: the order of the calls is the order
        of the changes. A backup that fails or does not answer within the round timeout is
        dropped: the shard goes on alone (``backup_lost`` says why)."""
        if self._backup is None:
            return
        self._seq_out += 1
        ref = self._backup.replicate.remote(self._token, self._seq_out, op)

        async def applied() -> Any:
            return await ref

        try:
            await asyncio.wait_for(applied(), self.round_timeout_s)
        except Exception as e:  # noqa: BLE001 (dead, refused or silent: on alone)
            self._backup, self.backup_lost = None, f"{type(e).__name__}: {e}"

    def _forward_nowait(self, op: dict[str, Any]) -> None:
        """``op`` to the backup without waiting (from a call that cannot wait: loading a
        state, setting the parameters). Its number orders it before every later operation,
        so a push acknowledged after it implies the backup applied it too."""
        if self._backup is None:
            return
        self._seq_out += 1
        self._backup.replicate.remote(self._token, self._seq_out, op)

    async def replicate(self, token: str, seq: int, op: dict[str, Any]) -> int:
        """Backup side: applies the primary's operation number ``seq`` after all the earlier
        ones (bounded wait for a missing one); returns ``seq``."""
        self._check_caller(token, "replicate")
        async with self._seq_changed:
            await asyncio.wait_for(
                self._seq_changed.wait_for(lambda: self._seq_in >= seq - 1), self.round_timeout_s
            )
            if seq > self._seq_in:  # not one applied already
                self._apply_op(op)
                self._seq_in = seq
            self._seq_changed.notify_all()
        return seq

    def _apply_op(self, op: dict[str, Any]) -> None:
        kind = op["kind"]
        if kind == "update":
            if self.opt is not None:
                np.copyto(self.opt.flat_grads, op["grad"])
                self.opt.lr = op["lr"]
                self._limit_kernel_threads()
                self.opt.step()
            else:  # a summing shard: its state is the last sum
                self._last_sum = np.array(op["grad"], np.float32, copy=True)
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

    def replica_state(self, token: str) -> dict[str, Any]:
        """This replica's whole state for comparing replicas byte for byte: parameters,
        optimiser state, version, clocks, ledger (arrays, numpy)."""
        self._check_caller(token, "replica_state")
        state = self._state()
        state["version"] = np.int64(self.version)
        state["clocks"] = np.asarray(self.clocks, np.int64)
        return state

    _state: Any
