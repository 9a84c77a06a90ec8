"""``ReplicaWarden``: keeps each replicated shard at a primary and a backup (``replicas = 2``).

    warden = start_warden(token, primaries, backups, recipes, timeout_s)   # ParameterServer.create
    primary, backups = ray.get(warden.route.remote(token, i, dead_actor_id))  # a worker's failover

One small actor per replicated server, made by whoever creates the server (the job's keeper,
so it belongs to the job), 0 CPUs. It holds every shard's replica set and keeps a standing
call (``hold``) on every replica, a call that never answers, so Ray tells it the moment a
replica's process dies (no polling). Then:

- a dead **primary** whose backup is caught up is replaced by it (the backup holds every push
  the primary acknowledged, ``replica.py``); workers whose call found the primary dead ask
  ``route`` and go on with the new one. The warden is the one place that says which replica
  is the primary, so two workers never pick different ones.
- a dead **backup** leaves the primary alone for a moment (it goes on without it, ``_forward``).
- either way a **new replica is rebuilt in the background** while training goes on: created
  here (so owned by the job, not by a replica whose death would take it along), away from the
  live replica's node where the cluster has another (``shardplace.py``), then handed to the live
  replica (``adopt_backup``), which transfers its state as of an operation number and sends the
  operations after it; once the new replica applied them it is the backup, and pushes are again
  acknowledged only once both replicas hold them.
- a shard whose primary dies while no backup is caught up is lost (two deaths of one shard
  within one rebuild): ``route`` answers None and the workers' calls fail as without replicas
  (``ShardLostError``; the Ray engine runs the job again from its checkpoint).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field
from typing import Any

REBUILD_TRIES = 3  # new replicas tried per loss before the shard runs alone


def _id(handle: Any) -> str:
    return handle._actor_id.hex()


async def _awaited(ref: Any) -> Any:
    return await ref


@dataclass
class ReplicaSet:
    """One shard's replicas as the warden knows them."""

    primary: Any
    backup: Any
    ready: bool = True  # the backup holds every push the primary acknowledged
    view: int = 0  # changes with every promotion and every new backup
    lost: str | None = None  # why the shard has no live replica left
    rebuilding: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)


class ReplicaWarden:
    """The replica sets of one server's shards (wrap with ``ray.remote``; ``start_warden``).

    Args:
        token: the job's secret (every call but ``stats`` checks it).
        primaries, backups: shard i's two replicas, as created.
        recipes: per shard ``{"args": (...), "kwargs": {...}, "options": {...}}``: how to make
            another replica of it (``ParameterServerShard``'s arguments and Ray options).
        timeout_s: the longest a new replica may take to start and catch up.
    """

    def __init__(
        self,
        token: str,
        primaries: list[Any],
        backups: list[Any],
        recipes: list[dict[str, Any]],
        timeout_s: float,
    ) -> None:
        self._token = token
        self.sets = [ReplicaSet(p, b) for p, b in zip(primaries, backups, strict=True)]
        self.recipes = recipes
        self.timeout_s = float(timeout_s)
        self._stopped = False
        self._tasks: set[asyncio.Task] = set()
        self.made: list[Any] = []  # replicas this warden created (it owns them)
        self.t0 = time.monotonic()

    def _check(self, token: str, what: str) -> None:
        if not isinstance(token, str) or not hmac.compare_digest(token, self._token):
            raise PermissionError(f"replica warden: {what} refused: not this job's token")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _note(self, index: int, event: str, **more: Any) -> None:
        self.sets[index].events.append(
            {"event": event, "t": round(time.monotonic() - self.t0, 3), **more}
        )

    async def start(self) -> int:
        """Begins watching every replica; returns how many."""
        for i, s in enumerate(self.sets):
            for handle in (s.primary, s.backup):
                self._spawn(self._watch(i, handle))
        return 2 * len(self.sets)

    async def _watch(self, index: int, handle: Any) -> None:
        try:
            await handle.hold.remote()
            why = "its watch call ended"
        except Exception as e:  # noqa: BLE001 (the replica's death: what this waits for)
            why = type(e).__name__
        if not self._stopped:
            self._lost(index, _id(handle), why)

    def _lost(self, index: int, dead: str, why: str) -> None:
        """Replica ``dead`` of shard ``index`` died: promote or drop, then rebuild. No await:
        one change of the set at a time."""
        s = self.sets[index]
        if s.primary is not None and _id(s.primary) == dead:
            if s.backup is not None and s.ready:
                s.primary, s.backup, s.ready = s.backup, None, False
                s.primary.promote.remote(self._token)
                self._note(index, "primary died; backup promoted", why=why)
            else:
                s.primary, s.lost = None, f"primary died ({why}) with no backup caught up"
                self._note(index, "shard lost", why=why)
                return
        elif s.backup is not None and _id(s.backup) == dead:
            s.backup, s.ready = None, False
            self._note(index, "backup died", why=why)
        else:
            return  # a replica replaced already
        s.view += 1
        if not s.rebuilding:
            s.rebuilding = True
            self._spawn(self._rebuild(index))

    async def _rebuild(self, index: int) -> None:
        """A new backup for shard ``index`` from its live primary (see the module)."""
        import ray  # noqa: PLC0415

        s = self.sets[index]
        try:
            for attempt in range(REBUILD_TRIES):
                live = s.primary
                if self._stopped or live is None or s.backup is not None:
                    return
                began = time.monotonic()
                recipe = self.recipes[index]
                options = dict(recipe["options"])
                options.update(await self._away_from(live, options))
                new = (
                    ray.remote(type_of_shard())
                    .options(**options)
                    .remote(*recipe["args"], **recipe["kwargs"], role="incoming")
                )
                self.made.append(new)
                try:
                    await asyncio.wait_for(_awaited(new.ping.remote()), self.timeout_s)
                    seq = await asyncio.wait_for(
                        _awaited(live.adopt_backup.remote(self._token, new)), self.timeout_s
                    )
                except Exception as e:  # noqa: BLE001 (noted; tried again)
                    self._note(index, "rebuild failed", attempt=attempt, why=f"{e}"[:300])
                    _kill(new)
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                if self._stopped or s.primary is not live:  # the live one died meanwhile
                    _kill(new)
                    return
                s.backup, s.ready = new, True
                s.view += 1
                self._note(index, "backup rebuilt", seconds=round(time.monotonic() - began, 3),
                           seq=int(seq))  # fmt: skip
                self._spawn(self._watch(index, new))
                return
        finally:
            s.rebuilding = False

    async def _away_from(self, live: Any, options: dict[str, Any]) -> dict[str, Any]:
        """Ray options placing a new replica on another node than ``live``'s where the cluster
        has one alive (``{}``, the recipe's placement, when there is none)."""
        from distnet.parallel.ps.shardplace import away_from_node  # noqa: PLC0415

        try:
            node = (await asyncio.wait_for(_awaited(live.stats.remote()), 10.0))["node_id"]
        except Exception:  # noqa: BLE001 (dead already: any node)
            return {}
        return away_from_node(node, options)

    def route(self, token: str, index: int, dead: str) -> tuple[Any, list[Any]] | None:
        """After a worker's call to shard ``index``'s replica ``dead`` (an actor id, hex)
        found it dead: ``(primary, [backup] or [])`` to go on with, or None when the shard
        has no live replica that holds every acknowledged push."""
        self._check(token, "route")
        s = self.sets[index]
        if s.primary is not None and _id(s.primary) == dead:
            self._lost(index, dead, "a worker's call found it dead")
        if s.primary is None:
            return None
        return s.primary, [s.backup] if s.backup is not None and s.ready else []

    def replica_sets(self, token: str) -> list[dict[str, Any]]:
        """Per shard: ``primary``, ``backup`` (handles or None), ``ready``, ``view``,
        ``lost``."""
        self._check(token, "replica_sets")
        return [
            {"primary": s.primary, "backup": s.backup, "ready": s.ready, "view": s.view,
             "lost": s.lost}
            for s in self.sets
        ]  # fmt: skip

    def stats(self) -> list[dict[str, Any]]:
        """Per shard: its events (``backup promoted``, ``backup rebuilt`` with its seconds,
        ...), counts of promotions and rebuilds, and whether a rebuild is under way."""
        out = []
        for s in self.sets:
            kinds = [e["event"] for e in s.events]
            out.append({
                "view": s.view, "ready": s.ready, "lost": s.lost, "rebuilding": s.rebuilding,
                "promotions": kinds.count("primary died; backup promoted"),
                "rebuilds": kinds.count("backup rebuilt"),
                "rebuild_s": [e["seconds"] for e in s.events if e["event"] == "backup rebuilt"],
                "events": list(s.events),
            })  # fmt: skip
        return out

    async def settled(self, token: str, timeout_s: float) -> bool:
        """Waits (bounded) until no rebuild is under way; returns whether every shard has a
        caught-up backup."""
        self._check(token, "settled")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(not s.rebuilding for s in self.sets):
                break
            await asyncio.sleep(0.05)
        return all(s.backup is not None and s.ready for s in self.sets)

    def stop(self, token: str) -> int:
        """Stops watching and rebuilding, kills the replicas it made; returns how many."""
        self._check(token, "stop")
        self._stopped = True
        for new in self.made:
            _kill(new)
        return len(self.made)


def type_of_shard() -> type:
    from distnet.parallel.ps.shard import ParameterServerShard  # noqa: PLC0415

    return ParameterServerShard


def _kill(handle: Any) -> None:
    import ray  # noqa: PLC0415

    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 (gone already)
        pass


def start_warden(
    token: str,
    primaries: list[Any],
    backups: list[Any],
    recipes: list[dict[str, Any]],
    timeout_s: float,
) -> Any:
    """The warden actor of a replicated server (owned by the caller, on its node), watching.

    On the caller's node by hard affinity: it shares its creator's fate and no other's. A soft
    affinity to a node with no CPUs (a head, where the job's driver or keeper runs) let Ray
    place it on a worker node about 1 time in 3 (that node's raylet takes new workers, the
    head's soft worker limit is its 0 CPUs), and removing that node then took the warden, and
    with it every shard's failover (CI: "the replica warden is gone")."""
    import ray  # noqa: PLC0415
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

    node = ray.get_runtime_context().get_node_id()
    warden = (
        ray.remote(ReplicaWarden)
        .options(
            num_cpus=0,
            max_restarts=0,  # a new warden would not own the replicas it made
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        )
        .remote(token, primaries, backups, recipes, timeout_s)
    )
    ray.get(warden.start.remote(), timeout=timeout_s)
    return warden


def stop_warden(warden: Any, token: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Stops ``warden`` (bounded) and kills it; returns the replica sets it held last (every
    replica it knew, to be killed by the caller), or [] when it did not answer."""
    import ray  # noqa: PLC0415

    sets: list[dict[str, Any]] = []
    try:
        sets = ray.get(warden.replica_sets.remote(token), timeout=timeout_s)
        ray.get(warden.stop.remote(token), timeout=timeout_s)
    except Exception:  # noqa: BLE001 (gone or stuck: killing it ends the replicas it made)
        pass
    _kill(warden)
    return sets


def compare_replicas(ps: Any, settle_s: float = 30.0) -> dict[str, Any]:
    """Every shard's replicas compared byte for byte (``replica_state``: parameters,
    optimiser state, version, clocks, ledger), after rebuilds under way settled (bounded by
    ``settle_s``). Returns ``{"ok", "shards": [{"replicas", "differ", "rebuilds"}...]}``:
    ``replicas`` compared (2, or 1 where no backup caught up), ``differ`` the keys that do
    not match. Call when no push is in flight (a stage's end)."""
    import numpy as np  # noqa: PLC0415
    import ray  # noqa: PLC0415

    sets = ps.replica_sets(settle_s=settle_s)
    history = ray.get(ps.warden.stats.remote(), timeout=ps.timeout_s)
    out = []
    for s, h in zip(sets, history, strict=True):
        live = [r for r in (s["primary"], s["backup"] if s["ready"] else None) if r is not None]
        states = ray.get([r.replica_state.remote(ps.token) for r in live], timeout=ps.timeout_s)
        differ = sorted(
            key
            for key in states[0]
            for other in states[1:]
            if key not in other
            or np.asarray(states[0][key]).dtype != np.asarray(other[key]).dtype
            or np.asarray(states[0][key]).tobytes() != np.asarray(other[key]).tobytes()
        ) if states else ["no live replica"]  # fmt: skip
        out.append({"replicas": len(live), "differ": differ, "rebuilds": h["rebuilds"],
                    "promotions": h["promotions"], "rebuild_s": h["rebuild_s"]})  # fmt: skip
    ok = all(not s["differ"] and s["replicas"] == 2 for s in out)
    return {"ok": ok, "shards": out}
