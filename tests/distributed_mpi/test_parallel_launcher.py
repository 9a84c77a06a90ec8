"""``distnet launch``: every bad invocation fails before anything starts, with a clear message."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distnet.parallel.mpi import launcher

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-np", "0", "--", "echo"], "-np must be at least 1"),
        (["-np", "2", "--", "no-such-command-xyz"], "command not found"),
        (["-np", "2", "--", "./no/such/script.sh"], "not executable"),
        (["-np", "2"], "no command given"),
        (["-np", "3", "-H", "a:1,b:1", "--", "echo"], "needs 3 slots"),
        (["-np", "2", "-H", "a:zero", "--", "echo"], "bad slot count"),
        (["-np", "2", "-H", "a:0", "--", "echo"], "bad slot count"),
        (["-np", "2", "--hostfile", "/no/such/hostfile", "--", "echo"], "does not exist"),
        (["-np", "2", "--env", "NOEQUALS", "--", "echo"], "expected NAME=VALUE"),
        (["-np", "2", "--mpiexec", "/no/mpiexec", "--", "echo"], "not an executable"),
    ],
)
def test_bad_invocations_fail_before_starting(argv, message, capsys):
    assert launcher.run(parsed(*argv)) == 2
    err = capsys.readouterr().err
    assert "distnet launch: error:" in err and message in err


def test_a_bad_interrupt_grace_is_refused_before_starting(capsys, monkeypatch):
    monkeypatch.setenv("DISTNET_INTERRUPT_GRACE_S", "soon")
    assert launcher.run(parsed("-np", "2", "--", "echo")) == 2
    assert "DISTNET_INTERRUPT_GRACE_S: expected seconds >= 0, got 'soon'" in capsys.readouterr().err


def test_unknown_flag_and_both_host_options_are_refused(capsys):
    for argv in (
        ["-np", "2", "--frobnicate", "--", "echo"],
        ["-np", "2", "-H", "a", "--hostfile", "f", "--", "echo"],
    ):
        with pytest.raises(SystemExit) as exc:
            parsed(*argv)
        assert exc.value.code == 2


def test_hostfile_formats(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# comment\nnode1:4\nnode2 slots=2  # Open MPI style\n\nnode3\n")
    assert launcher.parse_hostfile(str(f)) == [
        launcher.Host("node1", 4),
        launcher.Host("node2", 2),
        launcher.Host("node3", 1),
    ]
    f.write_text("node1 4 extra\n")
    with pytest.raises(launcher.LaunchError, match=r"hosts:1: cannot read"):
        launcher.parse_hostfile(str(f))
    f.write_text("b:2 slots=3\n")
    with pytest.raises(launcher.LaunchError, match=r"hosts:1: .* gives slots twice"):
        launcher.parse_hostfile(str(f))
    f.write_text("# nothing\n")
    with pytest.raises(launcher.LaunchError, match="names no hosts"):
        launcher.parse_hostfile(str(f))


def test_dry_run_builds_hydra_and_openmpi_commands(capsys):
    args = parsed("-np", "4", "-H", "a:2,b:2", "--env", "K=V", "--dry-run", "--", "echo", "x")
    assert launcher.run(args) == 0
    out = capsys.readouterr().out
    assert "-n 4 -hosts a:2,b:2 -genv K V" in out and "DISTNET_TAGGED_OUTPUT 1" in out
    assert "distnet.parallel.mpi.rankexec -- " in out and out.rstrip().endswith("echo x")
    cmd = launcher.build_command("mpirun", "openmpi", 2, None, {"K": "V"}, ["echo"], True)
    assert cmd[:5] == ["mpirun", "-n", "2", "-x", "K=V"]


@pytest.mark.mpi
def test_launch_runs_ranks_with_tagged_output():
    # the venv's distnet (found next to sys.executable), as a user would run it
    distnet = Path(sys.executable).parent / "distnet"
    cmd = [str(distnet), "launch", "-np", "2", "--", sys.executable, "-c"]
    cmd += ["import os, sys; print('hello from', os.environ['PMI_RANK']); sys.stdout.write('x')"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert lines == ["[0] hello from 0", "[0] x", "[1] hello from 1", "[1] x"], proc.stdout


def test_x_passes_a_variable_of_this_shell_or_sets_one():
    environ = {"WANDB_MODE": "offline"}
    assert launcher.parse_exports(["WANDB_MODE", "A=1"], environ) == {
        "WANDB_MODE": "offline",
        "A": "1",
    }
    with pytest.raises(launcher.LaunchError, match="-x NOT_SET_HERE: NOT_SET_HERE is not set"):
        launcher.parse_exports(["NOT_SET_HERE"], environ)
    with pytest.raises(launcher.LaunchError, match="expected NAME or NAME=VALUE"):
        launcher.parse_exports(["1BAD"], environ)


def test_x_reaches_the_mpiexec_command_line(capsys, monkeypatch):
    monkeypatch.setenv("DISTNET_TEST_EXPORT", "from-the-shell")
    args = parsed("-np", "2", "-H", "a:2", "-x", "DISTNET_TEST_EXPORT", "--dry-run", "--", "echo")
    assert launcher.run(args) == 0
    assert "-genv DISTNET_TEST_EXPORT from-the-shell" in capsys.readouterr().out
    assert launcher.run(parsed("-np", "2", "-x", "DISTNET_NOT_SET_X", "--", "echo")) == 2
    assert "-x DISTNET_NOT_SET_X: DISTNET_NOT_SET_X is not set" in capsys.readouterr().err


@pytest.mark.parametrize(
    "env, want",
    [
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, ("1", "2", "1", "2")),  # mpiexec.gforker: one host
        (
            {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
            ("3", "4", "1", "2"),
        ),  # hydra, two hosts
        (
            {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"}
            | {"OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
            ("2", "4", "0", "2"),
        ),
    ],
)
def test_torchrun_variables_come_from_the_mpi_launchers(env, want):
    from distnet.parallel.mpi.rankexec import conventional_env  # noqa: PLC0415

    got = conventional_env(env)
    assert tuple(got[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")) == want
    assert conventional_env({}) == {}


@pytest.mark.mpi
def test_every_rank_sees_torchrun_variables_and_x_exports():
    distnet = Path(sys.executable).parent / "distnet"
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "DISTNET_TEST_X")
    code = f"import os; print(*[os.environ.get(n, '-') for n in {names!r}])"
    cmd = [str(distnet), "launch", "-np", "2", "-x", "DISTNET_TEST_X", "--"]
    cmd += [sys.executable, "-c", code]
    env = {**os.environ, "DISTNET_TEST_X": "shell value"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert lines == ["[0] 0 0 2 2 shell value", "[1] 1 1 2 2 shell value"], proc.stdout


def test_the_first_failure_is_the_earliest_and_a_later_interrupt_is_its_consequence(tmp_path):
    """A rank SIGKILLed at t=1 (its wrapper's bare exit record) is named, not the peer that was
    interrupted at t=2 while the job was being stopped (a rank's own account, 'cause')."""
    from distnet.parallel.mpi.launchrun import _first_failure  # noqa: PLC0415

    killed = {"rank": 1, "status": 137, "what": "killed by signal 9 (SIGKILL)", "time": 1.0}
    interrupted = {"rank": 0, "status": 130, "what": "interrupted (SIGINT)", "time": 2.0,
                   "cause": True}  # fmt: skip
    assert _first_failure(str(tmp_path), [interrupted, killed])["rank"] == 1
    # a rank's own account beats its wrapper's exit record, which comes after it
    raised = {"rank": 0, "status": 1, "what": "raised ValueError: x", "time": 1.0, "cause": True}
    exit0 = {"rank": 0, "status": 1, "what": "exit status 1", "time": 1.5}
    killed_after = {**killed, "time": 1.2}
    assert _first_failure(str(tmp_path), [exit0, killed_after, raised]) == raised


@pytest.mark.timeout(60)
def test_a_rank_that_ended_before_mpi_init_has_its_peers_stopped_at_once(monkeypatch):
    """Its peers wait for it in MPI_Init and never end by themselves: the launcher does not
    give them the failure grace (here 50 s) before it ends the group."""
    import time  # noqa: PLC0415

    from distnet.parallel.mpi.launchrun import wait_or_end_after_failure  # noqa: PLC0415

    monkeypatch.setenv("DISTNET_FAILURE_GRACE_S", "50")
    record = {"rank": 0, "status": 2, "what": "JobError: x", "time": 1.0, "cause": True,
              "peers_wait": True}  # fmt: skip
    peer = subprocess.Popen(["sleep", "55"], start_new_session=True)
    t0 = time.monotonic()
    status = wait_or_end_after_failure(peer, lambda: record, poll_s=0.05)
    assert status == -15 and time.monotonic() - t0 < 25  # SIGTERM'd, well before the grace
