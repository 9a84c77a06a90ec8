"""The killer of ``distnet bench chaos``: a thread beside a running ``RayJob`` that SIGKILLs a
process chosen at random (seeded) every N seconds and times how long training takes to move
again.

Targets, found through the actors' own reports: a worker other than rank 0 and rank 0 (the
driver's actors, ``WorkerActor.info`` gives the pid), a shard replica (the job's
``ShardKeeper`` holds the servers, a replicated server's warden the replicas as they stand
now, rebuilt ones included; every shard actor's ``ping`` gives its pid: primaries, backups,
unreplicated shards alike). Progress is read from the workers' sample logs (one
line per finished step, with its time): after a kill, ``first_step_s`` is the time until any
worker finished a step, ``recovery_s`` until every rank of the group had (the killed one's
replacement too), which is when the job trains at full strength again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

KINDS = ("worker", "shard", "rank0")


def keeper_server(keeper: Any) -> Any:
    """Runs in the keeper actor (``__ray_call__``): the handle of its newest server (the
    running stage's), or None."""
    return keeper.servers[-1] if keeper.servers else None


def shard_replicas(server: Any, timeout_s: float = 10.0) -> list[tuple[int, str, Any]]:
    """(shard index, role, handle) of every shard actor of ``server`` as it stands now: with
    replicas, the warden's replica sets (a promoted backup is the primary, a rebuilt replica
    the backup; the handle's own lists keep the replicas it was made with); else each shard
    ("single")."""
    import ray  # noqa: PLC0415

    if server.warden is None:
        return [(i, "single", handle) for i, handle in enumerate(server.shards)]
    sets = ray.get(server.warden.replica_sets.remote(server.token), timeout=timeout_s)
    return [(i, role, s[role]) for i, s in enumerate(sets) for role in ("primary", "backup")
            if s[role] is not None]  # fmt: skip


class ProgressWatch:
    """Reads the sample logs as they grow: per (generation, rank), the times of its steps."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._offsets: dict[Path, int] = {}
        self.times: dict[tuple[int, int], list[float]] = {}

    def poll(self) -> None:
        for f in sorted(self.log_dir.glob("rank*-gen*.jsonl")):
            rank, gen = f.stem.removeprefix("rank").split("-gen")
            with open(f) as fh:
                fh.seek(self._offsets.get(f, 0))
                text = fh.read()
            whole = text[: text.rfind("\n") + 1]  # a line being written waits for the next poll
            self._offsets[f] = self._offsets.get(f, 0) + len(whole)
            steps = [json.loads(line) for line in whole.splitlines() if line.strip()]
            self.times.setdefault((int(gen), int(rank)), []).extend(
                s["time"] for s in steps if "time" in s
            )

    def first_step(self) -> float | None:
        """When the first step of the job finished (wall clock), or None."""
        return min((t[0] for t in self.times.values() if t), default=None)

    def since(self, t0: float, ranks: int) -> tuple[float | None, float | None]:
        """(first step after ``t0``, the moment ``ranks`` ranks of the newest generation with
        steps after ``t0`` had one after ``t0``), wall clock, None where not yet."""
        after = {k: [t for t in v if t > t0] for k, v in self.times.items()}
        after = {k: v for k, v in after.items() if v}
        if not after:
            return None, None
        first = min(min(v) for v in after.values())
        gen = max(g for g, _ in after)
        firsts = [min(v) for (g, _), v in after.items() if g == gen]
        return first, max(firsts) if len(firsts) >= ranks else None


class ChaosMonkey(threading.Thread):
    """SIGKILLs a seeded random target of ``kinds`` every ``every_s`` seconds from the job's
    first step until ``duration_s`` after it (or the job's end); ``events``: one dict per
    kill (what, pid, when, recovery)."""

    def __init__(
        self,
        rj: Any,
        log_dir: Path,
        *,
        kinds: list[str],
        every_s: float,
        duration_s: float,
        seed: int,
        workers: int,
    ) -> None:
        super().__init__(daemon=True)
        self.rj, self.kinds, self.every_s, self.duration_s = rj, kinds, every_s, duration_s
        self.rng = random.Random(seed)
        self.watch = ProgressWatch(log_dir)
        self.workers = workers
        self.events: list[dict[str, Any]] = []
        self.over = threading.Event()  # the job ended
        self.t_first: float | None = None
        self.error: str | None = None
        self._choices: list[str] | None = None

    def _worker_pid(self, rank: int) -> int | None:
        import ray  # noqa: PLC0415

        actors = list(self.rj.actors)
        if rank >= len(actors):
            return None
        try:
            return int(ray.get(actors[rank].info.remote(), timeout=5)["pid"])
        except Exception:  # noqa: BLE001 (dead or being replaced: not a target now)
            return None

    def _shard_targets(self) -> list[tuple[str, int]]:
        import ray  # noqa: PLC0415

        keeper = self.rj.keeper
        if keeper is None:
            return []
        try:
            server = ray.get(keeper.__ray_call__.remote(keeper_server), timeout=10)
            shards = [] if server is None else shard_replicas(server)
        except Exception:  # noqa: BLE001 (the keeper busy or gone: no shard target now)
            return []
        live = []
        for index, role, handle in shards:
            try:
                live.append(
                    (f"shard {index} {role}", int(ray.get(handle.ping.remote(), timeout=3)))
                )
            except Exception:  # noqa: BLE001 (dead already)
                continue
        return live

    def _choose(self, kind: str) -> tuple[str, int] | None:
        if kind == "rank0":
            pid = self._worker_pid(0)
            return None if pid is None else ("rank 0", pid)
        if kind == "worker":
            rank = self.rng.randrange(1, self.workers)
            pid = self._worker_pid(rank)
            return None if pid is None else (f"rank {rank}", pid)
        live = self._shard_targets()
        self._choices = [name for name, _ in live]
        return self.rng.choice(live) if live else None

    def _kill_one(self) -> None:
        kind = self.rng.choice(self.kinds)
        self._choices = None
        target = self._choose(kind)
        at = time.time()
        event: dict[str, Any] = {"kind": kind, "at_s": round(at - (self.t_first or at), 2)}
        if self._choices is not None:  # the live shard replicas it was chosen from
            event["among"] = self._choices
        if target is None:
            event.update(what=None, skipped=f"no live {kind} target now")
        else:
            event.update(what=target[0], pid=target[1])
            try:
                os.kill(target[1], signal.SIGKILL)
            except ProcessLookupError:
                event["skipped"] = "the process was gone already"
        event["_t"] = at
        unrecovered = [e for e in self.events if "_t" in e and e.get("recovery_s") is None]
        event["while_recovering_from"] = [e["what"] for e in unrecovered if not e.get("skipped")]
        self.events.append(event)
        how = event.get("skipped") or f"pid {event.get('pid')}"
        print(f"chaos: {event['at_s']:7.1f} s  kill {event.get('what') or '-'} ({how})", flush=True)

    def _note_recoveries(self) -> None:
        for e in self.events:
            if e.get("skipped") or e.get("recovery_s") is not None:
                continue
            first, full = self.watch.since(e["_t"], self.workers)
            if first is not None and e.get("first_step_s") is None:
                e["first_step_s"] = round(first - e["_t"], 3)
            if full is not None:
                e["recovery_s"] = round(full - e["_t"], 3)
                print(f"chaos: {e['what']} killed at {e['at_s']:.1f} s: training on after "
                      f"{e['recovery_s']:.2f} s", flush=True)  # fmt: skip

    def run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # noqa: BLE001 (the report says the killer failed, and why)
            self.error = f"{type(e).__name__}: {e}"
            raise

    def _loop(self) -> None:
        next_kill = None
        while not self.over.is_set():
            self.watch.poll()
            if self.t_first is None:
                self.t_first = self.watch.first_step()
                if self.t_first is not None:
                    next_kill = self.t_first + self.every_s
            now = time.time()
            if next_kill is not None and now >= next_kill:
                if now - self.t_first <= self.duration_s:
                    self._kill_one()
                next_kill += self.every_s
            self._note_recoveries()
            self.over.wait(0.1)
        self.watch.poll()
        self._note_recoveries()
        for e in self.events:
            e.pop("_t", None)
            if not e.get("skipped") and e.get("recovery_s") is None:
                e["recovery_s"] = None
                e["note"] = "the job ended before every rank stepped again"
