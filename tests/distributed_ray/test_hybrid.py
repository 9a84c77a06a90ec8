"""``strategy = "hybrid"`` on a real local Ray (tests/conftest.py's shared one, token auth
on): allreduce inside a node, parameter server across nodes. One machine stands in for 2 nodes of
2 workers through ``workers_per_node``."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("sklearn")

from helpers.jobs import mlp_job  # noqa: E402
from helpers.params import final_params, reference_params  # noqa: E402

from distnet import cli  # noqa: E402
from distnet.parallel.rayengine import (  # noqa: E402
    RayJob,
    RayOptions,
    WorkerSpec,
    options_from_job,
    worker_specs,
)
from distnet.parallel.rayengine.groups import group_ranks, node_groups  # noqa: E402
from distnet.train.jobs.job import JobError, load_job  # noqa: E402
from distnet.train.jobs.rayjob import run_ray_job  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


# --- node groups ---------------------------------------------------------------------------
def test_ranks_are_grouped_by_node_in_order_of_their_lowest_rank():
    assert group_ranks([0, 0, 1, 1]) == [[0, 1], [2, 3]]
    assert group_ranks(["b", "a", "b", "a", "c"]) == [[0, 2], [1, 3], [4]]


def _node_collectives(comm, workers_per_node, n):
    """A node reduce and broadcast interleaved with collectives of the whole group: the
    subgroup's messages must never be taken for the parent's (or the other node's)."""
    groups = node_groups(comm, workers_per_node)
    out = {"nodes": groups.nodes, "node_index": groups.node_index}
    x = np.full(n, float(comm.rank + 1), dtype=np.float32)
    total = comm.allreduce(x.copy(), "sum")
    red = groups.node.reduce(x.copy(), root=0)
    whole = comm.allreduce(np.arange(n, dtype=np.float32) * (comm.rank + 1), "sum")
    b = np.full(n, float(comm.rank), dtype=np.float32)
    groups.node.broadcast(b, root=groups.node.size - 1)
    out.update(total=total[:3], reduced=red[:3], whole=whole[-1], bcast=b[:3])
    out["gather"] = groups.node.allgather(comm.rank)
    return out


def test_node_subgroups_reduce_and_broadcast_among_their_own_workers(ray_cluster):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    job = RayJob(RayOptions(workers=worker_specs(4)))
    try:
        job._place()
        job._setup_group()
        for n in (5, 40_000):  # inline messages, then through the object store
            res = ray.get(
                [a.apply.remote(_node_collectives, 2, n) for a in job.actors], timeout=120
            )
            _check_node_collectives(res, n)
    finally:
        job.stop()


def _check_node_collectives(res, n):
    for rank, r in enumerate(res):
        node = rank // 2
        assert r["nodes"] == [[0, 1], [2, 3]] and r["node_index"] == node
        assert np.all(r["total"] == 10.0)  # 1 + 2 + 3 + 4 over the whole group
        if rank % 2 == 0:  # the leader holds its node's sum: (2k+1) + (2k+2)
            assert np.all(r["reduced"] == 4 * node + 3)
        else:  # a non-root buffer is left as it was
            assert np.all(r["reduced"] == rank + 1)
        assert r["whole"] == (n - 1) * 10.0
        assert np.all(r["bcast"] == 2 * node + 1)  # from the node's last rank
        assert r["gather"] == [2 * node, 2 * node + 1]


# --- training --------------------------------------------------------------------------------
def test_hybrid_weights_each_node_by_its_workers_shares_of_the_global_batch(ray_cluster, digits):
    """Node 0's two workers are slow (one twice as slow as the other): they get smaller
    batches from the second epoch on, and node 0 a smaller share than node 1. The leaders'
    pushes must carry their nodes' unequal shares for the update to stay the global-batch one.
    (With one slow worker alone, load on the others once gave both nodes 16 of 32.)"""
    path = digits / "hybrid-hetero.toml"
    path.write_text(mlp_job("data/train", test="data/test", epochs=2))
    out = digits / "run-hybrid-hetero"
    job = load_job(path, {"run": {"out": str(out)}})
    slow = [WorkerSpec(delay_per_sample_s=0.001), WorkerSpec(delay_per_sample_s=0.002)]
    workers = [*slow, WorkerSpec(), WorkerSpec()]
    options = RayOptions(
        workers=workers,
        strategy="hybrid",
        ps={"mode": "sync", "workers_per_node": 2},
        rebalance_every=1,
        trace=True,
    )
    report = run_ray_job(job, options, log=lambda line: None)
    assert report["workers"] == 4 and report["nodes"] == [[0, 1], [2, 3]]
    # the shards counted 2 pushers (the node leaders), each with one push per step
    stats = report["ps_stats"][0]
    assert len(stats["workers"]) == 2
    assert [w["updates"] for w in stats["workers"]] == [report["steps"]] * 2
    # every worker reduced and received a broadcast in its node; only leaders pushed
    events = json.loads((out / "trace.json").read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    for phase in ("node_reduce", "node_broadcast"):
        assert {e["pid"] for e in events if e.get("name") == phase} == {0, 1, 2, 3}, phase
    assert {e["pid"] for e in events if e.get("name") == "push"} == {0, 2}
    sizes = [[8, 8, 8, 8], report["shares"][0]["batch_sizes"]]
    assert sum(sizes[1]) == 32 and sizes[1][1] < 8 and sum(sizes[1][:2]) < 16, sizes
    got = final_params(job, out)
    assert np.max(np.abs(got - reference_params(job, 2, 4, sizes))) < 1e-5
    # the check can fail: equal weights on the same unequal batches give another model
    assert np.max(np.abs(got - reference_params(job, 2, 4))) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("shards", [2])  # 1 shard: the test above (equal shares are its case)
def test_hybrid_sync_equals_one_process_on_the_global_batch(ray_cluster, digits, shards):
    """2 "nodes" x 2 workers, equal shares, the parameters split over 2 shards: the shards
    take one push per node (the node's sum), and the final parameters are those of one process
    on the whole global batch."""
    path = digits / f"hybrid-{shards}.toml"
    path.write_text(mlp_job("data/train", test="data/test", epochs=1))
    out = digits / f"run-hybrid-{shards}"
    job = load_job(path, {"run": {"out": str(out)}})
    options = RayOptions(
        workers=worker_specs(4),
        strategy="hybrid",
        ps={"mode": "sync", "shards": shards, "workers_per_node": 2},
    )
    report = run_ray_job(job, options, log=lambda line: None)
    assert report["nodes"] == [[0, 1], [2, 3]]
    stats = report["ps_stats"][0]
    assert len(stats["workers"]) == 2 and len(stats["shards"]) == shards
    got = final_params(job, out)
    assert np.max(np.abs(got - reference_params(job, 1, 4))) < 1e-5
    assert report["test_accuracy"] >= 0.8


@pytest.mark.slow
@pytest.mark.parametrize("lost", [0, 2])
def test_a_hybrid_job_that_loses_a_worker_ends_with_the_undisturbed_parameters(
    ray_cluster, digits, lost
):
    """A worker dies after its 30th step (of the one epoch's 42). Rank 2, the second node's leader,
    leaves the other leader waiting in the shards' sync round: the driver's abort must reach
    it, and the job resumes at the last finished global step from the shards' state. Rank 0's
    death too: the shards belong to the job (the driver's keeper), not to rank 0's actor, so a
    survivor's carry holds the state after the last finished step. Either way the job ends
    with one process's parameters on the global batch."""
    path = digits / f"hybrid-lost-{lost}.toml"
    # one epoch: the death at step 30 is mid-epoch, 12 steps before its end, as in a second one
    path.write_text(mlp_job("data/train", test="data/test", epochs=1))
    out = digits / f"run-hybrid-lost-{lost}"
    job = load_job(path, {"run": {"out": str(out)}})
    options = RayOptions(
        workers=worker_specs(4),
        strategy="hybrid",
        ps={"mode": "sync", "workers_per_node": 2},
        fail_at_step={lost: 30},
    )
    report = run_ray_job(job, options, log=lambda line: None)
    (recovery,) = report["recoveries"]
    assert recovery["lost"] == [lost] and report["generation"] == 2 and report["workers"] == 4
    assert recovery["mid_epoch"], recovery  # not the epoch again, rank 0 lost or not
    assert np.max(np.abs(final_params(job, out) - reference_params(job, 1, 4))) < 1e-5


def test_a_resumed_hybrid_stage_starts_its_shards_from_the_checkpoint(ray_cluster, digits):
    """A stage resumed from its epoch checkpoint gets new shards, made from the stage's fresh
    parameters: they must take the checkpoint's, or the run goes on from the fresh ones (plain
    SGD: the shards' optimiser state, not in the checkpoint, is empty, so resuming is exact)."""
    text = mlp_job("data/train", test="data/test", epochs=1)
    text = text.replace("momentum = 0.9", "momentum = 0.0")
    path = digits / "hybrid-resume.toml"
    path.write_text(text)
    out = digits / "run-hybrid-resume"
    job = load_job(path, {"run": {"out": str(out)}})
    options = RayOptions(
        workers=worker_specs(4), strategy="hybrid", ps={"mode": "sync", "workers_per_node": 2}
    )
    run_ray_job(job, options, log=lambda line: None)
    # as if interrupted after epoch 0: the stage is unfinished, its epoch checkpoint kept
    (out / "stages" / "0-train" / "manifest.json").unlink()
    job["finetune"]["epochs"] = 2
    report = run_ray_job(job, options, log=lambda line: None)
    assert len(report["stages"][0]["history"]["loss"]) == 2
    got = final_params(job, out)
    assert np.max(np.abs(got - reference_params(job, 2, 4))) < 1e-5


@pytest.mark.slow
def test_a_hybrid_digits_job_from_its_file_reaches_the_accuracy_bar(ray_cluster, digits, capsys):
    """``[dist] strategy = "hybrid"`` through ``distnet train``; nodes from Ray itself (one
    local node here, so one leader pushes for all four workers)."""
    dist = 'engine = "ray"\nstrategy = "hybrid"\nworkers = 4\nshards = 2'
    path = digits / "hybrid-job.toml"
    path.write_text(mlp_job("data/train", test="data/test", epochs=4, dist=dist))
    out = digits / "run-hybrid-job"
    assert cli.main(["train", str(path), "--out", str(out)]) == 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["strategy"] == "hybrid" and saved["nodes"] == [[0, 1, 2, 3]]
    assert saved["test_accuracy"] >= 0.9


@pytest.mark.slow
def test_the_hybrid_benchmark_runs_and_reports_every_contender(ray_cluster, tmp_path, capsys):
    out = tmp_path / "hybrid.json"
    args = ["bench", "ps", "--strategy", "hybrid", "--rounds", "1", "--steps", "1"]
    assert cli.main([*args, "--shards", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert sorted(result["step_ms"]) == ["allreduce", "hybrid-1", "ps-1"]
    assert all(v["median"] > 0 for v in result["step_ms"].values())
    into = result["mb_into_shards_per_step"]
    assert into["ps"] == pytest.approx(2 * into["hybrid"])  # 4 workers, 2 per node
    assert "hybrid/ps x" in capsys.readouterr().out
    assert cli.main([*args, "--workers", "3", "--workers-per-node", "2"]) == 2
    assert "multiple of --workers-per-node" in capsys.readouterr().err


def test_hybrid_ssp_pushes_each_nodes_mean_gradient(ray_cluster, digits):
    """ssp with staleness 0, plain SGD: each node's leader pushes its node's mean gradient,
    applied on arrival, and both nodes then go on from the parameters after both pushes; so a
    round is one step of 2 x lr on the global batch's mean gradient (equal nodes). A leader that
    pushed its node's share-weighted sum instead would give one step of lr."""
    text = mlp_job("data/train", test="data/test", epochs=1)
    text = text.replace("momentum = 0.9", "momentum = 0.0")
    path = digits / "hybrid-ssp.toml"
    path.write_text(text)
    out = digits / "run-hybrid-ssp"
    job = load_job(path, {"run": {"out": str(out)}})
    options = RayOptions(
        workers=worker_specs(4),
        strategy="hybrid",
        ps={"mode": "ssp", "staleness": 0, "workers_per_node": 2},
    )
    report = run_ray_job(job, options, log=lambda line: None)
    stats = report["ps_stats"][0]
    assert stats["mode"] == "ssp" and len(stats["workers"]) == 2
    assert all(w["max_ahead"] == 0 for w in stats["workers"])
    twice = {**job, "finetune": {**job["finetune"], "lr": 2 * job["finetune"]["lr"]}}
    got = final_params(job, out)
    assert np.max(np.abs(got - reference_params(twice, 1, 4))) < 1e-5
    assert np.max(np.abs(got - reference_params(job, 1, 4))) > 1e-3


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "strategy = 'bytes'",
            "[dist] strategy: expected 'allreduce', 'ps', 'hybrid' or 'local_sgd'",
        ),
        ("workers_per_node = -1", "[dist] workers_per_node: expected an integer >= 0"),
        ("workers_per_node = 1.5", "[dist] workers_per_node: expected an integer >= 0"),
    ],
)
def test_hybrid_keys_of_the_job_file_are_checked(tmp_path, text, message):
    path = tmp_path / "job.toml"
    path.write_text(f"[data]\ntrain = 'store'\n[dist]\n{text}\n")
    with pytest.raises(JobError, match=re.escape(message)):
        load_job(path)
    text = "strategy = 'hybrid'\nmode = 'async'\nworkers_per_node = 2"
    path.write_text(f"[data]\ntrain = 'store'\n[dist]\n{text}\n")
    options = options_from_job(load_job(path))
    assert options.strategy == "hybrid" and options.ps["workers_per_node"] == 2
    assert options.ps["mode"] == "async"
