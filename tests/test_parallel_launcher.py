"""``distnet launch``: every bad invocation fails before anything starts, with a clear message."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from distnet.parallel import launcher

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]


def launch(*argv: str) -> argparse.Namespace:
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
    assert launcher.run(launch(*argv)) == 2
    err = capsys.readouterr().err
    assert "distnet launch: error:" in err and message in err


def test_unknown_flag_and_both_host_options_are_refused(capsys):
    for argv in (
        ["-np", "2", "--frobnicate", "--", "echo"],
        ["-np", "2", "-H", "a", "--hostfile", "f", "--", "echo"],
    ):
        with pytest.raises(SystemExit) as exc:
            launch(*argv)
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
    args = launch("-np", "4", "-H", "a:2,b:2", "--env", "K=V", "--dry-run", "--", "echo", "x")
    assert launcher.run(args) == 0
    out = capsys.readouterr().out
    assert "-n 4 -hosts a:2,b:2 -genv K V" in out and "DISTNET_TAGGED_OUTPUT 1" in out
    assert "distnet.parallel.rankexec -- " in out and out.rstrip().endswith("echo x")
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
