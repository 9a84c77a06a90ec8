"""``distnet bench e2e``'s job file (no PyTorch needed: the run against PyTorch is in
``tests/bench/test_bench_e2e.py``)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("engine", ["local", "mpi"])
def test_the_job_file_it_writes_runs_on_one_rank_and_under_the_launcher(tmp_path, engine):
    """The resolved job written back as TOML loads without a conflict on either engine the
    benchmark runs it on (one rank: ``--engine local``; ``--np N``: MPI); a default written
    out counted as set, and ``rebalance_every`` was refused on one rank."""
    from distnet.bench import e2e  # noqa: PLC0415
    from distnet.train.jobs.load import load_job  # noqa: PLC0415

    job = load_job(e2e.DEFAULT_JOB, {"run": {"out": str(tmp_path / "run")}})
    path = tmp_path / "job.toml"
    e2e._write_job(job, path, tmp_path / "out")
    again = load_job(path, {"dist": {"engine": engine}})
    assert again["model"] == job["model"] and again["finetune"] == job["finetune"]
    assert again["dist"]["engine"] == engine
