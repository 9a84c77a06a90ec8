"""``ParameterServer``: the picklable handle to S ``ParameterServerShard`` actors.

    ps = ParameterServer.create(model_flat_params, shards=2, mode="sync", num_workers=4,
                                optimizer={"name": "adam", "lr": 1e-3}, snapshot_every=50)
    # pass `ps` to worker actors; in each: ParameterServerOptimizer(opt, ps, worker_index)
    ps.stats(); ps.state_dict(); ps.pull(); ps.shutdown()

The flat buffer of n floats is split into S contiguous ranges whose sizes differ by at most one.
Every call to a shard goes through ``call_with_retry``: a bounded number of retries with a
timeout each, on a dead, restarting or silent actor; a refused push is never retried.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distnet.parallel.ps.calls import ShardCalls
from distnet.parallel.ps.shard import MODES, ParameterServerShard
from distnet.parallel.ps.shardplace import resolve_replicas
from distnet.parallel.ps.warden import stop_warden

OPTIMIZER_ON = ("server", "worker")
# Measured with `distnet bench ps --compare-optimizer` (docs/parameter-server.md): Adam on the
# shards beat summing shards with Adam on every worker at 4 workers on 2 cores.
DEFAULT_OPTIMIZER_ON = "server"


def shard_ranges(size: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous ``[lo, hi)`` ranges covering ``range(size)``, sizes within one."""
    if not 1 <= shards <= size:
        raise ValueError(f"parameter server: shards must be in [1, {size}], got {shards}")
    base, extra = divmod(size, shards)
    bounds = [0]
    for i in range(shards):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def penalty_mask_of(param_shapes: Sequence[Sequence[int]], decay_biases: bool) -> np.ndarray:
    """The optimiser's weight-decay mask for parameters of these shapes (flat order)."""
    parts = [
        np.full(int(np.prod(s)), 1.0 if (len(s) > 1 or decay_biases) else 0.0, np.float32)
        for s in param_shapes
    ]
    return np.concatenate(parts)


def _ray() -> Any:
    import ray

    return ray


class ParameterServer(ShardCalls):
    """Handle to the shards (picklable: actor handles, ranges, settings, the job's token)."""

    def __init__(
        self,
        shards: list[Any],
        ranges: list[tuple[int, int]],
        *,
        size: int,
        mode: str,
        staleness: int,
        num_workers: int,
        optimizer_on: str,
        token: str,
        snapshot_every: int,
        snapshot_dir: str | None,
        timeout_s: float,
        retries: int,
        owns_snapshot_dir: bool = False,
        backups: list[list[Any]] | None = None,
    ) -> None:
        self.shards, self.ranges, self.size = shards, ranges, size
        self.mode, self.staleness, self.num_workers = mode, staleness, num_workers
        self.optimizer_on, self.token = optimizer_on, token
        self.snapshot_every, self.snapshot_dir = snapshot_every, snapshot_dir
        self.timeout_s, self.retries = timeout_s, retries
        self._owns_snapshot_dir = owns_snapshot_dir
        self.aborted: str | None = None  # set by abort(): calls stop retrying
        # replicas = 2: shard i's backup, which takes over when it dies (replica.py, calls.py)
        self.backups = backups if backups is not None else [[] for _ in shards]
        self.failovers = 0
        self.warden: Any = None  # replicas = 2: says which replica is the primary (warden.py)
        self.replicas = 2 if any(self.backups) else 1  # per shard, as made ("auto" resolved)

    @classmethod
    def create(
        cls,
        flat_params: np.ndarray,
        *,
        shards: int = 2,
        mode: str = "sync",
        staleness: int = 0,
        num_workers: int,
        optimizer: dict[str, Any] | None = None,
        snapshot_every: int = 0,
        snapshot_dir: str | Path | None = None,
        placement: Any = None,
        optimizer_on: str = DEFAULT_OPTIMIZER_ON,
        param_shapes: Sequence[Sequence[int]] | None = None,
        num_cpus: float = 0,
        max_restarts: int = 3,
        timeout_s: float = 120.0,
        retries: int = 5,
        round_timeout_s: float | None = None,
        replicas: int | str = 1,
    ) -> ParameterServer:
        """Starts ``shards`` shard actors over ``flat_params`` (1-D float32, shape ``(n,)``).

        Args:
            mode: ``sync``, ``async`` (Downpour) or ``ssp``; ``staleness``: the ssp bound s.
            num_workers: how many workers push (indices ``0..num_workers-1``).
            optimizer: ``{"name": "sgd"|"adam"|"rmsprop"|"adagrad", "lr": ..., ...}`` (the
                keyword arguments of ``distnet.optim``'s class); used on the shards when
                ``optimizer_on="server"``; with ``"worker"`` (sync only) the shards only sum and
                each worker steps its own optimiser (BytePS).
            snapshot_every: updates between shard snapshots (0: none; a killed shard then
                restarts from the initial parameters). ``snapshot_dir``: where (default: a
                temporary directory removed by ``shutdown``; pass the run directory).
            placement: None, a placement group (shard i in bundle ``i % bundles``), or a list
                of per-shard ``.options()`` dicts.
            param_shapes: the model's parameter shapes, needed when the optimiser has
                ``weight_decay`` or ``l1`` (they apply to weights, not biases).
            num_cpus: CPUs each shard reserves (0: shards mostly wait, workers compute); also
                the threads of its update kernels (at least 1).
            max_restarts: Ray restarts of a killed shard (only with snapshots: without one a
                restarted shard would serve its initial parameters as if nothing was lost, so
                ``snapshot_every=0`` means no restart and a clear error instead).
                ``timeout_s``/``retries``: per call.
            round_timeout_s: the longest a shard's sync round or ssp wait waits for the other
                workers (None: ``timeout_s * (retries + 1)``, the patience of a worker's call).
            replicas: 1, or 2 (primary and backup, ``replica.py``): a push is acknowledged
                once both applied it, and the backup takes over when the primary dies (then
                no shard is restarted by Ray from its snapshot); "auto": 2 where the cluster
                has several live nodes, else 1 (``shardplace.resolve_replicas``).
        """
        ray = _ray()
        from distnet import backend

        # a GPU model's buffer is copied to host memory: shards keep numpy arrays
        flat = np.ascontiguousarray(backend.to_device(flat_params, "cpu"), dtype=np.float32)
        flat = flat.reshape(-1)
        if mode not in MODES:
            raise ValueError(f"parameter server: mode must be one of {MODES}, got {mode!r}")
        if optimizer_on not in OPTIMIZER_ON:
            raise ValueError(
                f"parameter server: optimizer_on must be one of {OPTIMIZER_ON}, "
                f"got {optimizer_on!r}"
            )
        if optimizer_on == "worker" and mode != "sync":
            raise ValueError(
                f"parameter server: optimizer_on='worker' (summing shards) needs mode='sync'; "
                f"in {mode!r} mode every worker would step its own replica apart"
            )
        if num_workers < 1 or (staleness != "auto" and int(staleness) < 0):
            raise ValueError(f"parameter server: num_workers={num_workers}, staleness={staleness}")
        optimizer = dict(optimizer or {"name": "sgd", "lr": 0.01})
        mask = None
        if optimizer.get("weight_decay") or optimizer.get("l1"):
            if param_shapes is None:
                raise ValueError(
                    "parameter server: an optimizer with weight_decay/l1 needs param_shapes "
                    "(the penalty applies to weights only)"
                )
            mask = penalty_mask_of(param_shapes, bool(optimizer.get("decay_biases", False)))
            if mask.size != flat.size:
                raise ValueError(
                    f"parameter server: param_shapes hold {mask.size} values, "
                    f"flat_params {flat.size}"
                )
        ranges = shard_ranges(flat.size, shards)
        owns = False
        if snapshot_every and snapshot_dir is None:
            snapshot_dir, owns = tempfile.mkdtemp(prefix="distnet-ps-"), True
        if snapshot_dir is not None:
            Path(snapshot_dir).mkdir(parents=True, exist_ok=True)
        try:
            replicas = resolve_replicas(replicas)
        except ValueError as e:
            raise ValueError(f"parameter server: {e}") from None
        if not snapshot_every or replicas > 1:
            max_restarts = 0
        if round_timeout_s is None:
            round_timeout_s = timeout_s * (retries + 1)
        token = secrets.token_hex(16)
        params_ref = ray.put(flat)  # once; each shard slices its own range out of it
        actor = ray.remote(ParameterServerShard)
        handles: list[Any] = []
        backups: list[list[Any]] = []
        recipes: list[dict[str, Any]] = []  # how the warden makes another replica of each
        for i, (lo, hi) in enumerate(ranges):
            options: dict[str, Any] = {
                "max_restarts": max_restarts,
                "max_task_retries": 0,  # retries are ours: bounded, and never of a refusal
                "num_cpus": num_cpus,
            }
            options.update(_placement_options(placement, i))
            snap = None if snapshot_dir is None else str(Path(snapshot_dir) / f"shard-{i}.npz")
            common = {
                "mode": mode, "staleness": staleness, "num_workers": num_workers,
                "token": token, "optimizer": optimizer, "optimizer_on": optimizer_on,
                "snapshot_every": snapshot_every, "round_timeout_s": round_timeout_s,
                "penalty_mask": None if mask is None else mask[lo:hi],
                "threads": max(1, int(num_cpus)),
            }  # fmt: skip
            own = options.pop("backup", {})  # the backup's node (shardplace.py)
            backup = None
            if replicas > 1:  # no snapshots of its own: the primary's file is the shard's
                away = {**options, **own}
                backup = actor.options(**away).remote(
                    i, lo, hi, params_ref, snapshot_path=None, role="backup", **common
                )
                recipes.append({"args": (i, lo, hi, params_ref), "options": away,
                                "kwargs": {**common, "snapshot_path": None}})  # fmt: skip
            backups.append([] if backup is None else [backup])
            handles.append(
                actor.options(**options).remote(
                    i, lo, hi, params_ref, snapshot_path=snap, backup=backup,
                    role="single" if backup is None else "primary", **common,
                )
            )  # fmt: skip
        ps = cls(
            handles, ranges, size=flat.size, mode=mode, staleness=staleness,
            num_workers=num_workers, optimizer_on=optimizer_on, token=token,
            snapshot_every=snapshot_every,
            snapshot_dir=None if snapshot_dir is None else str(snapshot_dir),
            timeout_s=timeout_s, retries=retries, owns_snapshot_dir=owns, backups=backups,
        )  # fmt: skip
        # A restart re-runs the constructor with the same arguments: the initial parameters
        # must outlive create() (else Ray fails the restart with ReferenceCountingAssertionError)
        ps._init_params_ref = params_ref
        ps.call_all("ping")  # constructors ran (and failed loudly here if they failed)
        ray.get([b.ping.remote() for bs in backups for b in bs], timeout=timeout_s)
        if recipes:  # replicas = 2: the warden rebuilds a lost replica (warden.py)
            from distnet.parallel.ps.warden import start_warden  # noqa: PLC0415

            ps.warden = start_warden(
                token, handles, [bs[0] for bs in backups], recipes, round_timeout_s
            )
        return ps

    # --- driver-side API ------------------------------------------------------------------
    def pull(self) -> np.ndarray:
        """The whole parameter vector, shape ``(n,)`` float32 (a copy)."""
        return np.concatenate([np.asarray(p) for p in self.call_all("get_params", self.token)])

    def stats(self) -> dict[str, Any]:
        """Per shard: version, per-worker clocks, staleness histograms, ssp (clock, slowest
        clock) records; per worker: clock, updates, mean and max staleness over all shards;
        ``replicas_per_shard`` (1 or 2, as made) and, with 2, ``replicas`` (the warden's)."""
        shards = self.call_all("stats")
        workers = []
        for w in range(self.num_workers):
            hist: dict[int, int] = {}
            for s in shards:
                for k, c in s["staleness"][w].items():
                    hist[int(k)] = hist.get(int(k), 0) + c
            n = sum(hist.values())
            ahead = [c - slowest for s in shards for c, slowest in s["ahead"][w]]
            workers.append({
                "clock": min(s["clocks"][w] for s in shards),
                "updates": n // len(shards),
                "staleness_mean": sum(k * c for k, c in hist.items()) / n if n else 0.0,
                "staleness_max": max(hist, default=0),
                "max_ahead": max(ahead, default=0),
            })  # fmt: skip
        out = {"mode": self.mode, "staleness_bound": self.staleness, "shards": shards,
               "workers": workers, "replicas_per_shard": self.replicas}  # fmt: skip
        if self.warden is not None:  # replicas = 2: promotions and rebuilds (warden.py)
            out["replicas"] = _ray().get(self.warden.stats.remote(), timeout=self.timeout_s)
        return out

    def replica_sets(self, settle_s: float = 0.0) -> list[dict[str, Any]]:
        """replicas = 2: per shard ``primary``, ``backup`` (actor handles or None), ``ready``
        (the backup caught up), ``view``, ``lost`` (``warden.py``); after waiting up to
        ``settle_s`` for rebuilds under way to end."""
        ray = _ray()
        if settle_s > 0:
            ray.get(self.warden.settled.remote(self.token, settle_s), timeout=settle_s + 30)
        return ray.get(self.warden.replica_sets.remote(self.token), timeout=self.timeout_s)

    def state_dict(self) -> dict[str, Any]:
        """Shard-count-independent state: ``params`` and ``opt/<name>`` as whole flat arrays
        (shape ``(n,)``), the optimiser's scalars, and ``shard_meta`` (JSON per shard)."""
        parts = self.call_all("state_dict", self.token)
        state: dict[str, Any] = {}
        for key in parts[0]:
            if key == "ledger":  # per shard, not state to move: ``ledgers()``
                continue
            if key == "meta":
                state["shard_meta"] = [p["meta"] for p in parts]
            elif np.ndim(parts[0][key]) == 1:
                state[key] = np.concatenate([np.asarray(p[key]) for p in parts])
            else:
                state[key] = parts[0][key]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads what ``state_dict`` gave (any shard count) into every shard."""
        import json

        if np.asarray(state["params"]).shape != (self.size,):
            raise ValueError(
                f"parameter server: params shape {np.shape(state['params'])}, "
                f"expected {(self.size,)}"
            )
        metas = [json.loads(m) for m in state.get("shard_meta", [])]
        version = max((m["version"] for m in metas), default=0)
        clocks = [min((m["clocks"][w] for m in metas), default=0) for w in range(self.num_workers)]
        refs = []
        for i, (lo, hi) in enumerate(self.ranges):
            part = {
                k: (np.asarray(v)[lo:hi] if np.ndim(v) == 1 else v)
                for k, v in state.items()
                if k != "shard_meta"
            }
            part["meta"] = json.dumps({"version": version, "clocks": clocks, "lo": lo, "hi": hi})
            refs.append((part, self.shards[i].load_state_dict.remote(self.token, part)))
        for i, (part, ref) in enumerate(refs):
            self.call_with_retry(i, lambda s, p=part: s.load_state_dict.remote(self.token, p), ref)

    def ledgers(self) -> list[np.ndarray]:
        """Every shard's ledger, shape ``(n_i, 4)`` (``ledger.py``; ``check_ledgers``)."""
        return [np.asarray(r) for r in self.call_all("ledger_rows", self.token)]

    def abort(self, reason: str) -> None:
        """The group pushing here is gone: ``abort_rounds(reason)``, and this handle's calls
        stop retrying."""
        self.aborted = f"aborted: {reason}"
        self.abort_rounds(reason)

    def abort_rounds(self, reason: str) -> None:
        """Every waiting sync round and ssp wait on the shards, and every later push, fails
        at once with ``reason`` (``RoundFailed``) instead of waiting out the round timeout.
        This handle's other calls go on (rank 0 still reads the shards' state after a peer
        died). Does not wait for the shards (a dead one cannot answer)."""
        for s in self.shards:
            try:
                s.abort.remote(self.token, reason)
            except Exception:  # noqa: BLE001 (a shard already gone has nothing to abort)
                pass

    def attach(self, mailbox: Any) -> None:
        """Ties this worker's copy of the handle to its group's ``mailbox`` (``check()``,
        ``on_abort(callback)``), which the engine aborts when the group fails (a worker
        died, the driver stops the group): this worker's calls then stop waiting, and the
        shards fail their waiting rounds at once (``abort_rounds``); a dead worker never
        completes a sync round, and the next group gets a new server."""
        self.interrupt = mailbox.check
        mailbox.on_abort(self.abort_rounds)

    def shutdown(self) -> None:
        """Kills the shards (no restart) and removes a snapshot directory this handle made."""
        ray = _ray()
        if self.warden is not None:  # first: it would rebuild the replicas killed below
            sets = stop_warden(self.warden, self.token)
            self.shards += [r for s in sets for r in (s["primary"], s["backup"]) if r is not None]
        for s in [*self.shards, *(b for bs in self.backups for b in bs)]:
            try:
                ray.kill(s, no_restart=True)
            except Exception:  # noqa: BLE001 (already gone)
                pass
        if self._owns_snapshot_dir and self.snapshot_dir:
            shutil.rmtree(self.snapshot_dir, ignore_errors=True)


def _placement_options(placement: Any, index: int) -> dict[str, Any]:
    if placement is None:
        return {}
    if isinstance(placement, list | tuple):
        return dict(placement[index])
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = len(placement.bundle_specs)
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=placement, placement_group_bundle_index=index % bundles
        )
    }
