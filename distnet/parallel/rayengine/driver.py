"""The Ray engine's driver: starts (or joins) Ray, places the workers, runs the job, replaces
workers that die, and stops every actor when the job ends or is interrupted.

    distnet train JOB.toml --engine ray --workers 2 [--address ADDR] [--gpus-per-worker 1]
                           [--cpu-workers 2] [--min-workers 1]

- Without ``--address`` a local Ray starts on demand with token authentication on (Ray
  2.60's default for local clusters; distnet refuses to run one with ``RAY_AUTH_MODE`` set to
  anything but ``token``) and no dashboard. With it, distnet joins that cluster.
- Workers are actors of a placement group (one bundle each, PACK or SPREAD; ``placement.py``),
  alive for the whole job: every stage runs inside them. A worker's bundle may also ask for
  custom Ray resources (``WorkerSpec.resources``, ``[dist] worker_resources``): give each node
  its own resource (``ray start --resources='{"node_a": 4}'``) and ``{"node_a": 1}`` pins a worker
  there.
- Survivors go on (strategy "ps" in async/ssp mode, ``survivors_go_on``): a worker other
  than rank 0 that dies during a stage's epoch is replaced while the others keep training;
  the new actor joins the same group and server at the dead worker's step (``standin.py``).
  Where that is not possible, the group is restarted as below.
- Elastic: when a worker dies, the others are stopped at their next collective (or
  parameter-server round), the lost rank gets a new actor in its bundle (or, if none can be
  placed in ``replace_timeout_s``, the job carries on with fewer workers, never fewer than
  ``min_workers``), and the job runs again: finished stages are skipped, and the interrupted
  stage resumes at the last global step every worker finished, with the parameters and
  optimiser state after it, taken from a survivor (``resume.py``): only the interrupted
  global batch is computed again, and every sample of the epoch counts exactly once. When no
  survivor holds such a state (or ``mid_epoch_resume`` is off), the stage resumes at its last
  epoch checkpoint: the interrupted epoch is redone from its start, still counted once. A
  parameter-server shard lost for good (strategy "ps" without snapshots) makes the job run
  again the same way, with a new server (its error says ``group_may_restart``).
- Ctrl-C (or any error) kills every actor and the placement group; checkpoints are written
  by renaming, so the last one stays usable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from distnet.parallel.rayengine.errors import causal, may_restart, one_line, rank_failure
from distnet.parallel.rayengine.options import (
    RayEngineError,
    RayOptions,
    check_custom_resources,
    start_ray,
)
from distnet.parallel.rayengine.placement import WorkerPlacement
from distnet.parallel.rayengine.resume import choose_carry, share_carry
from distnet.parallel.rayengine.stallwatch import RayStallWatch
from distnet.parallel.rayengine.standin import outage_steps, replace_in_place


class RayJob(WorkerPlacement):
    """One job's workers on Ray; ``run(job)`` returns rank 0's report."""

    def __init__(
        self,
        options: RayOptions,
        log: Callable[[str], None] = print,
        task: Callable[..., dict[str, Any]] | None = None,
    ) -> None:
        # task(comm, generation, job, spec, log) -> report: what every worker runs (``run``)
        self.opt, self.log, self.task = options, log, task
        self.specs = [
            replace(s, resources=check_custom_resources(s.resources, f"worker {i}"))
            for i, s in enumerate(options.workers)
        ]
        self.min_workers = options.min_workers or len(self.specs)
        if not 1 <= self.min_workers <= len(self.specs):
            raise RayEngineError(
                f"--min-workers {self.min_workers} must be in 1..{len(self.specs)} (the workers)"
            )
        if options.placement.upper() not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise RayEngineError(f"placement {options.placement!r}: expected PACK or SPREAD")
        self.actors: list[Any] = []
        self.bundles: list[int] = []  # actor i lives in bundle bundles[i]
        self.generation = 0
        self.failures: list[str] = []
        self.pg: Any = None
        self.worker_info: list[dict[str, Any]] = []  # every actor this job started (pid, node)
        self.resume_from_carry = False  # the next run starts from rank 0's carry (resume.py)
        self._t0 = time.perf_counter()
        self.recoveries: list[dict[str, Any]] = []  # per lost worker: seconds, where resumed
        self._started_ray = False
        self.keeper: Any = None  # owns the parameter-server shards (strategy ps/hybrid)

    def _rank_spec(self, rank: int) -> dict[str, Any]:
        spec = self.specs[self.bundles[rank]]
        fail = self.opt.fail_at_step.get(rank) if self.generation == 1 else None
        return {
            "device": spec.device,
            "strategy": self.opt.strategy,
            "ps": self.opt.ps,
            "rebalance_every": self.opt.rebalance_every,
            "delay_per_sample_s": spec.delay_per_sample_s,
            "fail_at_step": fail,
            "faults": [
                f
                for f in self.opt.faults
                if f["generation"] == self.generation and f["rank"] == rank
            ],
            "sample_log": self.opt.sample_log,
            "trace": self.opt.trace,
            "resume": self.resume_from_carry,
            "survivors_go_on": self.opt.survivors_go_on,
            "shard_keeper": self.keeper,
            "collective_timeout_s": self.opt.collective_timeout_s,
        }

    # --- running --------------------------------------------------------------------------
    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Runs ``job`` (a loaded job dict) to the end; returns rank 0's report."""
        self._t0 = time.perf_counter()
        try:
            init = dict(self.opt.ray_init)
            if self.opt.address is None:  # a local Ray may oversubscribe the cores (logical)
                wanted = sum(s.num_cpus for s in self.specs)
                init.setdefault("num_cpus", max(os.cpu_count() or 1, int(wanted + 0.999)))
            self._started_ray = start_ray(self.opt.address, **init)
            self._place()
            if self.opt.strategy in ("ps", "hybrid"):  # the shards belong to the job
                from distnet.parallel.ps.keeper import start_keeper  # noqa: PLC0415

                self.keeper = start_keeper()
            while True:
                outcome = self._set_up_or_lost() or self._attempt(job)
                if isinstance(outcome, dict):
                    outcome["failures"] = self.failures
                    outcome["recoveries"] = self.recoveries
                    outage_steps(self.recoveries, outcome)
                    outcome["generation"] = self.generation
                    outcome["worker_info"] = self.worker_info
                    return outcome
                self._recover(outcome)
        finally:
            from distnet.parallel.ps.keeper import stop_keeper  # noqa: PLC0415

            stop_keeper(self.keeper)  # before stop(): it may shut Ray down
            self.keeper = None
            self.stop()

    def _set_up_or_lost(self) -> list[int]:
        """Sets the group up; returns the ranks whose actors died meanwhile (a second death
        while the group recovers from a first), replaced then as any lost rank is."""
        import ray  # noqa: PLC0415

        try:
            self._setup_group()
            return []
        except ray.exceptions.RayActorError as e:
            error = e
        lost = []
        for rank, actor in enumerate(self.actors):
            try:
                ray.get(actor.info.remote(), timeout=self.opt.start_timeout_s)
            except ray.exceptions.RayActorError:
                lost.append(rank)
        if not lost:
            raise error
        self.failures += [f"rank {r}: died while the group was set up" for r in lost]
        return lost

    def _attempt(self, job: dict[str, Any]) -> dict[str, Any] | list[int]:
        """One run of the job on the current group: rank 0's report, or the lost ranks."""
        import ray  # noqa: PLC0415

        if self.task is None:
            raise RayEngineError("RayJob.run needs a task (see distnet.train.jobs.rayjob.run_rank)")
        futures = [
            a.run.remote(self.task, job, self._rank_spec(r)) for r, a in enumerate(self.actors)
        ]
        pending = list(futures)
        # where every worker is, and a report when some stop moving (stallwatch.py)
        watch = RayStallWatch(self.actors, self.log, job.get("run", {}).get("out"))
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            self._print_logs()
            stalled = watch.poll() if not done else None
            if stalled is not None:
                self._abort_all(stalled)
                self._drain(pending, consume=True, timeout_s=10.0)
                raise RayEngineError(stalled)
            lost, errors, restart = [], [], False
            for ref in done:
                rank = futures.index(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    lost.append(rank)
                    self.failures.append(f"rank {rank}: {type(e).__name__}")
                except ray.exceptions.RayTaskError as e:
                    if may_restart(e.cause):  # a lost parameter-server shard
                        restart = True
                        self.failures.append(f"rank {rank}: {one_line(e)}")
                    else:
                        errors.append((rank, e))
            if len(lost) == 1 and not (restart or errors):  # async/ssp ps: the others go on
                future = replace_in_place(self, lost[0], job)
                if future is not None:
                    futures[lost[0]] = future
                    pending.append(future)
                    continue
            if lost or restart:  # survivors stopped by a lost peer are no failure of their own
                self._abort_all(f"rank(s) {lost} died")
                self._drain(pending)
                return lost
            if errors:
                self._abort_all("another rank failed")
                # no unhandled-error noise from the others; the error is not held back long
                # by a rank that does not reach a collective (stop() kills it anyway). Theirs
                # count when every error so far follows from another rank's (causal)
                later = self._drain(pending, consume=True, timeout_s=10.0)
                rank, e = causal(errors + [(futures.index(r), e) for r, e in later])
                raise RayEngineError(rank_failure(rank, e)) from None
        self._print_logs()
        return ray.get(futures[0])

    def _print_logs(self) -> None:
        import ray  # noqa: PLC0415

        try:
            for line in ray.get(self.actors[0].logs.remote(), timeout=10):
                self.log(line)
        except ray.exceptions.RayError:
            pass  # rank 0 is gone; its lines with it

    def _abort_all(self, reason: str) -> None:
        for a in self.actors:
            a.abort.remote(self.generation, reason)

    def _drain(
        self, pending: list[Any], consume: bool = False, timeout_s: float | None = None
    ) -> list[tuple[Any, BaseException]]:
        """Waits (at most ``timeout_s``, default the collective timeout) for the survivors to
        leave ``run`` (their collectives raise at once); ``consume``: fetches what they ended
        with, so that Ray does not print the errors nobody fetched (their remote tracebacks)
        when the job has already failed, and returns the (reference, error) of those that
        failed with a task error (most: a stopped survivor's ``WorkerLostError``)."""
        import ray  # noqa: PLC0415

        wait_s = self.opt.collective_timeout_s if timeout_s is None else timeout_s
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=wait_s)
        failed = []
        for ref in done if consume else []:
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayTaskError as e:
                failed.append((ref, e))
            except ray.exceptions.RayError:
                pass  # an actor gone: no error of its own to report
        return failed

    def _recover(self, lost: list[int]) -> None:
        """New actors for the lost ranks, or fewer workers (>= min_workers)."""
        import ray  # noqa: PLC0415

        if len(self.failures) > self.opt.max_failures:
            raise RayEngineError(
                f"more than {self.opt.max_failures} worker failures: {self.failures}"
            )
        started = time.perf_counter()
        holder = choose_carry(self.actors, lost, self.opt.mid_epoch_resume)
        if holder is not None:  # a copy for the others: the holder may die before a step
            share_carry(self.actors, lost, holder[0])
        if self.keeper is not None:  # the carry is taken: the next group gets a new server
            try:
                ray.get(self.keeper.shutdown_all.remote(), timeout=30)
            except ray.exceptions.RayError:
                pass  # a keeper gone took its shards with it
        where = (
            f"epoch {holder[1]['epoch']} after global step {holder[1]['steps']} of the stage"
            if holder is not None
            else "the last epoch checkpoint"
        )
        self.log(
            f"ray: lost worker(s) {lost}; replacing them and resuming at {where}"
            if lost
            else f"ray: lost a parameter-server shard; resuming at {where}"
        )
        keep = []
        for rank, actor in enumerate(self.actors):
            if rank not in lost:
                keep.append((actor, self.bundles[rank]))
                continue
            ray.kill(actor, no_restart=True)
            if not self.opt.replace_lost:
                continue
            fresh = self._new_actor(self.bundles[rank])
            try:
                self.worker_info.append(
                    ray.get(fresh.info.remote(), timeout=self.opt.replace_timeout_s)
                )
                keep.append((fresh, self.bundles[rank]))
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
                ray.kill(fresh, no_restart=True)
        if len(keep) < self.min_workers:
            raise RayEngineError(
                f"only {len(keep)} worker(s) left after losing {lost}, fewer than "
                f"--min-workers {self.min_workers}"
            )
        if len(keep) < len(self.actors):
            self.log(f"ray: carrying on with {len(keep)} worker(s)")
        if holder is not None:  # its state goes out by broadcast from rank 0
            first = [i for i, (a, _) in enumerate(keep) if a is self.actors[holder[0]]]
            keep.insert(0, keep.pop(first[0]))
        self.actors = [a for a, _ in keep]
        self.bundles = [b for _, b in keep]
        self.resume_from_carry = holder is not None
        self.recoveries.append({
            "kind": "group restarted", "lost": lost, "workers": len(keep),
            "mid_epoch": holder is not None,
            "at_s": round(started - self._t0, 3),  # since run() began
            "resumed_at": None if holder is None else holder[1],
            "replace_s": round(time.perf_counter() - started, 3),
        })  # fmt: skip


def run_on_ray(
    job: dict[str, Any],
    options: RayOptions,
    task: Callable[..., dict[str, Any]],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs ``task(comm, generation, job, spec, log)`` on every Ray worker (placement, group
    set-up, failures, replacement); returns rank 0's result. ``distnet.train.jobs.rayjob`` runs
    jobs with it."""
    started = time.perf_counter()
    report = RayJob(options, log, task).run(job)
    report["driver_seconds"] = round(time.perf_counter() - started, 3)
    return report
