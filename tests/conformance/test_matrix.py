"""The conformance matrix (distnet/train/jobs/conformance.py): every row of the pairwise covering
array is a tiny real job (one local process, real mpiexec through ``distnet launch``, or the
real local Ray ``ray_cluster`` shares, on real Zarr stores), checked by its oracle:

- sync, no noise (no dropout, no masking noise), local SGD aside: the final parameters equal
  the single-process run's on the same global batch (every step takes all 192 samples, so the
  batch does not depend on how the ranks split it), which also says every sample counted once
  per step; on
  Ray one-stage jobs the workers' sample logs count every sample id once per epoch too;
- async/ssp: the shards' own clock records show no push beyond the ssp bound, and the loss
  ends finite and lower than it began (also the oracle of rows with noise);
- a NaN sample on one rank (2 steps an epoch: one step holds it): ``stop`` fails on every
  rank naming the step, the rank and the parameter; ``skip`` ends with finite parameters,
  equal on every rank;
- resume: the run stopped after the last stage's first epoch (MPI and local: every rank;
  Ray: one worker dies) and run again ends as the undisturbed one (sync rows: the reference).

``FOCUSED`` rows hold job keys the dimensions do not, each with its own oracle:

- MPI ``[dist] rebalance = true`` with rank 1 slowed (``DISTNET_DELAY_PER_SAMPLE_S``), 4 steps
  an epoch: the split moves at epoch ends, and a step's samples depend on it; the run records
  the splits (``splits.json``) and the oracle replays them in one process (each step the ranks'
  batches concatenated): the final parameters equal that run's;
- Ray ps sync ``replicas = 2`` (primary and backup of each shard): the final parameters equal
  the one-process run's, every shard's replicas are byte-identical at the stage's end
  (``replica_check``), and the ledger shows every acknowledged push applied once;
- Ray ps ssp ``staleness = "auto"``, worker 1 slowed, 8 steps an epoch: every shard's record
  of clocks shows no push beyond the bound in force at that push (its ``in_force`` beside its
  ``ahead`` records), and the training accuracy reaches the one-process run's within 0.15.

``DISTNET_MATRIX=full`` runs every accepted configuration instead (9 072 jobs: on
request only). Rows that fail today because of a known open issue are in ``KNOWN_BROKEN``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.jobs import write_job
from helpers.matrix import SAMPLES, replaying_splits, run_rank, write_stores
from helpers.mpi import MPI_MARKS, SCRIPTS, launch

from distnet.train.jobs import conformance, jobspec

pytestmark = [pytest.mark.matrix, pytest.mark.timeout(300)]

# (predicate over a configuration, the issue item, the observed failure, predicate: not run):
# xfail(strict=False); a row that hangs is not run (it would cost its whole timeout), so
# delete its entry once the fix is merged
KNOWN_BROKEN: list[tuple[Any, str, str, Any]] = [
]  # fmt: skip


def _broken(config: dict) -> list[tuple[str, bool]]:
    """(reason, not run) of every KNOWN_BROKEN entry that holds for ``config``."""
    return [(f"{item}: {observed}", not_run(config))
            for predicate, item, observed, not_run in KNOWN_BROKEN
            if predicate(config)]  # fmt: skip


_PLAIN = {k: v[0] for k, v in conformance.DIMENSIONS.items()}
# the sync oracle on every engine and strategy with nothing else on, whatever KNOWN_BROKEN
# holds back of the covering array's rows
CORE = [{**_PLAIN, "engine": e, "strategy": s, "optimizer": "adam"}
        for e, s in (("mpi-2", "allreduce"), ("ray-2", "allreduce"), ("ray-2", "ps-2"),
                     ("ray-3", "hybrid"))]  # fmt: skip
# and a NaN on one rank under each policy (the covering array's NaN rows all hold a feature
# that KNOWN_BROKEN holds back today)
CORE += [{**_PLAIN, "engine": "mpi-2", "nonfinite": "stop"},
         {**_PLAIN, "engine": "mpi-3", "nonfinite": "skip"}]  # fmt: skip


# rows beyond the covering array: (config, [dist] keys its dimensions do not hold, the ranks'
# environment, global batch)
_SLOW_RANK_1 = {"DISTNET_DELAY_PER_SAMPLE_S": "0,0.002"}
FOCUSED: list[tuple[dict, dict, dict, int]] = [
    ({**_PLAIN, "engine": "mpi-2", "shares": "rebalance"}, {"rebalance": True},
     _SLOW_RANK_1, SAMPLES // 4),
    ({**_PLAIN, "engine": "mpi-3", "shares": "rebalance", "optimizer": "adam", "zero": True},
     {"rebalance": True}, _SLOW_RANK_1, SAMPLES // 4),
    ({**_PLAIN, "engine": "ray-2", "strategy": "ps-1", "mode": "ssp"}, {"staleness": "auto"},
     {}, SAMPLES // 8),
    ({**_PLAIN, "engine": "ray-3", "strategy": "ps-2", "mode": "ssp", "optimizer": "adam"},
     {"staleness": "auto"}, {}, SAMPLES // 8),
    ({**_PLAIN, "engine": "ray-2", "strategy": "ps-2", "optimizer": "adam"}, {"replicas": 2},
     {}, SAMPLES),
]  # fmt: skip


def _rows() -> list[dict]:
    if os.environ.get("DISTNET_MATRIX") == "full":
        return [c for c in conformance.full() if conformance.refusal(c) is None]
    rows = conformance.pairwise()
    return rows + [c for c in CORE if c not in rows]


def _param(config: dict):
    marks = []
    engine = config["engine"]
    if engine.startswith("mpi"):
        marks += MPI_MARKS
    if engine.startswith("ray"):
        marks.append(pytest.mark.ray)
    for reason, hangs in _broken(config):
        marks.append(pytest.mark.xfail(strict=False, reason=reason, run=not hangs))
    return pytest.param(config, id=conformance.name(config), marks=marks)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return write_stores(tmp_path_factory.mktemp("matrix-data"))


def _exact(config: dict) -> bool:
    """Whether the row must equal the single-process run: sync, no noise, no NaN, and every
    step averaged (local SGD with H > 1 steps each replica on its own gradient between two
    averages: tests/distributed_ray/test_local_sgd.py checks H = 1 against allreduce)."""
    return (config["mode"] == "sync" and not config["dropout"]
            and config["stage"] != "denoising" and config["nonfinite"] == "none"
            and not config["strategy"].startswith("local_sgd"))  # fmt: skip


def _sections(config: dict, stores: dict, out: Path, batch: int | None = None) -> dict:
    sections = conformance.job_sections(config)
    store = "images" if config["stage"] == "cnn" else "ids"
    nan = config["nonfinite"] != "none"
    # a NaN row takes 2 steps an epoch, so that one step of each epoch holds the NaN sample
    batch = batch or (SAMPLES // 2 if nan else SAMPLES)
    sections["data"] = {"train": stores[store + ("-nan" if nan else "")], "batch_size": batch}
    sections["run"]["out"] = str(out)
    return sections


_REFERENCES: dict[tuple, np.ndarray] = {}


def _reference(config: dict, stores: dict, root: Path) -> np.ndarray:
    """The final parameters of the same job in one local process (cached per model)."""
    key = (config["stage"], config["optimizer"])
    if key not in _REFERENCES:
        plain = {k: v[0] for k, v in conformance.DIMENSIONS.items()}
        local = {**plain, "stage": config["stage"], "optimizer": config["optimizer"]}
        out = root / f"reference-{config['stage']}-{config['optimizer']}"
        path = write_job(root / f"{out.name}.toml", _sections(local, stores, out))
        assert run_rank(str(path)) == 0
        _REFERENCES[key] = np.load(out / "params-rank0.npy")
    return _REFERENCES[key]


def _ray_params(job: dict, out: Path) -> np.ndarray:
    """The final flat parameters of a Ray run, from its last stage checkpoint."""
    from distnet import backend  # noqa: PLC0415
    from distnet.data import open_dataset  # noqa: PLC0415
    from distnet.train.jobs.job import build_model, sample_image_shape  # noqa: PLC0415
    from distnet.train.loop.checkpoint import load_checkpoint  # noqa: PLC0415

    train = open_dataset(job["data"]["train"])
    backend.seed(job["run"]["seed"])
    model = build_model(job, int(np.prod(train.shape[1:])), 10, sample_image_shape(train.shape[1:]))
    load_checkpoint(sorted((out / "stages").iterdir())[-1], model)
    return np.concatenate([np.asarray(p.data).ravel() for p in model.parameters()])


def _replayed_reference(
    config: dict, stores: dict, root: Path, batch: int, out: Path
) -> np.ndarray:
    """The final parameters of the job in one local process that iterates, step by step, the
    samples the ranks iterated under the splits the run recorded (``splits.json``)."""
    splits = json.loads((out / "splits.json").read_text())
    local = {**_PLAIN, "stage": config["stage"], "optimizer": config["optimizer"]}
    ref_out = root / "replayed"
    path = write_job(root / "replayed.toml", _sections(local, stores, ref_out, batch))
    with replaying_splits(splits, conformance.ranks(config)):
        assert run_rank(str(path)) == 0
    return np.load(ref_out / "params-rank0.npy")


def _local_accuracy(config: dict, stores: dict, root: Path, batch: int) -> float:
    """The final training accuracy of the job in one local process."""
    local = {**_PLAIN, "stage": config["stage"], "optimizer": config["optimizer"]}
    out = root / "one-process"
    path = write_job(root / "one-process.toml", _sections(local, stores, out, batch))
    assert run_rank(str(path)) == 0
    return json.loads((out / "pipeline.json").read_text())["stages"][-1]["history"]["accuracy"][-1]


def _run_ray(config: dict, path: Path, out: Path, slow: float = 0.0) -> dict:
    from distnet.parallel.rayengine import options_from_job  # noqa: PLC0415
    from distnet.train.jobs.job import load_job  # noqa: PLC0415
    from distnet.train.jobs.rayjob import run_ray_job  # noqa: PLC0415

    job = load_job(path)
    options = options_from_job(job)
    if config["stage"] != "cnn":  # the sample log reads ids from flat samples' last column
        options.sample_log = str(out.parent / f"{out.name}-samples")
    options.collective_timeout_s = 60.0
    if slow:  # worker 1 sleeps this long per sample of each step
        options.workers[1].delay_per_sample_s = slow
    if config["resume"] and config["nonfinite"] != "stop":  # the last worker dies at its
        # second step; the job goes on
        options.fail_at_step = {conformance.ranks(config) - 1: 2}
    try:
        report = run_ray_job(job, options, log=lambda line: None)
    except Exception as e:  # noqa: BLE001  (the oracle reads what it says)
        return {"rc": 1, "text": f"{type(e).__name__}: {e}"}
    result = {"rc": 0, "text": "", "params": [_ray_params(job, out)], "report": report}
    if options.sample_log:
        result["samples"] = Path(options.sample_log)
    return result


def _run_ranks(config: dict, path: Path, out: Path, env: dict | None = None) -> dict:
    n = conformance.ranks(config)
    script = str(SCRIPTS / "matrix_rank.py")
    if config["engine"] == "local":
        runs = [lambda crash: _local(path, crash)]
    else:
        runs = [lambda crash: _mpi(n, script, path, crash, env)]
    rc, text = 0, ""
    if config["resume"] and config["nonfinite"] != "stop":  # a stop ends the run before
        rc, text = runs[0](True)
        assert rc == 3, f"the planned stop did not happen (rc {rc}):\n{text[-3000:]}"
    rc, text = runs[0](False)
    params = [np.load(out / f"params-rank{r}.npy") for r in range(n)] if rc == 0 else []
    return {"rc": rc, "text": text, "params": params}


def _local(path: Path, crash: bool) -> tuple[int, str]:
    try:
        return run_rank(str(path), crash), ""
    except Exception as e:  # noqa: BLE001  (NonFiniteError: the oracle reads it)
        return 1, f"{type(e).__name__}: {e}"


def _mpi(n: int, script: str, path: Path, crash: bool, env: dict | None) -> tuple[int, str]:
    proc = launch(n, script, str(path), *(["crash"] if crash else []), timeout=120, env=env)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("config", [_param(c) for c in _rows()])
def test_matrix_row(config, stores, tmp_path, request):
    _check_row(config, stores, tmp_path, request, os.environ.get("DISTNET_MATRIX_DEVICE", "cpu"))


def _focused_param(row: tuple) -> Any:
    config, dist, _, _ = row
    keys = "-".join(f"{k}={v}" for k, v in dist.items())
    return pytest.param(row, id=f"{conformance.name(config)}-{keys}", marks=_param(config).marks)


@pytest.mark.parametrize("row", [_focused_param(r) for r in FOCUSED])
def test_focused_row(row, stores, tmp_path, request):
    config, dist, env, batch = row
    out = tmp_path / "run"
    sections = _sections(config, stores, out, batch)
    sections["dist"].update(dist)
    jobspec.validate(sections, "")  # accepted, as the matrix's rows are
    path = write_job(tmp_path / "job.toml", sections)
    started = time.monotonic()
    if config["engine"].startswith("ray"):
        request.getfixturevalue("ray_cluster")
        slow = 0.002 if dist.get("staleness") == "auto" else 0.0  # auto needs a slow worker
        result = _run_ray(config, path, out, slow=slow)
    else:
        result = _run_ranks(config, path, out, env)
    print(f"{request.node.callspec.id}: rc {result['rc']} in {time.monotonic() - started:.1f}s")
    assert result["rc"] == 0, result["text"][-5000:]
    params = result["params"]
    assert all(np.isfinite(p).all() for p in params), "non-finite parameters"
    history = json.loads((out / "pipeline.json").read_text())["stages"][-1]["history"]
    assert np.isfinite(history["loss"]).all() and history["loss"][-1] < history["loss"][0]
    if dist.get("rebalance"):
        splits = json.loads((out / "splits.json").read_text())
        n = conformance.ranks(config)
        assert any(s["batch_sizes"] != [batch // n] * n for s in splits), splits  # it moved
        for r, p in enumerate(params[1:], 1):  # replicas stay equal
            np.testing.assert_allclose(p, params[0], rtol=1e-5, atol=1e-6, err_msg=f"rank {r}")
        ref = _replayed_reference(config, stores, tmp_path, batch, out)
        np.testing.assert_allclose(params[0], ref, rtol=2e-4, atol=2e-4)
    if dist.get("replicas") == 2:  # sync: the one-process run; both replicas byte-identical
        ref = _reference(config, stores, tmp_path.parent)  # the matrix's rows' batch
        np.testing.assert_allclose(params[0], ref, rtol=2e-4, atol=2e-4)
        stats = result["report"].get("ps_stats") or []
        assert stats and all(s["replica_check"]["ok"] for s in stats), stats
        assert all(s["ledger"]["ok"] for s in stats), [s["ledger"] for s in stats]
    if dist.get("staleness") == "auto":
        stats = [s for s in result["report"].get("ps_stats") or [] if s["mode"] == "ssp"]
        assert stats, "no clock records from the shards"
        for shard in (shard for s in stats for shard in s["shards"]):
            auto = shard["auto_staleness"]
            for w, records in enumerate(shard["ahead"]):
                bounds = auto["in_force"][w]
                assert len(bounds) == len(records) > 0, (shard["shard"], w)
                over = [(c, s, b) for (c, s), b in zip(records, bounds, strict=True) if c - s > b]
                assert not over, (shard["shard"], w, over[:5])
        # the slowed worker moved the bound off 0 (then the fast one may run ahead)
        assert any(shard["auto_staleness"]["history"] for s in stats for shard in s["shards"])
        bar = _local_accuracy(config, stores, tmp_path, batch) - 0.15
        print(
            f"accuracy {history['accuracy'][-1]:.3f}, bar {bar:.3f}, bounds "
            f"{[sh['auto_staleness']['history'] for s in stats for sh in s['shards']]}"
        )
        assert history["accuracy"][-1] >= bar, (history["accuracy"], bar)


def _cuda_rows() -> list:
    rows = [c for c in conformance.pairwise() if c["engine"] == "local"]
    return [_param(c) for c in rows if _exact(c)]


@pytest.mark.gpu
@pytest.mark.parametrize("config", _cuda_rows())
def test_matrix_row_on_cuda(config, stores, tmp_path, request):
    """The one-process rows on a GPU, against the CPU reference (the whole matrix on a GPU:
    DISTNET_MATRIX_DEVICE=cuda; several ranks on one GPU are issue 20 item 8)."""
    _check_row(config, stores, tmp_path, request, "cuda")


def _check_row(config: dict, stores: dict, tmp_path: Path, request, device: str) -> None:
    if device != "cpu":
        from distnet.backend import gpu_skip_reason  # noqa: PLC0415

        if (reason := gpu_skip_reason()) is not None:
            pytest.skip(f"device {device}: {reason}")
    assert conformance.refusal(config) is None
    out = tmp_path / "run"
    sections = _sections(config, stores, out)
    sections["run"]["device"] = device
    path = write_job(tmp_path / "job.toml", sections)
    started = time.monotonic()
    if config["engine"].startswith("ray"):
        request.getfixturevalue("ray_cluster")
        result = _run_ray(config, path, out)
    else:
        result = _run_ranks(config, path, out)
    seconds = time.monotonic() - started
    text = result["text"]
    print(f"{conformance.name(config)}: rc {result['rc']} in {seconds:.1f}s")

    if config["nonfinite"] == "stop":  # every rank stops, naming step, rank and parameter
        assert result["rc"] != 0, "a NaN sample under on_nonfinite = 'stop' did not stop"
        assert "non-finite" in text and "at step" in text and "'" in text, text[-3000:]
        if config["engine"] != "local":
            assert "rank" in text, text[-3000:]
        if config["engine"].startswith("mpi"):
            assert text.count("NonFiniteError") >= conformance.ranks(config), text[-3000:]
        return
    assert result["rc"] == 0, text[-5000:]
    params = result["params"]
    for p in params:
        assert np.isfinite(p).all(), "non-finite parameters"
    if config["strategy"] == "allreduce" or config["mode"] == "sync":
        for r, p in enumerate(params[1:], 1):  # replicas stay equal
            np.testing.assert_allclose(p, params[0], rtol=1e-5, atol=1e-6, err_msg=f"rank {r}")
    if config["nonfinite"] == "skip":
        return
    history = json.loads((out / "pipeline.json").read_text())["stages"][-1]["history"]["loss"]
    assert np.isfinite(history).all() and history[-1] < history[0], history
    if _exact(config):
        ref = _reference(config, stores, tmp_path.parent)
        tol = 2e-3 if config["compression"] == "fp16" or device != "cpu" else 2e-4
        np.testing.assert_allclose(params[0], ref, rtol=tol, atol=tol)
    report = result.get("report") or {}
    if config["mode"] == "ssp":
        assert report.get("ps_stats"), "no clock records from the shards"
    for stats in report.get("ps_stats") or []:  # the shards' own clock records
        if stats["mode"] == "ssp":
            for shard in stats["shards"]:
                for records in shard["ahead"]:
                    gaps = [clock - slowest for clock, slowest in records]
                    assert max(gaps, default=0) <= stats["staleness_bound"], gaps
    if "samples" in result and config["stage"] == "mlp" and not config["resume"]:
        from helpers.sample_counts import assert_every_sample_once, finished_by_generation  # noqa: PLC0415

        ids = np.sort((np.arange(SAMPLES, dtype=np.float32) + 1) / 10000)
        records = finished_by_generation(result["samples"])
        assert_every_sample_once(records, ids, epochs=3, recoveries=[])


def test_the_rows_run_on_every_engine_strategy_and_mode():
    rows = conformance.pairwise()
    seen = {(k, c[k]) for c in rows for k in ("engine", "strategy", "mode")}
    assert seen == {(k, v) for k in ("engine", "strategy", "mode")
                    for v in conformance.DIMENSIONS[k]}  # fmt: skip
    assert sys.executable  # the MPI rows run this interpreter's mpiexec
