"""The strategy factory: the one place a synchronisation strategy is chosen.

``make_sync_optimizer(optimizer, engine)`` turns a job's ``[dist]`` settings (``engine.dist``,
the keys of ``distnet.train.jobs.jobspec.DistSpec``) into the synchronising optimiser of one rank,
for any engine (``distnet.parallel.engine``). A strategy is one function
``(optimizer, engine) -> optimiser`` in ``STRATEGIES``; what only some engines can give (the
parameter server's shard actors) it asks the engine for (``engine.parameter_server``).

Adding a strategy: one module with its builder, its ``[dist]`` keys in ``DistSpec`` (and their
conflicts in ``dist_conflicts``), and one line in ``STRATEGIES`` (``local_sgd`` is the worked
example: ``distnet/parallel/localsgd.py``, see docs/engines-interface.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["STRATEGIES", "make_sync_optimizer"]


def allreduce(optimizer: Any, engine: Any) -> Any:
    """Synchronous data parallelism: a ``DistributedOptimizer`` (bucketed allreduce), or ZeRO
    stage 1 (``ShardedOptimizer``) where ``shard_optimizer`` asks for it or it pays."""
    from distnet.parallel.optimizer import DistributedOptimizer  # noqa: PLC0415
    from distnet.parallel.zero import ShardedOptimizer, sharding_pays  # noqa: PLC0415

    comm, dist = engine.comm, engine.dist
    if comm.size == 1:
        return optimizer
    compression = None if dist["compression"] == "none" else dist["compression"]
    shard, overlap = dist["shard_optimizer"], dist["overlap"]
    # ZeRO-1 reduce-scatters after backward: asked-for overlap keeps the plain wrapper
    auto_shard = shard == "auto" and overlap is not True
    if shard is True or (auto_shard and sharding_pays(comm, optimizer, compression)):
        via = "shared memory" if getattr(comm, "shm", None) is not None else "MPI"
        engine.note(
            f"optimiser state sharded over {comm.size} ranks (ZeRO 1, collectives via {via})"
        )
        return ShardedOptimizer(optimizer, comm)
    return DistributedOptimizer(
        optimizer,
        comm,
        bucket_mb=dist["bucket_mb"],
        compression=compression,
        overlap=None if overlap == "auto" else overlap,
    )


def parameter_server(optimizer: Any, engine: Any) -> Any:
    """Sharded parameter server (``distnet.parallel.ps``): the engine starts the shards."""
    return engine.parameter_server(optimizer, hybrid=False)


def hybrid(optimizer: Any, engine: Any) -> Any:
    """Allreduce inside a node, one push per node to the parameter server."""
    return engine.parameter_server(optimizer, hybrid=True)


def local_sgd(optimizer: Any, engine: Any) -> Any:
    """H local steps, then the parameters (and optionally the optimiser state) averaged."""
    from distnet.parallel.localsgd import LocalSGD  # noqa: PLC0415

    if engine.comm.size == 1:
        return optimizer
    dist = engine.dist
    return LocalSGD(optimizer, engine.comm, sync_every=int(dist["sync_every"]),
                    average_state=bool(dist["average_state"]))  # fmt: skip


STRATEGIES: dict[str, Callable[[Any, Any], Any]] = {
    "allreduce": allreduce,
    "ps": parameter_server,
    "hybrid": hybrid,
    "local_sgd": local_sgd,
}


def make_sync_optimizer(optimizer: Any, engine: Any) -> Any:
    """The synchronising optimiser of ``engine.dist["strategy"]`` around ``optimizer`` (a
    ``distnet.optim`` optimiser over this rank's replica), on ``engine`` (``comm``, ``dist``,
    ``note``, and ``parameter_server`` for the strategies that need one).

    Raises:
        ValueError: for a strategy that is not in ``STRATEGIES`` (naming the known ones).
    """
    name = engine.dist.get("strategy", "allreduce")
    build = STRATEGIES.get(name)
    if build is None:
        raise ValueError(f"[dist] strategy {name!r} is not one of {sorted(STRATEGIES)}")
    return build(optimizer, engine)
