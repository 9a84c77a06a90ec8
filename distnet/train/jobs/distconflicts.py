"""Which ``[dist]`` combinations cannot run as written, each refused in one line that names the
keys and the way out (``dist_conflicts``, asked by the job spec's validation and by the
conformance matrix), and which ``[dist]`` keys only the Ray engine reads (``RAY_ONLY_KEYS``).

``RAY_ONLY_KEYS`` is the one list of them: the job reference marks them
(``distnet.train.jobs.jobsdoc``), engines "local" and "mpi" refuse them here, and the Ray engine
reads each of them (``distnet.parallel.rayengine.options.options_from_job``, which sits below
this layer and so holds no list of its own; tests/unit/test_jobspec.py checks that it reads
every key named here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distnet.train.jobs.jobspec import DistSpec

# set under engine "local" or "mpi" they would do nothing, so they are refused (mode only when
# it is not "sync", the default every engine runs; replicas only when it is not "auto", which
# asks for nothing where there is no parameter server)
RAY_ONLY_KEYS = ("workers", "cpu_workers", "gpus_per_worker", "min_workers", "placement",
                 "address", "workers_per_node", "devices", "worker_resources",
                 "survivors_go_on", "shards", "staleness", "mode", "replicas")  # fmt: skip


def without_idle_ray_keys(dist: dict[str, Any]) -> dict[str, Any]:
    """A loaded ``[dist]`` table to write back as a job file (``--print-config``, the
    benchmarks' job files): the Ray-only keys at their defaults left out unless the engine is
    "ray", so the file runs on whatever engine "auto" becomes (an MPI launch refuses a Ray-only
    key that is set), and loads back to the same job (the defaults fill them in again)."""
    from distnet.train.jobs.jobspec import DistSpec  # noqa: PLC0415

    if dist.get("engine") == "ray":
        return dict(dist)
    fields = DistSpec.model_fields
    return {k: v for k, v in dist.items() if k not in RAY_ONLY_KEYS
            or v != fields[k].get_default(call_default_factory=True)}  # fmt: skip


def dist_conflicts(dist: DistSpec) -> list[str]:
    """Combinations of ``[dist]`` keys that cannot run as written (one line each, naming the
    keys and the way out): a key the chosen engine or strategy ignores, or two features that
    exclude each other. The conformance matrix asks this same function which combinations are
    refused (``distnet.train.jobs.conformance``)."""
    out: list[str] = []
    engine, strategy, mode = dist.engine, dist.strategy, dist.mode
    if engine in ("local", "mpi"):
        if strategy in ("ps", "hybrid"):
            out.append(f"strategy = {strategy!r} needs engine = 'ray' (engine {engine!r} "
                       "synchronises by allreduce or local_sgd only)")  # fmt: skip
        given = [k for k in RAY_ONLY_KEYS if k in dist.model_fields_set]
        given = [k for k in given if k != "mode" or mode != "sync"]
        given = [k for k in given if k != "replicas" or dist.replicas != "auto"]
        if given:
            out.append(f"{', '.join(given)}: only the Ray engine reads "
                       f"{'it' if len(given) == 1 else 'them'}; set engine = 'ray' or remove "
                       f"{'it' if len(given) == 1 else 'them'} (engine {engine!r})")  # fmt: skip
    if dist.shard_optimizer is True and engine in ("local", "ray"):
        # ZeRO-1 (distnet.parallel.zero) shards over MPI ranks; a Ray worker raised
        # "ShardedOptimizer needs the MPI engine" only once its stage began
        out.append(
            f"shard_optimizer = true needs engine 'mpi' (ZeRO-1 shards the optimiser "
            f"state over MPI ranks; engine {engine!r}); set it to 'auto' or false"
        )
    if engine == "local" and "rebalance_every" in dist.model_fields_set:
        out.append("rebalance_every: engine 'local' is one process, with no batch to split; "
                   "remove it")  # fmt: skip
    if engine == "local":  # one process: nothing to compress
        if dist.compression != "none":
            out.append(f"compression = {dist.compression!r} needs several ranks (engine "
                       "'local' is one process); set 'none'")  # fmt: skip
    ps = strategy in ("ps", "hybrid")
    if mode != "sync" and not ps:
        out.append(f"mode = {mode!r} needs strategy 'ps' or 'hybrid' (allreduce is synchronous)")
    if dist.staleness and mode != "ssp":
        out.append(f"staleness = {dist.staleness} needs mode = 'ssp' (the bound of ssp only)")
    if dist.rebalance is True and strategy == "local_sgd":
        out.append("rebalance = true needs strategy 'allreduce' (local SGD averages the "
                   "parameters unweighted); set it to 'auto' or false")  # fmt: skip
    if dist.shards > 1 and not ps:
        out.append(f"shards = {dist.shards} needs strategy 'ps' or 'hybrid' (parameter-server "
                   "shards)")  # fmt: skip
    if dist.replicas == 2 and not ps:  # "auto" asks for nothing the strategy lacks
        out.append(f"replicas = {dist.replicas} needs strategy 'ps' or 'hybrid' (copies of "
                   "parameter-server shards)")  # fmt: skip
    if dist.workers_per_node and strategy != "hybrid":
        out.append(f"workers_per_node = {dist.workers_per_node} needs strategy 'hybrid'")
    if dist.shard_optimizer is True and ps:
        out.append(f"shard_optimizer = true does nothing with strategy {strategy!r} (the "
                   "parameter server's shards already hold the optimiser state); set it to "
                   "'auto' or false")  # fmt: skip
    if dist.compression != "none" and ps:
        out.append(
            f"compression = {dist.compression!r} does nothing with strategy "
            f"{strategy!r} (pushes to the parameter server are float32); set 'none'"
        )
    if dist.overlap is True and (engine == "local" or ps or dist.shard_optimizer is True):
        what = ("engine 'local' is one process" if engine == "local" else
                f"strategy {strategy!r} pushes to the parameter server" if ps else
                "shard_optimizer = true reduce-scatters after backward")  # fmt: skip
        out.append(f"overlap = true needs an allreduce to overlap ({what}); set 'auto' or false")
    if dist.compression != "none" and dist.shard_optimizer is True:
        out.append(
            f"compression = {dist.compression!r} does nothing with shard_optimizer = "
            "true (ZeRO's reduce-scatter is float32); set one of them off"
        )
    return out + _local_sgd_conflicts(dist)


def _local_sgd_conflicts(dist: DistSpec) -> list[str]:
    """Keys that strategy "local_sgd" ignores, or that only it reads (see ``dist_conflicts``);
    its own parameter-server keys are refused there (they need strategy 'ps' or 'hybrid')."""
    # by value, as the other strategies' keys are: a default (as --print-config writes every
    # key) changes nothing
    given = [
        k for k in ("sync_every", "average_state")
        if getattr(dist, k) != type(dist).model_fields[k].default
    ]  # fmt: skip
    if dist.strategy != "local_sgd":
        return [f"{k} needs strategy = 'local_sgd' (strategy {dist.strategy!r})" for k in given]
    out = []
    if dist.shard_optimizer is True:
        out.append("shard_optimizer = true does nothing with strategy 'local_sgd' (every rank "
                   "steps its own replica); set it to 'auto' or false")  # fmt: skip
    if dist.compression != "none":
        out.append(f"compression = {dist.compression!r} does nothing with strategy 'local_sgd' "
                   "(parameters are averaged in float32); set 'none'")  # fmt: skip
    if dist.overlap is True:
        out.append("overlap = true needs an allreduce to overlap (strategy 'local_sgd' averages "
                   "between steps); set 'auto' or false")  # fmt: skip
    return out
