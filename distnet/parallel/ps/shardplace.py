"""Where a replicated shard's replicas run: on different nodes where the cluster has several.

A replica on the same node as its primary dies with it when the node goes; so a shard's
backup is placed on another node than its primary (Ray's node affinity), and the shards'
primaries go round the nodes, so that the shards' load and traffic spread too. On one node
there is nothing to choose.

The affinity is hard: with ``soft=True`` Ray 2.60 put 4 of 6 replicas of a three-node
``Cluster`` elsewhere than asked, backups beside their primaries. The nodes are the live ones
of the moment; a node lost before its replica started fails that start (the warden tries a
rebuild again with the nodes alive then).

How many replicas (``[dist] replicas``, ``resolve_replicas``): "auto", the default, is 2 where
the cluster has several live nodes (a node's loss then takes one replica of a shard at most)
and 1 on a single node (there a backup still outlives a killed shard process, not the node:
``replicas = 2`` asks for it); 1 or 2 as asked. Resolved where each stage's server is made
(``keeper.py``, ``ParameterServer.create``), with the nodes alive then; its handle carries the
number to the workers (``ps.replicas``, ``ps.stats()["replicas_per_shard"]``).
"""

from __future__ import annotations

from typing import Any


def alive_nodes() -> list[str]:
    """The ids (hex) of the cluster's live nodes, sorted (the same order for every caller)."""
    import ray  # noqa: PLC0415

    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))


def check_replicas(value: Any) -> int | str:
    """``value`` as ``[dist] replicas`` takes it: "auto", 1 or 2 (else ValueError, naming
    ``replicas``; a bool is not a count)."""
    if value == "auto" or (type(value) is int and value in (1, 2)):
        return value
    raise ValueError(f"replicas must be 'auto', 1 or 2, got {value!r}")


def resolve_replicas(value: Any, nodes: int | None = None) -> int:
    """The replicas per shard ``value`` asks for: 1 or 2 as given; "auto": 2 where the cluster
    has ``nodes`` >= 2 live nodes (default: ``len(alive_nodes())``, the nodes placement goes
    round), else 1."""
    if check_replicas(value) != "auto":
        return int(value)
    return 2 if (len(alive_nodes()) if nodes is None else nodes) >= 2 else 1


def _on(node: str) -> dict[str, Any]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def replica_placement(shards: int, first: str | None = None) -> list[dict[str, Any]] | None:
    """Per shard the Ray options of its primary, with its backup's under ``"backup"``: shard
    i's primary on node i mod n, its backup on node i + 1 mod n (n live nodes; ``first``: the
    node to count from, e.g. the driver's). None on a single node (no choice to make)."""
    nodes = alive_nodes()
    if len(nodes) < 2:
        return None
    if first in nodes:
        k = nodes.index(first)
        nodes = nodes[k:] + nodes[:k]
    n = len(nodes)
    return [{**_on(nodes[i % n]), "backup": _on(nodes[(i + 1) % n])} for i in range(shards)]


def away_from_node(node: str, options: dict[str, Any]) -> dict[str, Any]:
    """Ray options for a new replica of a shard whose live replica runs on ``node``: another
    live node (the first after it in ``alive_nodes`` order), or ``{}`` (keep ``options``)
    when there is none."""
    nodes = [n for n in alive_nodes() if n != node]
    if not nodes:
        return {}
    later = [n for n in nodes if n > node]
    return _on((later or nodes)[0])
