"""``distnet bench ps --replicas 1,2``: what replicated shards cost the update rate.

Beside each ``ps-S`` contender (S shards, one replica each) runs ``ps-SxR``: the same server
with ``replicas = R`` (a primary and a backup per shard, ``distnet/parallel/ps/replica.py``:
a push is answered once both applied it), in the same rounds. The ratio is the median of the
per-round rates ``ps-SxR / ps-S`` (and its spread), with the load average of the machine when
the rounds ended (one node: every replica on it).

    distnet bench ps --workers 4 --shards 2 --replicas 1,2 --json ps-replicas.json

On one node a backup reads the gradient its primary stepped on from the primary's memfd file,
as shards read workers' gradients (the same-node road, ``distnet/parallel/ps/link.py``).
Between nodes every array goes by value through Ray's object store: ``--road object-store``
runs the whole job so (``DISTNET_PS_SHM=0`` in every actor's environment), which measures the
cross-node data path on one host; a real network adds the bytes' transfer time on top. The
JSON's ``road`` says which road ran, counted on the shards: pushes that came by the road,
updates forwarded to a backup by the road or by value.

    distnet bench ps --workers 4 --shards 2 --replicas 1,2 --road object-store
"""

from __future__ import annotations

import os
import statistics
from typing import Any

ROADS = {"shm": "1", "object-store": "0"}  # --road: the value of DISTNET_PS_SHM


def road_seen(road: str, servers: dict[str, Any]) -> dict[str, Any]:
    """Which road the rounds took, counted on every server's shards (``servers``: contender
    key -> ``ParameterServer``): pushes that came through the same-node road, updates a primary
    forwarded to its backup by the road or by value; printed and returned."""
    linked, forwards = 0, {"link": 0, "value": 0}
    per_server: dict[str, Any] = {}
    for key, ps in servers.items():
        shards = ps.stats()["shards"]
        mine = {"linked_pushes": sum(sum(s["linked_pushes"]) for s in shards),
                "pushes": sum(sum(s["pushes_received"]) for s in shards),
                "forwards": {k: sum(s["replica_forwards"][k] for s in shards)
                             for k in forwards}}  # fmt: skip
        linked += mine["linked_pushes"]
        for k in forwards:
            forwards[k] += mine["forwards"][k]
        per_server[key] = mine
    print(f"  road {road} (DISTNET_PS_SHM={ROADS[road]}): {linked} pushes by the same-node "
          f"road; updates forwarded to backups: {forwards['link']} by the road, "
          f"{forwards['value']} by value")  # fmt: skip
    return {"road": road, "DISTNET_PS_SHM": ROADS[road], "linked_pushes": linked,
            "forwards": forwards, "servers": per_server}  # fmt: skip


def replica_contenders(shard_counts: list[int], replicas: list[int]) -> list[tuple[int, int, str]]:
    """(shards, replicas, contender name) of every server to measure; name ``ps-S`` for one
    replica (the unreplicated server), ``ps-SxR`` otherwise."""
    return [
        (s, r, f"ps-{s}" if r == 1 else f"ps-{s}x{r}")
        for s in shard_counts
        for r in sorted(set(replicas))
    ]


def replication_report(
    rates: dict[str, dict[str, list[float]]], shard_counts: list[int], modes: list[str]
) -> dict[str, Any]:
    """Per mode and shard count: the replicated server's rate over the unreplicated one's,
    per round (``rates[mode][name]``: updates/s of each round); printed and returned."""
    load = [round(v, 2) for v in os.getloadavg()]
    out: dict[str, Any] = {"load_average": load, "ratio": {}}
    print(f"  replicated shards (rate with replicas / without, per round; load average {load})")
    for mode in modes:
        out["ratio"][mode] = {}
        for s in shard_counts:
            for name, mine in rates[mode].items():
                if not name.startswith(f"ps-{s}x"):
                    continue
                base = rates[mode][f"ps-{s}"]
                per_round = [a / b for a, b in zip(mine, base, strict=True)]
                ratio = {"median": statistics.median(per_round), "min": min(per_round),
                         "max": max(per_round)}  # fmt: skip
                out["ratio"][mode][name] = ratio
                print(f"    {mode}, {name}: {statistics.median(mine):.2f}/s vs "
                      f"{statistics.median(base):.2f}/s: x{ratio['median']:.2f} "
                      f"(min {ratio['min']:.2f}, max {ratio['max']:.2f})")  # fmt: skip
    return out
