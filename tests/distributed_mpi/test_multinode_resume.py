"""Resume across two "hosts" whose run directories are node-local: a job on 2 hosts x 2 ranks
is stopped after a checkpoint and resumed; rank 0 alone reads the checkpoints (its run
directory) and broadcasts them (``distnet.train.loop.checkpoint.read_checkpoint(path, comm)``).

Hosts are network namespaces with a private /tmp (the ``two_hosts`` fixture,
tests/helpers/hosts.py: nodeB's ranks cannot see rank 0's run directory at all), skipped
with the reason where the machine does not allow them, and MPICH's fork hosts (``-launcher
fork -hosts nodeA:2,nodeB:2``: two nodes to MPI, one file system, each rank its own directory).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers.jobs import sae_job
from helpers.mpi import SCRIPTS, launch, needs_mpiexec


@pytest.fixture(scope="module")
def shared_storage():
    """The data and the job file where every host sees them (a shared file system): outside
    /tmp, which a namespace host has its own of."""
    pytest.importorskip("sklearn")
    from distnet.data import convert_digits  # noqa: PLC0415

    root = Path(tempfile.mkdtemp(prefix="distnet-shared-", dir="/var/tmp"))
    try:
        convert_digits(root / "data", test_fraction=0.25, seed=0, chunk_samples=64)
        (root / "job.toml").write_text(sae_job(root / "data", pretrain_epochs=1))
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.mpi
@pytest.mark.slow
@needs_mpiexec
@pytest.mark.timeout(290)
@pytest.mark.parametrize("hosts", ["namespaces", "fork"])
def test_resume_across_two_hosts_with_node_local_run_directories(
    hosts, request, shared_storage, tmp_path
):
    if hosts == "namespaces":
        args, env = request.getfixturevalue("two_hosts")  # skips with the reason
    else:
        args, env = ["--launcher", "fork", "-H", "nodeA:2,nodeB:2"], {}
    script = str(SCRIPTS / "resume_two_hosts.py")
    local = tmp_path / "local"  # nodeB's copy of this path is in its own /tmp (namespaces)

    def run(out: str, mode: str) -> str:
        proc = launch(
            4, script, str(shared_storage / "job.toml"), str(tmp_path / out), str(local), mode,
            options=args, env=env, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    assert "full done, resumed from [0, 0, 0]" in run("full", "full")
    assert "crashed as planned" in run("stopped", "crash")
    from distnet.train.loop.checkpoint import read_manifest  # noqa: PLC0415

    progress = tmp_path / "stopped" / "stages" / "2-finetune" / "progress"
    assert read_manifest(progress)["extra"]["epoch"] == 2
    assert "resume done, resumed from [0, 0, 2]" in run("stopped", "resume")

    layout = json.loads((tmp_path / "stopped" / "layout-resume.json").read_text())
    assert [(r["num_nodes"], r["local_rank"]) for r in layout] == [(2, 0), (2, 1)] * 2
    assert all(r["dir_was_new"] for r in layout)  # no rank > 0 had anything to resume from
    for r in layout[1:]:  # rank > 0 wrote no checkpoint and no report (metrics, timeline)
        assert set(r["wrote"]) <= {"metrics", "trace"}, r
    if hosts == "namespaces":  # nodeB is another host: it cannot even see rank 0's directory
        assert layout[0]["netns"] == layout[1]["netns"] != layout[2]["netns"] == layout[3]["netns"]
        assert [r["sees_rank0_out"] for r in layout] == [True, True, False, False]

    full = np.load(tmp_path / "full" / "final-full.npz")
    resumed = np.load(tmp_path / "stopped" / "final-resume.npz")
    assert sorted(resumed.files) == sorted(full.files) and len(full.files) > 4
    for name in full.files:  # every rank of the resumed job ends where the full one did
        np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)
    rank0 = [n for n in full.files if n.startswith("rank0/")]
    for rank in (1, 2, 3):
        for name in rank0:
            np.testing.assert_array_equal(full[name.replace("rank0", f"rank{rank}")], full[name])
