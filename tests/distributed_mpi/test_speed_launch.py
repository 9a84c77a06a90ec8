"""distnet launch: per-rank thread counts (BLAS, OpenMP, numba) and core binding."""

from __future__ import annotations

import argparse

import pytest

from distnet.parallel.mpi import launcher


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(launcher, "_usable_cores", lambda: 2)
    monkeypatch.setattr(launcher, "mpiexec_flavor", lambda mpiexec: "hydra")
    for var in launcher.THREAD_VARIABLES:
        monkeypatch.delenv(var, raising=False)


def _prepare(*argv: str):
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    return launcher.prepare(parser.parse_args([*argv, "--", "python", "-c", "1"]))


def test_two_ranks_on_two_cores_get_one_thread_each_and_are_bound(two_cores):
    # one machine: mpiexec.gforker (no port open) cannot bind; each rank's wrapper does
    cmd, env = _prepare("-np", "2")
    assert all(env[v] == "1" for v in launcher.THREAD_VARIABLES)
    assert env["DISTNET_BIND_CORES"] == "1" and "-bind-to" not in cmd
    # hydra (an explicit mpiexec) binds itself
    hydra = str(__import__("pathlib").Path(__import__("sys").executable).parent / "mpiexec")
    cmd, env = _prepare("-np", "2", "--mpiexec", hydra)
    assert cmd[3:5] == ["-bind-to", "core:1"] and "DISTNET_BIND_CORES" not in env


def test_one_rank_gets_every_core(two_cores):
    cmd, env = _prepare("-np", "1")
    assert env["NUMBA_NUM_THREADS"] == "2" and env["DISTNET_BIND_CORES"] == "2"


def test_user_settings_win_and_oversubscribed_or_remote_ranks_are_not_bound(two_cores, monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "7")
    cmd, env = _prepare("-np", "4")
    assert "NUMBA_NUM_THREADS" not in env and env["OMP_NUM_THREADS"] == "1"
    assert "-bind-to" not in cmd and "DISTNET_BIND_CORES" not in env  # 4 ranks on 2 cores
    cmd, env = _prepare("-np", "2", "-H", "a:1,b:1")
    assert "-bind-to" not in cmd and "DISTNET_BIND_CORES" not in env
    cmd, env = _prepare("-np", "2", "--no-bind")
    assert "-bind-to" not in cmd and "DISTNET_BIND_CORES" not in env
    assert launcher.binding_options("openmpi", 2, None, 1) == []


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_ranks_really_run_on_their_own_cores():
    import os
    import subprocess
    import sys
    from pathlib import Path

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 usable cores")
    distnet = str(Path(sys.executable).parent / "distnet")
    code = "import os; print(sorted(os.sched_getaffinity(0)))"
    cmd = [distnet, "launch", "-np", "2", "--", sys.executable, "-c", code]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    got = sorted(proc.stdout.splitlines())
    per_rank = len(cores) // 2
    assert got == [f"[0] {cores[:per_rank]}", f"[1] {cores[per_rank : 2 * per_rank]}"], got
