"""``distnet bench ps --replicas 1,2``: what replicated shards cost the update rate.

Beside each ``ps-S`` contender (S shards, one replica each) runs ``ps-SxR``: the same server
with ``replicas = R`` (a primary and a backup per shard, ``distnet/parallel/ps/replica.py``:
a push is answered once both applied it), in the same rounds. The ratio is the median of the
per-round rates ``ps-SxR / ps-S`` (and its spread), with the load average of the machine when
the rounds ended (one node: every replica on it).

    distnet bench ps --workers 4 --shards 2 --replicas 1,2 --json ps-replicas.json
"""

from __future__ import annotations

import os
import statistics
from typing import Any


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
