"""A NaN sample read by ONE Ray worker gets the same decision on every worker (issue 20), on a
real local Ray (the module's ``ray_cluster``, token auth on) with real Zarr stores.

``skip``: every worker of a synchronous job skips the same step, and the final parameters
equal those of one process on the global batches with that step left out (allreduce, ps
sync with 1 and 2 shards, hybrid); in async mode the worker that read the NaN drops its own
push (the shards count one push less from it) and the others go on. ``stop``: the job fails
with NonFiniteError naming the step, the rank and the parameter, in seconds, on every
strategy, async included.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from helpers.jobs import mlp_job  # noqa: E402
from helpers.params import final_params, reference_params  # noqa: E402

from distnet.data.writer import write_dataset  # noqa: E402
from distnet.parallel.rayengine import RayOptions, worker_specs  # noqa: E402
from distnet.train.jobs.job import load_job  # noqa: E402
from distnet.train.jobs.rayjob import run_ray_job  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

FEATURES, CLASSES, N, BAD = 8, 4, 256, 100  # sample BAD holds a NaN


@pytest.fixture(scope="module")
def nan_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nonfinite")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, N)
    x[BAD, 3] = np.nan
    write_dataset(str(root / "data"), x, y, chunk_samples=32)
    return root


def run(root: Path, name: str, policy: str, workers: int, strategy: str, ps=None):
    path = root / f"{name}.toml"
    text = mlp_job("data", epochs=1).replace("[run]\n", f'[run]\non_nonfinite = "{policy}"\n')
    text = text.replace("batch_size = 32", f"batch_size = {12 * workers}")  # splits evenly
    path.write_text(text)
    out = root / f"run-{name}"
    job = load_job(path, {"run": {"out": str(out)}})
    options = RayOptions(workers=worker_specs(workers), strategy=strategy, ps=ps or {})
    return job, out, lambda: run_ray_job(job, options, log=lambda line: None)


SYNC = [
    ("allreduce", 2, "allreduce", None),
    ("ps-sync-1", 2, "ps", {"mode": "sync", "shards": 1}),
    ("ps-sync-2", 2, "ps", {"mode": "sync", "shards": 2}),
    ("hybrid", 3, "hybrid", {"mode": "sync", "workers_per_node": 2}),
]


@pytest.mark.parametrize(("name", "workers", "strategy", "ps"), SYNC, ids=[s[0] for s in SYNC])
def test_skip_drops_the_same_step_on_every_worker(ray_cluster, nan_store, name, workers,
                                                  strategy, ps):  # fmt: skip
    job, out, go = run(nan_store, f"skip-{name}", "skip", workers, strategy, ps)
    report = go()
    ref, skipped = reference_params(
        job, 1, workers, features=FEATURES, classes=CLASSES, count_skipped=True
    )
    assert skipped == 1
    got = final_params(job, out, FEATURES, CLASSES)
    assert np.isfinite(got).all()
    assert np.max(np.abs(got - ref)) < 1e-5
    if strategy == "ps":  # every worker left the same round out: the shards saw no push
        updates = [w["updates"] for w in report["ps_stats"][0]["workers"]]
        # the skipped step counts as a step taken (the loader moved on), not as an update
        assert updates == [report["steps"] - skipped] * workers, (updates, report["steps"])


STOP = [
    ("allreduce", 2, "allreduce", None),
    ("ps-sync-2", 2, "ps", {"mode": "sync", "shards": 2}),
    ("hybrid", 3, "hybrid", {"mode": "sync", "workers_per_node": 2}),
    ("ps-async", 2, "ps", {"mode": "async"}),
    ("ps-ssp", 2, "ps", {"mode": "ssp", "staleness": 0}),
]


@pytest.mark.parametrize(("name", "workers", "strategy", "ps"), STOP, ids=[s[0] for s in STOP])
def test_stop_fails_the_job_naming_step_rank_and_parameter(ray_cluster, nan_store, name,
                                                           workers, strategy, ps):  # fmt: skip
    _, _, go = run(nan_store, f"stop-{name}", "stop", workers, strategy, ps)
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="NonFiniteError") as info:
        go()
    message = str(info.value)
    assert "non-finite gradient at step" in message, message
    assert "rank(s) [" in message or "on rank " in message, message
    assert "1.weight" in message, message
    assert "CollectiveMismatch" not in message, message  # the cause, not its consequence
    assert time.perf_counter() - t0 < 120  # a hang would wait for a round's timeout


def test_async_skip_drops_only_the_nan_workers_push(ray_cluster, nan_store):
    job, out, go = run(nan_store, "skip-ps-async", "skip", 2, "ps", {"mode": "async"})
    report = go()
    assert np.isfinite(final_params(job, out, FEATURES, CLASSES)).all()
    stats = report["ps_stats"][0]
    updates = sorted(w["updates"] for w in stats["workers"])
    steps_per_worker = -(-N // 24)  # the global batch is 24 (the last one short)
    assert updates == [steps_per_worker - 1, steps_per_worker], updates


def test_ssp_skip_still_counts_the_nan_workers_step_on_the_shards(ray_cluster, nan_store):
    """ssp with bound 0: the worker that skipped its step alone pushes no gradient but its
    clock advances (a skipped step), so its peer, who may not run ahead of it, goes on."""
    job, out, go = run(nan_store, "skip-ps-ssp", "skip", 2, "ps", {"mode": "ssp", "staleness": 0})
    t0 = time.perf_counter()
    report = go()
    assert time.perf_counter() - t0 < 120  # not a round's timeout
    assert np.isfinite(final_params(job, out, FEATURES, CLASSES)).all()
    stats = report["ps_stats"][0]
    steps_per_worker = -(-N // 24)
    assert sorted(w["updates"] for w in stats["workers"]) == [steps_per_worker - 1,
                                                              steps_per_worker]  # fmt: skip
    assert [w["clock"] for w in stats["workers"]] == [steps_per_worker] * 2
    assert sorted(sum(s["steps_skipped"]) for s in stats["shards"]) == [1]


def test_hybrid_async_skip_drops_the_nan_nodes_push(ray_cluster, nan_store):
    """Hybrid async: a node's workers reduce to their leader every step, so they decide
    together (the node's leader does not push that step); the other node goes on."""
    job, out, go = run(nan_store, "skip-hybrid-async", "skip", 3, "hybrid",
                       {"mode": "async", "workers_per_node": 2})  # fmt: skip
    report = go()
    assert np.isfinite(final_params(job, out, FEATURES, CLASSES)).all()
    updates = sorted(w["updates"] for w in report["ps_stats"][0]["workers"])
    steps_per_worker = -(-N // 36)  # the global batch is 36 (the last one short)
    assert updates == [steps_per_worker - 1, steps_per_worker], updates
