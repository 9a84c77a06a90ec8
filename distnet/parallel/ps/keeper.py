"""``ShardKeeper``: the job's owner of its parameter-server shards, so they outlive any worker.

    keeper = start_keeper()                       # the driver, once per job
    ps = ray.get(keeper.create.remote(flat, {"shards": 2, "mode": "sync", ...}))  # rank 0
    ray.get(keeper.shutdown_all.remote())         # the driver, when a group ends or the job

Ray ties an actor's life to its owner, the process that created it: shards that rank 0's actor
created died with rank 0, and the whole server with them. The keeper is a small actor the
driver starts on its own node (0 CPUs; it only creates and stops shards): shards it creates
belong to the job, live across any worker's death, and are stopped by the driver's
``shutdown_all`` (a group that restarts gets a new server) or when the job ends.

Where the shards run (``shard_placement``): ``"driver"`` (the default) puts them on the
driver's node, beside the keeper, whose loss ends the job anyway: no worker node's loss takes
a shard along. ``"spread"`` spreads them over the cluster's nodes (Ray's ``SPREAD``: their
load and traffic too), at the price that a lost node takes its shards with it (restored from
their snapshots, else the group restarts). Replicated shards (``replicas = 2``, which
``"auto"``, the default, becomes on a cluster of several live nodes) on several nodes ignore
both: each shard's backup runs on another node than its primary and the
primaries go round the nodes (``shardplace.py``), so a lost node takes at most one replica of
each shard, and the warden rebuilds it elsewhere (``warden.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet.parallel.ps.server import ParameterServer
from distnet.parallel.ps.shardplace import replica_placement, resolve_replicas

SHARD_PLACEMENTS = ("driver", "spread")


class ShardKeeper:
    """Creates ``ParameterServer``s in this actor (which then owns their shards) and stops them
    (wrap with ``ray.remote``; ``start_keeper`` does)."""

    def __init__(self) -> None:
        self.servers: list[ParameterServer] = []

    def create(self, flat_params: np.ndarray, settings: dict[str, Any]) -> ParameterServer:
        """``ParameterServer.create(flat_params, **settings)`` (``flat_params``: shape ``(n,)``
        float32), the shards placed as ``settings["shard_placement"]`` says (see the module)
        when ``settings`` has no ``placement``; returns the picklable handle (the workers'
        copy of it)."""
        import ray  # noqa: PLC0415
        from ray.util.scheduling_strategies import (  # noqa: PLC0415
            NodeAffinitySchedulingStrategy,
        )

        settings = dict(settings)
        where = settings.pop("shard_placement", "driver")
        if where not in SHARD_PLACEMENTS:
            raise ValueError(f"shard_placement must be one of {SHARD_PLACEMENTS}, got {where!r}")
        # "auto" (the job's default): 2 on several live nodes, else 1 (shardplace.py)
        settings["replicas"] = resolve_replicas(settings.get("replicas", "auto"))
        if settings.get("placement") is None and settings["replicas"] > 1:
            # backups away from their primaries, primaries round the nodes (shardplace.py);
            # None on one node: there the replicas go where `where` says
            node = ray.get_runtime_context().get_node_id()
            settings["placement"] = replica_placement(int(settings.get("shards", 2)), node)
        if settings.get("placement") is None:
            if where == "spread":
                strategy: Any = "SPREAD"
            else:  # this actor's node: the driver's
                node = ray.get_runtime_context().get_node_id()
                strategy = NodeAffinitySchedulingStrategy(node, soft=False)
            settings["placement"] = [{"scheduling_strategy": strategy}] * int(
                settings.get("shards", 2)
            )
        server = ParameterServer.create(flat_params, **settings)
        self.servers.append(server)
        return server

    def shutdown_all(self) -> int:
        """Stops every server this keeper created (their shards, snapshot directories it
        made); returns how many."""
        servers, self.servers = self.servers, []
        for server in servers:
            server.shutdown()
        return len(servers)

    def live(self) -> int:
        """How many servers this keeper holds (not yet shut down)."""
        return len(self.servers)


def start_keeper() -> Any:
    """The keeper actor, owned by the calling process (the driver) and placed on its node."""
    import ray  # noqa: PLC0415
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

    node = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(ShardKeeper)
        .options(
            num_cpus=0,
            max_restarts=0,  # a new keeper would not own the old shards
            max_concurrency=4,  # create beside shutdown_all
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        )
        .remote()
    )


def stop_keeper(keeper: Any, timeout_s: float = 30.0) -> None:
    """Stops the keeper's servers, then the keeper (bounded: a keeper that does not answer is
    killed, and its shards with it)."""
    import ray  # noqa: PLC0415

    if keeper is None:
        return
    try:
        ray.get(keeper.shutdown_all.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 (gone or stuck: killing it ends its shards too)
        pass
    try:
        ray.kill(keeper, no_restart=True)
    except Exception:  # noqa: BLE001
        pass
