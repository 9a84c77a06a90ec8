"""The Ray engine on a real local Ray (the shared local Ray of tests/conftest.py, token auth on).

Workers are real actors in their own processes; collectives go through Ray's object store.
"""

from __future__ import annotations

import glob
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("sklearn")

from helpers.jobs import mlp_job, write_job  # noqa: E402
from helpers.params import final_params, reference_params  # noqa: E402
from helpers.processes import pids_alive_after  # noqa: E402

from distnet import backend, cli  # noqa: E402
from distnet.data import digits_arrays, write_dataset  # noqa: E402
from distnet.parallel.rayengine import (  # noqa: E402
    RayJob,
    RayOptions,
    WorkerSpec,
    start_ray,
    worker_specs,
)
from distnet.train.jobs.job import load_job, run_job  # noqa: E402
from distnet.train.jobs.rayjob import run_rank, run_ray_job  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def test_a_local_ray_without_token_authentication_is_refused(monkeypatch):
    from distnet.parallel.rayengine import RayEngineError  # noqa: PLC0415

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(RayEngineError, match="only with token authentication"):
        start_ray(None)


# --- the communicator ----------------------------------------------------------------------
def _collectives(comm, n):
    rng = np.random.default_rng(comm.rank)
    out = {}
    for dtype in ("float32", "float64"):
        x = rng.normal(size=n).astype(dtype)
        out[f"in_{dtype}"] = x.copy()
        for op in ("sum", "mean", "max", "min"):
            buf = x.copy()
            comm.allreduce(buf, op)
            out[f"{op}_{dtype}"] = buf
    b = np.full((3, 5), float(comm.rank), dtype=np.float32)
    out["bcast"] = comm.broadcast(b, root=comm.size - 1)
    out["gather"] = comm.allgather({"rank": comm.rank})
    comm.barrier()
    return out


def test_collectives_of_three_actors(ray_cluster):
    import sys  # noqa: PLC0415

    # the workers cannot import this test module: send _collectives by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    job = RayJob(RayOptions(workers=worker_specs(3)))
    try:
        job._place()
        job._setup_group()
        for n in (7, 100_003):  # chunks inline in the messages, then through the object store
            res = ray.get([a.apply.remote(_collectives, n) for a in job.actors], timeout=120)
            _check_collectives(res)
    finally:
        job.stop()


def _check_collectives(res):
    for dtype in ("float32", "float64"):
        xs = np.stack([r[f"in_{dtype}"] for r in res]).astype(np.float64)
        tol = 1e-5 if dtype == "float32" else 1e-12
        for op, want in (("sum", xs.sum(0)), ("mean", xs.mean(0)), ("max", xs.max(0)),
                         ("min", xs.min(0))):  # fmt: skip
            for r in res:
                np.testing.assert_allclose(r[f"{op}_{dtype}"], want, rtol=tol, atol=tol)
            # every rank holds the same bits (one owner sums each chunk)
            assert all(np.array_equal(r[f"{op}_{dtype}"], res[0][f"{op}_{dtype}"]) for r in res)
    for r in res:
        assert np.all(r["bcast"] == 2.0)
        assert r["gather"] == [{"rank": i} for i in range(3)]


# --- training ------------------------------------------------------------------------------
def test_ray_allreduce_training_equals_one_process_on_the_global_batch(ray_cluster, digits):
    path = write_job(digits / "mlp.toml", mlp_job("data/train", test="data/test", epochs=2))
    out = digits / "run-ray"
    job = load_job(path, {"run": {"out": str(out)}, "dist": {"engine": "ray"}})
    report = run_ray_job(job, RayOptions(workers=worker_specs(2)), log=lambda line: None)
    assert report["workers"] == 2 and report["engine"] == "RayCommunicator"
    got = final_params(job, out)
    want = reference_params(job, 2, 2, [[16, 16]] * 2)
    assert np.max(np.abs(got - want)) < 1e-5
    assert report["test_accuracy"] >= 0.85


def test_shares_follow_throughput_and_the_update_stays_the_global_batch_one(ray_cluster, digits):
    path = write_job(digits / "hetero.toml", mlp_job("data/train", test="data/test", epochs=3))
    out = digits / "run-hetero"
    job = load_job(path, {"run": {"out": str(out)}})
    slow = WorkerSpec(delay_per_sample_s=0.002)  # rank 1: ~30x slower per sample
    options = RayOptions(workers=[WorkerSpec(), slow], rebalance_every=1)
    report = run_ray_job(job, options, log=lambda line: None)
    shares = report["shares"]
    assert len(shares) == 3  # measured at every epoch end (rebalance_every=1)
    assert json.loads((out / "report.json").read_text())["shares"] == shares
    fast, slow_size = shares[0]["batch_sizes"]
    assert fast + slow_size == 32 and fast >= 22, shares  # the fast worker takes most
    sizes = [[16, 16], shares[0]["batch_sizes"], shares[1]["batch_sizes"]]
    got = final_params(job, out)
    want = reference_params(job, 3, 2, sizes)
    assert np.max(np.abs(got - want)) < 1e-5
    # the check can fail: equal weights on the same unequal batches give another model
    assert np.max(np.abs(got - reference_params(job, 3, 2, [[16, 16]] * 3))) > 1e-3


@pytest.mark.slow
@pytest.mark.load_scaled  # 3 jobs of 28 epochs (local, Ray, Ray skipped): 64 s at load 25
def test_stacked_autoencoder_job_on_ray_matches_one_process(ray_cluster, digits, capsys):
    text = mlp_job("data/train", test="data/test", epochs=20).replace(
        'type = "mlp"', 'type = "stacked_autoencoder"'
    )
    text = text.replace("hidden = [32]", "hidden = [100, 100]").replace('"tanh"', '"sigmoid"')
    text = text.replace('optimizer = "sgd"\nlr = 0.1', 'optimizer = "adam"\nlr = 0.003')
    text += "\n[pretrain]\nepochs = 4\ncorruption = 0.1\n"
    path = write_job(digits / "sae.toml", text)
    local_job = load_job(path, {"run": {"out": str(digits / "sae-local")}})
    local_job["dist"]["engine"] = "local"
    local = run_job(local_job, log=lambda line: None)
    out = digits / "sae-ray"
    argv = ["train", str(path), "--engine", "ray", "--workers", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 rank(s) x batch 16 (engine RayCommunicator)" in printed  # rank 0's progress
    assert "[stage 3/3] finetune: done" in printed and printed.count("test accuracy") == 1
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["pretrain-0", "pretrain-1", "finetune"]
    assert report["workers"] == 2 and report["job"]["dist"]["engine"] == "ray"
    assert report["test_accuracy"] >= 0.95
    assert abs(report["test_accuracy"] - local["test_accuracy"]) <= 0.01
    # run again: every stage is skipped (the checkpoints are the same as on MPI)
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count("done, skipped") == 3


def _id_store(root):
    """Digits with a last feature column carrying each sample's id (1344 = 42 batches of 32)."""
    x, y = digits_arrays()
    n = 1344
    ids = (np.arange(n, dtype=np.float32) + 1) / 10000
    xs = np.concatenate([x[:n].astype(np.float32) / 16, ids[:, None]], axis=1)
    if not (root / "ids" / "train").exists():
        write_dataset(str(root / "ids" / "train"), xs, y[:n], chunk_samples=64)
    return np.sort(ids.astype(np.float32))


@pytest.mark.parametrize("replace", [True, False])
def test_killed_worker_is_replaced_and_every_sample_counts_once(ray_cluster, digits, replace):
    """replace=False: no new actor, the survivor carries on alone (--min-workers 1)."""
    ids = _id_store(digits)
    text = mlp_job("ids/train", epochs=3)
    path = write_job(digits / "elastic.toml", text)
    log_dir = digits / f"samples-{replace}"
    job = load_job(path, {"run": {"out": str(digits / f"run-elastic-{replace}")}})
    # rank 1 exits hard after its 50th step: in epoch 1 (42 steps an epoch); the fallback
    # path (the epoch redone from its checkpoint; test_ray_elastic.py: the mid-epoch resume)
    options = RayOptions(workers=worker_specs(2), fail_at_step={1: 50}, sample_log=str(log_dir),
                         min_workers=1, replace_lost=replace, mid_epoch_resume=False)  # fmt: skip
    rj = RayJob(options, log=lambda line: None, task=run_rank)
    report = rj.run(job)
    assert report["generation"] == 2 and len(report["failures"]) == 1
    assert report["workers"] == (2 if replace else 1)
    assert len(list(log_dir.glob("rank*-gen2.jsonl"))) == report["workers"]
    records: dict[int, dict[int, list[float]]] = {}  # generation -> epoch -> ids
    for f in sorted(log_dir.glob("rank*-gen*.jsonl")):
        gen = int(f.stem.split("gen")[1])
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if "incomplete" in rec:  # a step the death interrupted: computed, never applied
                continue
            records.setdefault(gen, {}).setdefault(rec["epoch"], []).extend(rec["ids"])
    assert sorted(records) == [1, 2]
    assert sorted(records[1]) == [0, 1]  # epoch 0 done, epoch 1 interrupted
    assert len(records[1][1]) < len(ids)  # ... part way
    assert sorted(records[2]) == [1, 2]  # resumed at epoch 1 from the epoch-0 checkpoint
    counted = {0: records[1][0], 1: records[2][1], 2: records[2][2]}
    for epoch, seen in counted.items():
        np.testing.assert_array_equal(np.sort(np.array(seen, np.float32)), ids, f"epoch {epoch}")
    # no actor outlives its job
    assert pids_alive_after([info["pid"] for info in report["worker_info"]]) == []


def test_ctrl_c_stops_every_actor_and_the_checkpoint_resumes(ray_cluster, digits):
    path = write_job(digits / "sigint.toml", mlp_job("data/train", test="data/test", epochs=400))
    out = digits / "run-sigint"
    job = load_job(path, {"run": {"out": str(out)}})
    rj = RayJob(RayOptions(workers=worker_specs(2)), log=lambda line: None, task=run_rank)

    over = threading.Event()

    def interrupt_after_two_epochs():
        # no fixed deadline (one ran out on a loaded machine before the first checkpoint, and
        # the SIGINT came too early): the test's timeout bounds the wait
        while not glob.glob(str(out / "stages/*/progress")):
            if over.is_set():
                return
            time.sleep(0.1)
        import signal  # noqa: PLC0415

        os.kill(os.getpid(), signal.SIGINT)

    import signal  # noqa: PLC0415

    # Ctrl-C as a terminal gives it: Python's own handler, whatever an earlier test installed
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt_after_two_epochs, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            rj.run(job)
    finally:
        over.set()
        signal.signal(signal.SIGINT, before)
    assert rj.worker_info
    assert pids_alive_after([info["pid"] for info in rj.worker_info]) == []
    # the last checkpoint is usable: the job resumes from it and finishes one more epoch
    progress = glob.glob(str(out / "stages/*/progress"))[0]
    done = int(json.loads((Path(progress) / "manifest.json").read_text())["extra"]["epoch"])
    job["finetune"]["epochs"] = done + 1
    resumed = run_ray_job(job, RayOptions(workers=worker_specs(2)), log=lambda line: None)
    assert len(resumed["stages"][0]["history"]["loss"]) == done + 1
    assert resumed["test_accuracy"] > 0.5


def test_ps_strategy_sync_equals_one_process_on_the_global_batch(ray_cluster, digits):
    pytest.importorskip("distnet.parallel.ps", reason="the parameter server (ray-ps) is not here")
    path = write_job(digits / "ps.toml", mlp_job("data/train", test="data/test", epochs=1))
    out = digits / "run-ps"
    job = load_job(path, {"run": {"out": str(out), "report": True}})
    options = RayOptions(
        workers=worker_specs(2), strategy="ps", ps={"mode": "sync", "shards": 2}, trace=True
    )
    report = run_ray_job(job, options, log=lambda line: None)
    # the timeline has every worker's push and pull; the page shows each worker's staleness
    events = json.loads((out / "trace.json").read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    for phase in ("push", "pull", "forward", "backward"):
        assert {e["pid"] for e in events if e.get("name") == phase} == {0, 1}, phase
    page = (out / "report.html").read_text()
    data = json.loads(page.split('id="distnet-report-data">', 1)[1].split("</script>", 1)[0])
    assert sorted(data["staleness"]) == ["0", "1"]  # sync: every update applied fresh
    assert all(set(h) == {"0"} and h["0"] > 0 for h in data["staleness"].values())
    got = final_params(job, out)
    want = reference_params(job, 1, 2, [[16, 16]])
    assert np.max(np.abs(got - want)) < 1e-5
    assert len(report["ps_stats"]) == 1  # the stage's server: clocks and staleness reported
    from distnet.parallel.ps import link

    if link.enabled():  # every push took the same-node road (the workers' memfd outboxes)
        for shard in report["ps_stats"][0]["shards"]:
            assert shard["linked_pushes"] == shard["pushes_received"] == [report["steps"]] * 2
    assert json.loads((out / "report.json").read_text())["ps_stats"] == json.loads(
        json.dumps(report["ps_stats"], default=str)
    )
    assert report["test_accuracy"] >= 0.8


@pytest.mark.gpu
@pytest.mark.skipif(backend.gpu_skip_reason() is not None, reason="needs a CUDA GPU and cupy")
def test_a_gpu_worker_and_a_cpu_worker_train_together(ray_cluster, digits):
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the local Ray sees no GPU")
    path = write_job(digits / "mixed.toml", mlp_job("data/train", test="data/test", epochs=2))
    out = digits / "run-mixed"
    job = load_job(path, {"run": {"out": str(out)}})
    workers = [WorkerSpec("cuda", 1.0, 1.0), WorkerSpec("cpu")]
    report = run_ray_job(job, RayOptions(workers=workers, rebalance_every=1), log=print)
    assert report["workers"] == 2 and len(report["shares"]) == 2
    # GPU gradients go through host memory in a mixed group: still the global-batch update
    got = final_params(job, out)
    want = reference_params(job, 2, 2, [[16, 16], report["shares"][0]["batch_sizes"]])
    assert np.max(np.abs(got - want)) < 1e-4


def test_the_local_rays_workers_run_at_normal_priority(ray_cluster):
    """Ray's default, nice 15, left a worker ~3% of a core beside one busy process."""
    niceness = ray.remote(lambda: os.nice(0))
    assert ray.get(niceness.remote(), timeout=60) == os.nice(0)


def test_ray_options_that_cannot_run_fail_cleanly_before_ray_starts(digits, capsys):
    path = write_job(digits / "bad.toml", mlp_job("data/train", test="data/test", epochs=1))
    base = ["train", str(path), "--engine", "ray", "--out", str(digits / "run-bad")]
    assert cli.main([*base, "--workers", "2", "--min-workers", "5"]) == 2
    assert "--min-workers 5 must be in 1..2" in capsys.readouterr().err
    assert cli.main([*base, "--workers", "0"]) == 2
    assert "need at least one worker" in capsys.readouterr().err
    assert cli.main([*base, "--set", "dist.strategy=gossip"]) == 2
    assert (
        "[dist] strategy: expected 'allreduce', 'ps', 'hybrid' or 'local_sgd'"
        in capsys.readouterr().err
    )
    assert cli.main([*base, "--address", "127.0.0.1:1"]) == 2
    assert "--address 127.0.0.1:1: nothing answers there" in capsys.readouterr().err
    assert not (digits / "run-bad").exists()  # nothing half-written
