"""Placing a Ray job's workers: one placement group (one bundle per worker, PACK or SPREAD),
a worker actor per bundle, the group set up on them, and everything stopped at the end.

Mixed into ``RayJob`` (``driver.py``), which runs the job on these actors and replaces the
ones that die (``_new_actor`` puts a fresh actor into a lost worker's bundle).
"""

from __future__ import annotations

import os
from typing import Any

from distnet.parallel.rayengine.options import RayEngineError, RayOptions, WorkerSpec
from distnet.parallel.rayengine.worker import WorkerActor

_REMOTE_WORKER: Any = None


def _remote_worker_class() -> Any:
    global _REMOTE_WORKER
    if _REMOTE_WORKER is None:
        import ray  # noqa: PLC0415

        _REMOTE_WORKER = ray.remote(WorkerActor)
    return _REMOTE_WORKER


class WorkerPlacement:
    """The placement group and worker actors of a ``RayJob`` (needs ``opt``, ``specs``,
    ``actors``, ``bundles``, ``generation``, ``pg``, ``worker_info``, ``_started_ray``)."""

    opt: RayOptions
    specs: list[WorkerSpec]
    actors: list[Any]
    bundles: list[int]
    generation: int
    pg: Any
    worker_info: list[dict[str, Any]]
    _started_ray: bool

    def _bundle(self, spec: WorkerSpec) -> dict[str, float]:
        bundle = {"CPU": spec.num_cpus}
        if spec.num_gpus:
            bundle["GPU"] = spec.num_gpus
        bundle.update(spec.resources)  # pins the worker to nodes that have them
        return bundle

    def _place(self) -> None:
        import ray  # noqa: PLC0415
        from ray.util.placement_group import placement_group  # noqa: PLC0415

        self.pg = placement_group(
            [self._bundle(s) for s in self.specs], strategy=self.opt.placement.upper()
        )
        try:
            ray.get(self.pg.ready(), timeout=self.opt.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            wanted = [self._bundle(s) for s in self.specs]
            have = ray.cluster_resources()
            missing = sorted({k for b in wanted for k in b if k not in have})
            nowhere = f" (no node has {missing})" if missing else ""
            raise RayEngineError(
                f"Ray could not place {len(self.specs)} workers {wanted} in "
                f"{self.opt.start_timeout_s:.0f} s{nowhere}; cluster resources: {have}"
            ) from None
        self.actors = [self._new_actor(i) for i in range(len(self.specs))]
        self.bundles = list(range(len(self.specs)))
        infos = self._wait(
            [a.info.remote() for a in self.actors], self.opt.start_timeout_s, "start"
        )
        self.worker_info = list(infos)

    def _new_actor(self, bundle: int) -> Any:
        from ray.util.scheduling_strategies import (  # noqa: PLC0415
            PlacementGroupSchedulingStrategy,
        )

        spec = self.specs[bundle]
        env = {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "DISTNET_ENGINE": "ray"}
        return (
            _remote_worker_class()
            .options(
                num_cpus=spec.num_cpus,
                num_gpus=spec.num_gpus,
                # run + deliver + abort + logs + join_info + replace_peer + progress/where
                max_concurrency=7,
                max_restarts=0,  # the driver replaces it (a restarted actor would lose its rank)
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=bundle
                ),
            )
            .remote(env)
        )

    def _wait(self, refs: list[Any], timeout_s: float, what: str) -> list[Any]:
        import ray  # noqa: PLC0415

        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RayEngineError(f"Ray workers did not {what} within {timeout_s:.0f} s") from None

    def _setup_group(self) -> None:
        self.generation += 1
        infos = self._wait([a.info.remote() for a in self.actors], self.opt.start_timeout_s,
                           "answer")  # fmt: skip
        nodes = [info["node_id"] for info in infos]  # LOCAL_RANK: ranks on the same node
        refs = [
            a.setup.remote(
                self.generation,
                r,
                len(self.actors),
                self.actors,
                self.opt.collective_timeout_s,
                nodes,
            )  # fmt: skip
            for r, a in enumerate(self.actors)
        ]
        self._wait(refs, self.opt.start_timeout_s, "join the group")

    def stop(self) -> None:
        """Kills every actor and the placement group; shuts Ray down if this job started it."""
        try:
            import ray  # noqa: PLC0415
            from ray.util.placement_group import remove_placement_group  # noqa: PLC0415
        except ImportError:
            return
        if not ray.is_initialized():
            return
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001  (already dead: nothing to stop)
                pass
        self.actors = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
            self.pg = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
