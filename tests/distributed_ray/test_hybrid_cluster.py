"""``strategy = "hybrid"`` on a Ray cluster of two worker nodes (``ray.cluster_utils.Cluster``
on this machine, token authentication on): the nodes are the Ray nodes the workers landed on,
with no ``workers_per_node`` override. The job leaves ``[dist] replicas`` at its default,
"auto": on these nodes its shard gets a backup on another node than its primary, and both
replicas hold the same bytes at the stage's end (the default's end-to-end run on a cluster)."""

from __future__ import annotations

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
    from helpers.ray_cluster import token_cluster  # noqa: PLC0415

    with token_cluster(2, 2) as cluster:  # two CPUs each: PACK puts two workers on each
        yield cluster


def test_hybrid_groups_the_workers_by_the_ray_node_they_landed_on(two_nodes, digits, tmp_path):
    from helpers.jobs import mlp_job  # noqa: PLC0415
    from helpers.params import final_params, reference_params  # noqa: PLC0415

    path = tmp_path / "job.toml"
    data = digits / "data"
    path.write_text(mlp_job(str(data / "train"), test=str(data / "test"), epochs=1))
    out = tmp_path / "run"
    job = load_job(path, {"run": {"out": str(out)}})
    options = RayOptions(workers=worker_specs(4), strategy="hybrid", ps={"mode": "sync"})
    lines: list[str] = []
    report = run_ray_job(job, options, log=lines.append)
    # which ranks share a node is Ray's choice; that there are two nodes of two is not
    nodes = report["nodes"]
    assert sorted(len(n) for n in nodes) == [2, 2] and sorted(sum(nodes, [])) == [0, 1, 2, 3]
    landed = [info["node_id"] for info in report["worker_info"]]  # rank order: no failures
    assert len(set(landed)) == 2
    assert all(len({landed[r] for r in ranks}) == 1 for ranks in nodes)
    assert len(report["ps_stats"][0]["workers"]) == 2  # one pusher per node
    stats = report["ps_stats"][0]
    assert stats["replicas_per_shard"] == 2, stats.get("replicas_per_shard")  # auto: 3 nodes
    assert stats["replica_check"]["ok"], stats["replica_check"]  # byte for byte
    assert stats["ledger"]["ok"], stats["ledger"]
    said = "parameter server: 1 shard(s) x 2 replica(s) ([dist] replicas = 'auto')"
    assert said in lines, [line for line in lines if "parameter server" in line]
    got = final_params(job, out)
    assert np.max(np.abs(got - reference_params(job, 1, 4))) < 1e-5
