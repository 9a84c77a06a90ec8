"""The Ray engine's rank: ``RayRankEngine``, the ``distnet.parallel.engine.Engine`` of a Ray
worker (its device, its share of the global batch that follows measured throughput, the
stage's synchronising optimiser through the strategy factory, the parameter-server shards the
``ps``/``hybrid`` strategies ask for, mid-epoch resumption after a lost worker, fault
injection for the tests).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from distnet.parallel.engine import EngineBase
from distnet.parallel.ps import link
from distnet.parallel.ps.autostale import staleness_bound
from distnet.parallel.ps.ledger import check_ledgers
from distnet.parallel.ps.warden import compare_replicas
from distnet.parallel.rayengine.comm import RayCommunicator
from distnet.parallel.rayengine.mailbox import JoinFailed
from distnet.parallel.rayengine.resume import StepMark, apply_carry, capture, note_step, summary
from distnet.parallel.rayengine.samplelog import SampleLog
from distnet.parallel.rayengine.standin import JoinRecord, enter_stage
from distnet.parallel.shares import BatchSplit, ThroughputShares
from distnet.parallel.strategy import make_sync_optimizer
from distnet.parallel.sync import PassThrough

__all__ = ["RayRankEngine", "summary"]


class RayRankEngine(EngineBase):
    """The engine interface (``distnet.parallel.engine.Engine``) of one Ray worker.

    ``spec`` keys: ``device`` ("cpu"/"cuda"), ``rank_weights`` (list or None), ``strategy``
    ("allreduce"/"ps"/"hybrid"), ``ps`` (options for the parameter server; ``hybrid`` also
    reads ``workers_per_node``), ``rebalance_every``,
    ``delay_per_sample_s``, ``fail_at_step`` (fault injection: this process exits at that
    step), ``faults`` (this rank's faults of this generation, see ``RayOptions.faults``),
    ``sample_log`` (a directory, or None), ``carry_box`` (the actor's dict that keeps a carry
    from one run of the job to the next, see ``resume``), ``resume`` (whether the driver chose
    this group's rank 0 carry to resume from).
    """

    def __init__(self, spec: dict[str, Any], comm: RayCommunicator, generation: int) -> None:
        self.spec, self.comm = spec, comm
        self.device = spec.get("device")
        self.rank_weights = spec.get("rank_weights")
        self.split = BatchSplit(self.rank_weights)  # every stage's loader takes it from here
        self.stage: str | None = None  # the running stage's name (for a failure's message)
        self.shares: list[dict[str, Any]] = []
        self.ps_stats: list[Any] = []  # one per stage (strategy "ps", rank 0)
        self.nodes: list[list[int]] | None = None  # strategy "hybrid": ranks per node
        self._groups: Any = None
        self.steps = 0
        self.servers: list[Any] = []  # parameter servers of this run's stages
        self.sample_log = (
            SampleLog(spec["sample_log"], comm.rank, generation) if spec.get("sample_log") else None
        )
        self._stage = 0
        # mid-epoch resume (see distnet.parallel.rayengine.resume)
        box = spec.get("carry_box")
        carry = box.pop("carry", None) if box is not None else None
        # rank 0 resumes from it; each survivor keeps its own till a step past it (rank 0 may die)
        self.carry = carry if spec.get("resume") else None
        self._box = box
        self._current: tuple[Any, Any] | None = None  # the stage's optimiser wrapper, loader
        self._stage_index: int | None = None
        self._mark: StepMark | None = None
        self._mark_ok = True
        self._stage_steps = 0
        self._stage_start = (0, 0)
        self.resumed: list[dict[str, Any]] = []  # stages resumed mid-epoch (for the report)
        # async/ssp ps: a replacement may join this group (standin.py); ``join``: this rank
        # is such a replacement
        self.join = spec.get("join")
        self.stands_in = bool(self.join)
        self.joins = JoinRecord(spec.get("join_box"), comm, spec)
        if self.join:
            comm.replay(self.join["log"], self.join["seq"])
        # parameter-server pushes: the flat gradient buffers live in memfd files that the
        # shards on this node map, so a push copies nothing (distnet/parallel/ps/link.py)
        if spec.get("strategy") in ("ps", "hybrid") and link.enabled():
            self.flat_zeros = link.FLAT.zeros

    def flat_owns(self, buf: Any) -> bool:
        return link.FLAT.ref_of(buf) is not None

    def start(self, job: dict[str, Any], log: Any) -> None:
        """The job's ``[dist]`` with this group's strategy and parameter-server options (the
        driver's ``RayOptions``: the command line may have changed them)."""
        ps = dict(self.spec.get("ps") or {})
        self.dist = {**job["dist"], "strategy": self.spec.get("strategy", "allreduce"),
                     **{k: ps[k] for k in ("mode", "staleness", "shards") if k in ps}}  # fmt: skip
        self._start_logging(log)
        self._faults_at("start")  # before the job's first collective

    def place(self, model: Any, device: str) -> str:
        """This worker's device (the driver's spec, else the job's), the model placed there."""
        return super().place(model, self.device or device)

    def share(self, loader: Any) -> Any:
        """This worker's batch split (following throughput) handed to ``loader``."""
        return self.split.hand_to(loader)

    def in_stage(self, name: str, fn: Any) -> Any:
        """``fn`` (a stage's function) noting that stage ``name`` runs, so that an error in it
        names the stage (``errors.RankFailed``)."""

        def run(*args: Any) -> Any:
            self.stage = name
            return fn(*args)

        return run

    def wrap(self, opt: Any, loader: Any) -> Any:
        """Each stage's optimiser: the strategy's (``strategy.make_sync_optimizer``), with
        throughput-following batch shares. ``loader``: the one the stage iterates (inputs or
        cached codes), given this worker's batch split here."""
        self.share(loader)
        self._stage += 1
        self._stage_steps, self._mark, self._mark_ok, self._stage_index = 0, None, True, None
        self._stage_start = (int(loader.epoch), int(loader.samples_seen))
        if self.sample_log is not None:
            self.sample_log.stage = str(self._stage)
            self.sample_log.wrap_loader(loader)
        inner = make_sync_optimizer(opt, self)
        wrapped = ThroughputShares(
            inner,
            loader,
            self.comm,
            rebalance_every=int(self.spec.get("rebalance_every", 200)),
            delay_per_sample_s=float(self.spec.get("delay_per_sample_s", 0.0)),
            history=self.shares,
            on_step=lambda step: self._on_step(loader),
            split=self.split,
        )
        self._current = (wrapped, loader)
        return wrapped

    def resume_stage(self, ctx: Any, optimizer: Any, start: int) -> int:
        """Collective, called by ``StageContext.restore`` after it loaded the stage's epoch
        checkpoint (``start``: its epoch): resumes mid-epoch from rank 0's carry when the
        driver chose one for this stage; returns the epoch to start at."""
        self._stage_index = ctx.index
        if self._current is None or self._current[0] is not optimizer:
            if self.join:
                raise JoinFailed(f"stage {ctx.index} does not train with the noted loader")
            return start
        loader = self._current[1]
        epoch = apply_carry(self.comm, self.carry, ctx.index, start, optimizer, loader)
        if self.join:  # a replacement: the lost rank's place in its epoch (standin.py)
            epoch, self.join = enter_stage(self.join, ctx, optimizer, loader), None
            return epoch
        if epoch is None:
            return start
        self._faults_at("resumed")  # the carry applied, no step finished since
        self.resumed.append(
            {"stage": ctx.index, "epoch": epoch, "samples_seen": int(loader.samples_seen)}
        )
        return epoch

    def after_failure(self) -> None:
        """A peer died (``WorkerLostError``): keeps this worker's carry in its actor for the
        next run of the job, and ends the stage's parameter server (rank 0)."""
        if self._current is None:  # lost before the first stage began: keep the old carry
            if self._box is not None and self.carry is not None:
                self._box["carry"] = self.carry
            return
        opt, loader = self._current
        carry = None
        try:
            if self.sample_log is not None:
                self.sample_log.note_incomplete(int(loader.epoch))
            carry = capture(self._stage_index, self._mark, opt, loader)
        except Exception:  # noqa: BLE001  (no carry: the job resumes from its checkpoint)
            carry = None
        finally:
            opt.release()
        if self._box is not None:  # a fresh one, else the one this run had not used yet
            self._box["carry"] = carry if carry is not None else self.carry

    def _on_step(self, loader: Any) -> None:
        self.carry = None  # a step past it: a death from now on leaves a fresher state
        self.steps += 1
        self._stage_steps += 1
        if self._mark_ok:  # once the noted loader stood still, it is not the stage's
            self._mark = note_step(self._mark, loader, self._stage_steps, self._stage_start)
            self._mark_ok = self._mark is not None
        if self.joins.enabled and self._current is not None:
            self.joins.step_done(self._stage_index, self._current[0], loader, self._mark_ok)
        if self.sample_log is not None:
            self.sample_log.step_done(loader.epoch, self.steps)
        if self.spec.get("fail_at_step") == self.steps:
            os._exit(17)  # a worker dying hard, as a lost node does (fault-injection tests)
        self._faults_at(self.steps)

    def _faults_at(self, step: int | str) -> None:
        """Injects ``spec["faults"]`` (tests) noted for ``step``: a number, "start", "resumed"."""
        for fault in self.spec.get("faults") or []:
            if fault["step"] == step:
                self._inject(fault)

    def _inject(self, fault: dict[str, Any]) -> None:
        """A fault of ``spec["faults"]`` (tests): this worker exits, raises, or kills a shard."""
        if fault["action"] == "exit":
            os._exit(17)
        if fault["action"] == "raise":  # a bug in the stage's code, as the user would meet it
            raise RuntimeError(f"injected fault at step {self.steps}")
        if fault["action"] == "sleep":  # stuck outside the collectives (stall check tests)
            sleep_instead_of_training(float(fault["seconds"]))
            return
        import signal  # noqa: PLC0415
        import threading  # noqa: PLC0415

        if fault["action"] == "sigkill":  # this worker's process killed, as `kill -9` does
            os.kill(os.getpid(), signal.SIGKILL)
        server = self.servers[-1]
        if fault.get("replica") == "backup":  # replicas = 2: the shard's backup, not its primary
            import ray  # noqa: PLC0415

            backup = server.replica_sets()[fault["shard"]]["backup"]
            pid = ray.get(backup.ping.remote(), timeout=30)
        else:
            pid = server.call_with_retry(fault["shard"], lambda s: s.ping.remote())
        timer = threading.Timer(fault.get("delay_s", 0.0), os.kill, (pid, signal.SIGKILL))
        timer.daemon = True
        timer.start()

    def parameter_server(self, opt: Any, hybrid: bool = False) -> Any:
        """A ``ParameterServerOptimizer`` over a parameter server made for this stage's
        parameters at rank 0's request (its picklable handle is broadcast). The job's
        ``ShardKeeper`` (``spec["shard_keeper"]``, started by the driver) creates and owns the
        shards, so they outlive any worker, rank 0 included; a stand-in for rank 0 joins the
        running server instead. ``close()`` shuts it down. ``hybrid``: a ``HybridOptimizer``
        instead, the server taking one push per node."""
        from distnet.parallel.ps import (  # noqa: PLC0415
            HybridOptimizer,
            ParameterServerOptimizer,
        )
        from distnet.parallel.ps.optimizers import optimizer_settings  # noqa: PLC0415

        ps_opts = dict(self.spec.get("ps") or {})
        pushers = self.comm.size
        if hybrid:
            if self._groups is None:  # once per job: its sequence numbers run on across stages
                from distnet.parallel.rayengine.groups import node_groups  # noqa: PLC0415

                self._groups = node_groups(self.comm, int(ps_opts.get("workers_per_node", 0)))
                self.nodes = self._groups.nodes
            pushers = self._groups.num_nodes
        server = None
        if self.comm.rank == 0 and not self.join:  # a stand-in for rank 0 joins its server
            settings = {
                "shards": int(ps_opts.get("shards", 1)),
                "mode": ps_opts.get("mode", "sync"),
                "staleness": staleness_bound(ps_opts.get("staleness", 0)),
                "num_workers": pushers,
                "optimizer": optimizer_settings(opt),
                "snapshot_every": int(ps_opts.get("snapshot_every", 0)),
                "retries": int(ps_opts.get("retries", 5)),
                "param_shapes": [tuple(p.data.shape) for p in opt.params],
                "shard_placement": ps_opts.get("shard_placement", "driver"),
                "replicas": ps_opts.get("replicas", "auto"),  # the keeper resolves "auto"
            }
            # the others wait in the broadcast below: not a stall
            with self.comm.working("starting the parameter server"):
                server = self._create_server(opt.flat_params, settings)
            self.note(f"parameter server: {settings['shards']} shard(s) x {server.replicas} "
                      f"replica(s) ([dist] replicas = {settings['replicas']!r})")  # fmt: skip
        server = self.comm.broadcast_object(server, root=0)
        # a sync round whose worker died never completes: leave it, and end it on the shards,
        # when the driver aborts (the shards stay up until rank 0's after_failure took its
        # carry from them, then release() or close() stops them)
        server.attach(self.comm.mailbox)
        self.servers.append(server)
        self.joins.stage_started(server)
        if hybrid:
            g = self._groups
            wrapped = HybridOptimizer(opt, g.node, server, g.node_index, num_workers=self.comm.size)
        else:
            wrapped = ParameterServerOptimizer(opt, server, self.comm.rank)
            if self.join:  # a replacement takes the lost rank's index (a new incarnation)
                wrapped.join(self.join["clock"])
        return _ClosingServer(wrapped, self.comm, self.ps_stats, self.joins)

    def _create_server(self, flat: Any, settings: dict[str, Any]) -> Any:
        """A new ``ParameterServer`` over ``flat`` (shape ``(n,)``): made by the job's keeper
        (bounded wait), or here, owned by this actor, when the driver gave none."""
        import numpy as np  # noqa: PLC0415
        import ray  # noqa: PLC0415

        from distnet import backend  # noqa: PLC0415
        from distnet.parallel.ps import ParameterServer  # noqa: PLC0415

        flat = np.array(backend.to_device(flat, "cpu"), dtype=np.float32, copy=True)
        keeper = self.spec.get("shard_keeper")
        if keeper is None:
            settings.pop("shard_placement", None)
            return ParameterServer.create(flat, **settings)
        wait_s = float(self.spec.get("collective_timeout_s") or 300.0)
        return ray.get(keeper.create.remote(flat, settings), timeout=wait_s)

    def close(self, failed: bool = False) -> None:
        """Rank 0 stops the shards of every server it started that a stage did not close (a
        failed run): they would live on, waiting, as long as this actor. ``failed``: this
        rank's own error ends the job; the shards' rounds fail instead, so that peers still
        pushing (async/ssp: they go on alone) fail as a consequence of that error, not of a
        lost shard (which would run the job again); the shards end with this actor."""
        if self.comm.rank == 0:
            for server in self.servers:
                if failed:
                    server.abort_rounds(f"rank {self.comm.rank} failed")
                else:
                    server.shutdown()
        self.servers = []


class _ClosingServer(PassThrough):
    """A ``ParameterServerOptimizer`` whose ``close()`` also ends the stage's server (after
    every worker is done with it)."""

    def __init__(self, inner: Any, comm: Any, stats: list[Any], joins: Any = None) -> None:
        # named `optimizer`: checkpoints look through wrappers by that attribute
        self.__dict__.update(optimizer=inner, comm=comm, stats=stats, joins=joins)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed stage: the checkpoint's parameters and optimiser state go into the
        shards too (rank 0 writes them; nobody pushes before), else the first pull would
        bring back the parameters the server was started with."""
        inner = self.optimizer
        inner.load_state_dict(state)
        if self.comm.rank == 0:
            inner.load_server(state)
        self.comm.barrier()
        inner.pull()

    @property
    def finite_comm(self) -> Any:
        """The workers whose non-finite decision must agree (see ``train.loop.finite``): in sync
        mode all of them (a round needs every push, and no shard applies a skipped step);
        in async/ssp each push stands alone, so a worker decides alone (``skip`` drops its
        step before the push, ``stop`` fails the job), except that a hybrid node's workers
        decide together (they reduce to their leader every step)."""
        inner = self.__dict__["optimizer"]
        return self.__dict__["comm"] if inner.ps.mode == "sync" else inner.async_group

    def resume_check(self, steps: int) -> bool:
        """Whether every shard applied exactly ``steps`` rounds (this worker's finished steps,
        less those every worker skipped): then the shards hold the state after the last
        finished step (sync mode only)."""
        ps = self.optimizer.ps
        if ps.mode != "sync":
            return False
        # No retries: a shard that died or is restarting from a snapshot holds no sure
        # state, and the epoch's checkpoint does.
        try:
            stats = ps.call_all_once("stats", timeout_s=min(ps.timeout_s, 10.0))
        except Exception:  # noqa: BLE001
            return False
        rounds = int(steps) - int(self.optimizer.rounds_skipped)
        return {int(s["version"]) for s in stats} == {rounds}

    def release(self) -> None:
        """After a peer died: rank 0 ends the stage's server (its round will never finish)."""
        if self.comm.rank == 0:
            self.optimizer.ps.shutdown()

    def close(self) -> None:
        """Collective (every worker done with the server), except on an exception (called
        from a ``finally``): a worker that failed alone (async/ssp decide alone) leaves at once
        with its error, its peers elsewhere in the stage; rank 0's ``close`` then stops the
        shards."""
        if self.__dict__["joins"] is not None:  # no replacement joins a stage that ended
            self.__dict__["joins"].stage_ended()
        self.optimizer.close()
        if sys.exc_info()[0] is not None:
            return
        # every worker done with the server, and what each was acknowledged (the ledger's
        # other side: ps/ledger.py)
        acks = self.comm.allgather(self.optimizer.acknowledged())
        if self.comm.rank == 0:  # per-worker clocks and staleness, for the run's report
            ps = self.optimizer.ps
            try:  # replicas first: it waits for a rebuild under way (stats then show it)
                check = None if ps.__dict__.get("warden") is None else compare_replicas(ps)
                stats = ps.stats()
                stats["ledger"] = check_ledgers(ps.ledgers(), dict(a for a in acks if a))
                if check is not None:  # every shard's replicas, byte for byte
                    stats["replica_check"] = check
                self.__dict__["stats"].append(stats)
            finally:
                ps.shutdown()

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.optimizer, name, value)


def sleep_instead_of_training(seconds: float) -> None:
    """A stuck worker (fault "sleep"): a stall report must show this frame."""
    time.sleep(seconds)
