"""distnet launch: per-rank thread counts (BLAS, OpenMP, numba) and core binding."""

from __future__ import annotations

import argparse

import pytest

from distnet.parallel import launcher


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
    cmd, env = _prepare("-np", "2")
    assert all(env[v] == "1" for v in launcher.THREAD_VARIABLES)
    assert cmd[3:5] == ["-bind-to", "core:1"]


def test_one_rank_gets_every_core(two_cores):
    cmd, env = _prepare("-np", "1")
    assert env["NUMBA_NUM_THREADS"] == "2" and cmd[3:5] == ["-bind-to", "core:2"]


def test_user_settings_win_and_oversubscribed_or_remote_ranks_are_not_bound(two_cores, monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "7")
    cmd, env = _prepare("-np", "4")
    assert "NUMBA_NUM_THREADS" not in env and env["OMP_NUM_THREADS"] == "1"
    assert "-bind-to" not in cmd  # 4 ranks on 2 cores: binding would pile them up
    cmd, _ = _prepare("-np", "2", "-H", "a:1,b:1")
    assert "-bind-to" not in cmd
    cmd, _ = _prepare("-np", "2", "--no-bind")
    assert "-bind-to" not in cmd
    assert launcher.binding_options("openmpi", 2, None, 1) == []
