"""Ranks that share one GPU (``run.device = "cuda:0"`` on two ranks, more ranks than GPUs,
fractional ``gpus_per_worker``): NCCL refuses them, so the communicator reduces their GPU
buffers through host memory instead and says so in one line. The decision is tested here on
lists of device identities; the GPU test runs where one GPU is present."""

from __future__ import annotations

import pytest
from helpers.mpi import MPI_MARKS, SCRIPTS, launch

from distnet import backend
from distnet.parallel.nccl import describe_sharing, shared_devices


def identities(host: str, devices: list[str]) -> list[str]:
    return [f"{host}/0000:{d.split(':')[1]}:00.0" for d in devices]


def test_every_rank_on_its_own_device_shares_nothing():
    assert shared_devices(identities("a", ["cuda:0", "cuda:1"])) == {}
    assert shared_devices([]) == {}


def test_one_device_named_for_two_ranks_is_shared():
    assert shared_devices(identities("a", ["cuda:0", "cuda:0"])) == {"a/0000:0:00.0": [0, 1]}


def test_more_ranks_than_gpus_share_round_robin():
    devices = [backend.device_for_rank(r, "cuda", visible=2) for r in range(5)]
    got = shared_devices(identities("a", devices))
    assert got == {"a/0000:0:00.0": [0, 2, 4], "a/0000:1:00.0": [1, 3]}


def test_the_same_bus_id_on_two_hosts_is_two_devices():
    ids = identities("a", ["cuda:0", "cuda:1"]) + identities("b", ["cuda:0", "cuda:1"])
    assert shared_devices(ids) == {}


def test_the_line_names_the_ranks_the_device_and_the_way_out():
    line = describe_sharing({"a/0000:17:00.0": [0, 1]})
    assert "\n" not in line
    assert "ranks 0, 1 share GPU a/0000:17:00.0" in line
    assert "host memory" in line and "-np" in line


@MPI_MARKS[0]
@MPI_MARKS[1]
@pytest.mark.timeout(120)
def test_two_ranks_on_one_device_stage_through_host_and_say_it_once():
    proc = launch(2, str(SCRIPTS / "shared_gpu.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 staged" in proc.stdout and "rank 1 staged" in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if "share GPU" in ln]
    assert len(lines) == 1 and "ranks 0, 1 share GPU node-a/00000000:17:00.0" in lines[0]


@MPI_MARKS[0]
@MPI_MARKS[1]
@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.skipif(backend.gpu_skip_reason() is not None, reason=str(backend.gpu_skip_reason()))
def test_two_ranks_on_one_real_gpu_reduce_through_host(tmp_path):
    """Both ranks on cuda:0: the allreduce of a cupy buffer is the sum, through host."""
    script = tmp_path / "one_gpu.py"
    script.write_text(
        "import cupy\n"
        "from distnet import backend, parallel\n"
        "backend.use_device('cuda:0')\n"
        "comm = parallel.init('mpi')\n"
        "comm.use_nccl()\n"
        "assert comm._nccl is None\n"
        "buf = cupy.full(5, comm.rank + 1, dtype=cupy.float32)\n"
        "comm.allreduce(buf)\n"
        "assert float(buf[0]) == 3.0, buf\n"
        "print('summed', comm.rank, flush=True)\n"
    )
    proc = launch(2, str(script), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summed 0" in proc.stdout and "summed 1" in proc.stdout
    assert "share GPU" in proc.stderr
