"""Sharded parameter server on Ray actors (sync, async/Downpour, ssp bounded staleness).

    from distnet.parallel.ps import ParameterServer, ParameterServerOptimizer
    ps = ParameterServer.create(flat, shards=2, mode="sync", num_workers=4,
                                optimizer={"name": "adam", "lr": 1e-3})
    # in worker actor k:  opt = ParameterServerOptimizer(Adam(model, lr=1e-3), ps, k)

Importing this package does not import Ray; creating a server does.
"""

from distnet.parallel.ps.calls import ShardLostError
from distnet.parallel.ps.hybrid import HybridOptimizer
from distnet.parallel.ps.server import (
    DEFAULT_OPTIMIZER_ON,
    ParameterServer,
    penalty_mask_of,
    shard_ranges,
)
from distnet.parallel.ps.shard import ParameterServerShard
from distnet.parallel.ps.shardchecks import CallRefused, PushRefused
from distnet.parallel.ps.worker import ParameterServerOptimizer

__all__ = [
    "CallRefused",
    "DEFAULT_OPTIMIZER_ON",
    "HybridOptimizer",
    "ParameterServer",
    "ParameterServerOptimizer",
    "ParameterServerShard",
    "PushRefused",
    "ShardLostError",
    "penalty_mask_of",
    "shard_ranges",
]
