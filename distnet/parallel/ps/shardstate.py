"""A shard's state: ``state_dict`` and its loading, snapshots, and the parameter calls.

Mixed into ``ParameterServerShard``. The slice and optimiser state are snapshotted to a file
(``snapshot.py``) every ``snapshot_every`` updates; a restarted actor reloads it in its
constructor (``_restore``). Every call here that reads or writes the parameters or the
optimiser state checks the job's token first.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from distnet.parallel.ps.shardchecks import CallRefused
from distnet.parallel.ps.snapshot import save_snapshot


class ShardState:
    """State, snapshots and parameter reads/writes of a shard (needs ``index``, ``lo``,
    ``hi``, ``params``, ``opt``, ``version``, ``clocks``, ``pushes_applied``, ``refused``,
    ``snapshot_path``, ``snapshot_every`` and ``_check_caller``, ``_publish``, ``_reply``,
    ``_where``, ``membership_state``, ``load_membership``)."""

    index: int
    lo: int
    hi: int
    params: np.ndarray
    opt: Any
    version: int
    clocks: list[int]
    pushes_applied: list[int]
    refused: int
    restored_from_snapshot: bool
    snapshot_path: str | None
    snapshot_every: int
    ledger: Any
    replicated: bool
    _forward_nowait: Any
    _check_caller: Any
    _publish: Any
    _reply: Any
    _where: Any
    membership_state: Any
    load_membership: Any

    def _maybe_snapshot(self) -> None:
        if self.snapshot_path and self.snapshot_every and self.version % self.snapshot_every == 0:
            save_snapshot(self.snapshot_path, self._state())

    def state_dict(self, token: str) -> dict[str, Any]:
        """Arrays (params and optimiser state, numpy) and the counters; shapes ``(hi - lo,)``;
        ``ledger``: the pushes taken into this state, shape ``(n, 4)`` (``ledger.py``)."""
        self._check_caller(token, "state_dict")
        return self._state()

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"params": self.params.copy(), "ledger": self.ledger.rows()}
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
        if self.replicated:  # ordered before any later push's update (replica.py)
            self._forward_nowait({"kind": "state", "state": self._state()})

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
        # the pushes taken into the loaded state: a snapshot's (the later ones are lost with
        # their updates), none for a state from elsewhere (a checkpoint, a survivor's carry)
        self.ledger.load(state.get("ledger", np.zeros((0, 4), np.int64)))
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
        if self.replicated:
            self._forward_nowait({"kind": "params", "params": params})
