"""``strategy = "hybrid"`` on a Ray cluster of two worker nodes (``ray.cluster_utils.Cluster``
on this machine, token authentication on): the nodes are the Ray nodes the workers landed on,
with no ``workers_per_node`` override."""

from __future__ import annotations

import secrets

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("sklearn")

import numpy as np  # noqa: E402

from distnet.parallel.rayengine import RayOptions, worker_specs  # noqa: E402
from distnet.train.jobs.job import load_job  # noqa: E402
from distnet.train.jobs.rayjob import run_ray_job  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.own_ray, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def two_nodes():
    from ray._private.authentication_test_utils import reset_auth_token_state  # noqa: PLC0415
    from ray.cluster_utils import Cluster  # noqa: PLC0415

    # a token of this test's own, in the environment every node of the cluster inherits (as
    # Ray's own tests of token authentication do); the loader's cache is reset around it
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "token")
    mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    reset_auth_token_state()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):  # two CPUs each: PACK puts two workers on each
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, logging_level="warning")
        from ray._raylet import get_authentication_mode  # noqa: PLC0415

        assert int(get_authentication_mode()) == 1  # AuthenticationMode.TOKEN
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        mp.undo()
        reset_auth_token_state()


def test_hybrid_groups_the_workers_by_the_ray_node_they_landed_on(two_nodes, digits, tmp_path):
    from helpers.jobs import mlp_job  # noqa: PLC0415
    from helpers.params import final_params, reference_params  # noqa: PLC0415

    path = tmp_path / "job.toml"
    data = digits / "data"
    path.write_text(mlp_job(str(data / "train"), test=str(data / "test"), epochs=1))
    out = tmp_path / "run"
    job = load_job(path, {"run": {"out": str(out)}})
    options = RayOptions(workers=worker_specs(4), strategy="hybrid", ps={"mode": "sync"})
    report = run_ray_job(job, options, log=lambda line: None)
    # which ranks share a node is Ray's choice; that there are two nodes of two is not
    nodes = report["nodes"]
    assert sorted(len(n) for n in nodes) == [2, 2] and sorted(sum(nodes, [])) == [0, 1, 2, 3]
    landed = [info["node_id"] for info in report["worker_info"]]  # rank order: no failures
    assert len(set(landed)) == 2
    assert all(len({landed[r] for r in ranks}) == 1 for ranks in nodes)
    assert len(report["ps_stats"][0]["workers"]) == 2  # one pusher per node
    got = final_params(job, out)
    assert np.max(np.abs(got - reference_params(job, 1, 4))) < 1e-5
