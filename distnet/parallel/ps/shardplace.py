"""Where a replicated shard's replicas run: on different nodes where the cluster has several.

A replica on the same node as its primary dies with it when the node goes; so a shard's
backup is placed on another node than its primary (Ray's node affinity), and the shards'
primaries go round the nodes, so that the shards' load and traffic spread too. On one node
there is nothing to choose.

The affinity is hard: with ``soft=True`` Ray 2.60 put 4 of 6 replicas of a three-node
``Cluster`` elsewhere than asked, backups beside their primaries. The nodes are the live ones
of the moment; a node lost before its replica started fails that start (the warden tries a
rebuild again with the nodes alive then).
"""

from __future__ import annotations

from typing import Any


def alive_nodes() -> list[str]:
    """The ids (hex) of the cluster's live nodes, sorted (the same order for every caller)."""
    import ray  # noqa: PLC0415

    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))


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
