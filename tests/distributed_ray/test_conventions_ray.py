"""Conventions on the Ray engine, on a real local Ray: torchrun's rank variables in every
worker actor, and every rank's console kept in the run directory
(tests/distributed_mpi/test_conventions.py has the rest)."""

from __future__ import annotations

import os
import sys

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("sklearn")

from helpers.jobs import mlp_job  # noqa: E402

from distnet import cli  # noqa: E402
from distnet.data import convert_digits  # noqa: E402
from distnet.parallel.rayengine import RayJob, RayOptions, worker_specs  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _rank_variables(comm):
    return comm.rank, {n: os.environ.get(n) for n in NAMES}


def test_every_worker_sees_torchrun_variables(ray_cluster):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import it
    job = RayJob(RayOptions(workers=worker_specs(3)))
    try:
        job._place()
        job._setup_group()
        got = ray.get([a.apply.remote(_rank_variables) for a in job.actors], timeout=120)
    finally:
        job.stop()
    # one local Ray: one node, so local ranks are the ranks
    assert got == [
        (r, {"RANK": str(r), "WORLD_SIZE": "3", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "3"})
        for r in range(3)
    ]


def test_a_ray_job_keeps_each_ranks_console_and_the_drivers(ray_cluster, tmp_path, capsys):
    convert_digits(tmp_path / "data", test_fraction=0.25, seed=0, chunk_samples=64)
    job = tmp_path / "job.toml"
    job.write_text(mlp_job("data/train", test="data/test", epochs=2, log_every=1))
    out = tmp_path / "run"
    argv = ["train", str(job), "--engine", "ray", "--workers", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    shown = capsys.readouterr().out
    assert "epoch   2/2" in shown  # rank 0's lines, printed by the driver
    log = (out / "log.txt").read_text()  # the driver's console: what the user saw
    assert "epoch   2/2" in log and "test accuracy" in log
    rank0 = (out / "logs" / "rank-0.txt").read_text()
    assert rank0.startswith("--- ") and "epoch   2/2" in rank0 and "2 rank(s)" in rank0
    assert (out / "logs" / "rank-1.txt").is_file()  # rank 1 prints nothing, but has its log
