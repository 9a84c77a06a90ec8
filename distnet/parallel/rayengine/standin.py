"""A lost worker replaced while the others go on (strategy "ps", modes async and ssp).

Downpour SGD and the OSDI 2014 parameter server let workers leave and join a running server.
Here, when a worker (rank 0 too: the shards belong to the job, see ``ps/keeper.py``) dies
during a parameter-server stage in async or ssp mode:

1. the driver asks a survivor (rank 0, or rank 1 when rank 0 died: every rank keeps the
   record) where its stage stands (``JoinRecord.info``) and tells the shards
   that the worker left (``leave``): ssp's bound is then taken over the live workers, so the
   survivors are never held for the dead one, and its late pushes are ignored;
2. the dead worker's data position follows from the shards: it finished ``c`` steps of the
   stage, the lowest clock any shard holds for it, so it stands ``c - c0`` steps away from
   the survivor's last noted step (clock ``c0``) in the same epoch (every rank takes the same
   number of steps an epoch, and no rank passes an epoch's end while one is missing: the
   epoch ends with a collective);
3. a new actor in the dead worker's bundle becomes the same rank of the same group
   (generation unchanged). It runs the same job code: the collectives the group ran before
   training began are answered from the survivor's record (``RayCommunicator.replay``), then it
   joins the shards (``ParameterServerOptimizer.join``: a new incarnation, going on with the
   dead worker's clock ``c``, with the current parameters) and trains the dead worker's rest
   of the epoch, and every epoch after that, as that rank (the learning rate and callback
   states of the epochs finished since the group started come from rank 0's epoch
   checkpoint in the shared run directory). In ssp it is then the slowest
   worker, and the survivors wait for it to come within s clocks (the bound, now among live
   workers); it never waits for them;
4. the survivors are pointed at the new actor (``replace_peer``) and meet it at the epoch's
   closing collective. They never stopped: the server is the same, their ``run`` calls are the
   same, only the lost rank's actor is new.

What is guaranteed about the dead worker's share of the epoch: every batch of it is applied
to every shard exactly once, computed by the dead worker up to its step ``c`` and by the
replacement from step ``c + 1``. The batch it was pushing when it died may have reached some
shards only (several shards): those keep the dead worker's update of it and take the
replacement's push of that step as a retry (not applied again), the others apply the
replacement's, computed on newer parameters. A step the dead worker computed but did not
push, or pushed but did not log, is computed again only in the first case. The survivors'
updates are never lost or repeated. As in any async run, updates apply to whatever version
the shards hold: the run is not the one an undisturbed run would be, bit for bit.

A stand-in for rank 0 does not create the stage's server (it joins the running one) nor
start the run's records (``run.json``'s invocation, the stage's trained segment: the lost
rank 0 started them); from its join on it is the writer, as rank 0 was: epoch checkpoints,
the stage's results and checkpoint, the report.

When that is not possible (sync mode, the worker died before the stage's first
step, between stages or at an epoch's end, a stage that is not the first this group ran, a
loader the stage does not iterate), the engine restarts the group as before (``driver.py``).
"""

from __future__ import annotations

import time
from typing import Any


class JoinRecord:
    """Rank side: what a replacement needs to take this group's place of a lost rank.

    Kept in a dict of the worker actor (``box``) that its ``join_info`` reads while ``run``
    trains: ``log`` (the collectives before the group's first step, by seq), ``server``
    (the stage's parameter-server handle), ``position`` (after this rank's last step: the
    loader's state, the server clock, the collective count, steps since the last rebalance,
    the stage and epoch, steps done and left in the epoch).
    """

    def __init__(self, box: dict[str, Any] | None, comm: Any, spec: dict[str, Any]) -> None:
        ps = spec.get("ps") or {}
        self.enabled = (
            box is not None
            and spec.get("strategy") == "ps"
            and ps.get("mode") in ("async", "ssp")
            and bool(spec.get("survivors_go_on", True))
        )
        self.box, self.comm = (box if box is not None else {}), comm
        self.box.clear()
        self.stages = 0
        if self.enabled and spec.get("join"):  # a stand-in keeps the record it joined with
            self.box["log"] = spec["join"]["log"]
        if self.enabled:
            comm.keep_sent = True  # a replacement is sent again what its predecessor missed
            if not spec.get("join"):  # the driver asks a survivor, rank 0 or another
                comm.start_recording()

    def stage_started(self, server: Any) -> None:
        """A stage's parameter server is up. Only the group's first stage can be joined: a
        replacement replays the collectives from the group's start and would train any
        earlier stage again."""
        self.stages += 1
        self.box.pop("position", None)
        if self.enabled and self.stages == 1:
            self.box["server"] = server
        else:
            self.box.pop("server", None)

    def step_done(self, stage: int | None, wrapped: Any, loader: Any, mark_ok: bool) -> None:
        """After each finished step: the first one ends the record of collectives."""
        if not self.enabled:
            return
        if self.comm.recorded is not None:
            self.box["log"], self.comm.recorded = self.comm.recorded, None
        if not mark_ok or "server" not in self.box or stage is None:
            self.box.pop("position", None)  # the stage iterates another loader
            return
        state = loader.state_dict()
        self.box["position"] = {
            "stage": int(stage), "epoch": int(loader.epoch), "loader": state,
            "clock": int(wrapped.clock), "seq": int(self.comm._seq),
            "since": int(wrapped._since), "left": int(loader.steps_remaining()),
            "done": int(len(loader)) - int(loader.steps_remaining()),
        }  # fmt: skip

    def stage_ended(self) -> None:
        self.box.pop("position", None)
        self.box.pop("server", None)

    @staticmethod
    def info(box: dict[str, Any]) -> dict[str, Any] | None:
        """What the driver needs (``WorkerActor.join_info``), or None when not joinable now."""
        if not {"log", "server", "position"} <= set(box):
            return None
        return {k: box[k] for k in ("log", "server", "position")}


def enter_stage(join: dict[str, Any], ctx: Any, optimizer: Any, loader: Any) -> int:
    """Replacement side, from ``RayRankEngine.resume_stage``: the dead rank's place in the stage
    (loader position, steps since the last rebalance), then the shards' current parameters;
    returns the epoch to start at.

    The replayed collectives gave it the state the group started with; the epochs finished
    since are in rank 0's epoch checkpoint (the run directory every worker sees): its
    callbacks' states (the plateau schedule's counters) and learning rate are taken from
    there when it is the one of the epoch before the joined one."""
    from distnet.parallel.rayengine.mailbox import JoinFailed  # noqa: PLC0415

    if ctx.index != join["stage"]:
        raise JoinFailed(f"the replacement reached stage {ctx.index}, expected {join['stage']}")
    state = ctx.own_epoch_state(join["epoch"])  # no comm: this rank reads the files itself
    if state is not None:
        ctx.extra, lr = state
        if lr is not None:
            optimizer.lr = lr
    loader.load_state_dict(join["loader"])
    # the lost rank's step count (join() set it, but a checkpoint the group's stage resumed
    # from, loaded since by the replayed restore, holds another): fit numbers the steps on
    # from it, and they key this rank's dropout noise (RankNoise)
    optimizer.steps = int(join["clock"])
    optimizer._since = int(join["since"])
    optimizer.pull()
    return int(join["epoch"])


def replace_in_place(rj: Any, rank: int, job: dict[str, Any]) -> Any:
    """Driver side: a new actor for the lost ``rank`` of ``rj`` (a ``RayJob``) that joins the
    running group and server; returns its ``run`` reference, or None when this loss cannot be
    handled so (the caller restarts the group)."""
    import ray  # noqa: PLC0415

    opt = rj.opt
    if (
        opt.strategy != "ps"
        or (opt.ps or {}).get("mode") not in ("async", "ssp")
        or not opt.survivors_go_on
        or not opt.replace_lost
        or len(rj.failures) > opt.max_failures
    ):
        return None
    started = time.perf_counter()
    source = 1 if rank == 0 else 0  # a survivor: every rank keeps what a replacement needs
    if source >= len(rj.actors):
        return None
    try:
        info = ray.get(rj.actors[source].join_info.remote(), timeout=30)
    except ray.exceptions.RayError:
        return None
    if info is None:
        return None
    server, pos = info["server"], info["position"]
    try:
        left = server.call_all("leave", server.token, rank)
    except Exception:  # noqa: BLE001 (a shard gone: the restart path makes a new server)
        return None
    dead_clock = min(int(part["clock"]) for part in left)
    ahead = dead_clock - pos["clock"]  # the dead rank's steps past rank 0's last noted step
    if not -pos["done"] <= ahead < pos["left"]:  # not inside the same epoch: at its end
        return None
    loader = dict(pos["loader"])
    loader["samples_seen"] = int(loader["samples_seen"]) + ahead * sum(loader["batch_sizes"])
    ray.kill(rj.actors[rank], no_restart=True)
    fresh = rj._new_actor(rj.bundles[rank])
    peers = list(rj.actors)
    peers[rank] = fresh
    try:
        where = ray.get(fresh.info.remote(), timeout=opt.replace_timeout_s)
        ray.get(
            fresh.setup.remote(rj.generation, rank, len(peers), peers, opt.collective_timeout_s),
            timeout=opt.replace_timeout_s,
        )
        ray.get(
            [a.replace_peer.remote(rj.generation, rank, fresh, pos["seq"])
             for r, a in enumerate(rj.actors) if r != rank],
            timeout=30,
        )  # fmt: skip
    except ray.exceptions.RayError:
        ray.kill(fresh, no_restart=True)
        return None
    rj.actors[rank] = fresh
    rj.worker_info.append(where)
    spec = rj._rank_spec(rank)
    spec.update(fail_at_step=None, faults=[], join={
        "log": info["log"], "seq": pos["seq"], "loader": loader, "since": pos["since"] + ahead,
        "epoch": pos["epoch"], "stage": pos["stage"], "clock": dead_clock,
    })  # fmt: skip
    future = fresh.run.remote(rj.task, job, spec)
    rj.log(f"ray: lost worker {rank}; the others go on, a new worker takes its place at "
           f"step {dead_clock} of the stage (epoch {pos['epoch']})")  # fmt: skip
    rj.recoveries.append({
        "kind": "survivors went on", "lost": [rank], "workers": len(rj.actors),
        "mid_epoch": True, "at_s": round(started - rj._t0, 3),
        "replace_s": round(time.perf_counter() - started, 3),
        "resumed_at": {"stage": pos["stage"], "epoch": pos["epoch"],
                       "samples_seen": loader["samples_seen"], "steps": dead_clock},
        "clocks_at_loss": left[0]["clocks"],
    })  # fmt: skip
    return future


def outage_steps(recoveries: list[dict[str, Any]], report: dict[str, Any]) -> None:
    """Adds to each "survivors went on" recovery, from the shards' membership notes in
    ``report["ps_stats"]``: ``survivor_steps`` (each survivor's steps between the leave and
    the replacement's join, on shard 0), ``outage_s`` (seconds between them) and
    ``clocks_at_join`` (every worker's clock on shard 0 then)."""
    notes = [
        m
        for stats in report.get("ps_stats") or []
        for m in (stats["shards"][0].get("membership") or [])
    ]
    for rec in recoveries:
        if rec.get("kind") != "survivors went on":
            continue
        lost = rec["lost"][0]
        leave = next((m for m in notes if m["event"] == "leave" and m["worker"] == lost), None)
        join = next((m for m in notes if m["event"] == "join" and m["worker"] == lost), None)
        if leave is None or join is None:
            continue
        notes = [m for m in notes if m is not leave and m is not join]  # the next loss: later
        rec["survivor_steps"] = {
            str(w): join["clocks"][w] - leave["clocks"][w]
            for w in range(len(leave["clocks"]))
            if w != lost
        }
        rec["outage_s"] = round(join["time"] - leave["time"], 3)
        rec["clocks_at_join"] = join["clocks"]
