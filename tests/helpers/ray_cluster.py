"""A Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``), token
authentication on, for the tests of what happens across nodes."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# a lost node noticed within about 5 s (Ray's default: about 15 s); a raylet starved of CPU
# on a loaded 2-core machine for 1.5 s would be taken for lost with 500 ms x 3 (a false loss
# of the node holding the backup loses the shard)
FAST_NODE_LOSS = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000,
                  "health_check_failure_threshold": 4}  # fmt: skip


@contextmanager
def token_cluster(
    nodes: int, cpus_per_node: int, system_config: dict[str, Any] | None = None, **init: Any
) -> Iterator[Any]:
    """A head with no CPUs (the driver's) and ``nodes`` worker nodes of ``cpus_per_node``
    CPUs, this process connected (``ray.init(**init)``); yields the ``Cluster``.
    ``system_config``: the head's Ray settings (``FAST_NODE_LOSS``: a lost node noticed
    within about 5 s instead of Ray's default of about 15 s). A token of
    its own, in the environment every node inherits (as Ray's own tests of token
    authentication do); the loader's cache is reset around it."""
    import pytest  # noqa: PLC0415
    import ray  # noqa: PLC0415
    from ray._private.authentication_test_utils import reset_auth_token_state  # noqa: PLC0415
    from ray._raylet import get_authentication_mode  # noqa: PLC0415
    from ray.cluster_utils import Cluster  # noqa: PLC0415

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "token")
    mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    mp.setenv("RAY_worker_niceness", "0")  # the workers at nice 0, as distnet's local Ray runs them
    reset_auth_token_state()
    if ray.is_initialized():
        ray.shutdown()
    head: dict[str, Any] = {"num_cpus": 0}
    if system_config:
        head["_system_config"] = system_config
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus_per_node)
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, logging_level="warning", **init)
        assert int(get_authentication_mode()) == 1  # AuthenticationMode.TOKEN
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        mp.undo()
        reset_auth_token_state()
