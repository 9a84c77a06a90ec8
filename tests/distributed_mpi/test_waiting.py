"""How ranks wait for each other: MPI's busy wait or polled arrival (``DISTNET_MPI_WAIT``)."""

from __future__ import annotations

import os
import re

import pytest
from helpers.mpi import MPI_MARKS, SCRIPTS, launch

from distnet.parallel.mpi.waiting import policy_from_env, wants_poll

pytestmark = MPI_MARKS


def _run(np_: int, policy: str) -> tuple[str, float]:
    proc = launch(np_, str(SCRIPTS / "waiting.py"), timeout=60, env={"DISTNET_MPI_WAIT": policy})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.search(r"waits=(\w+) cpu=([\d.]+)", proc.stdout)
    assert found, proc.stdout
    return found[1], float(found[2])


@pytest.mark.timeout(120)
def test_a_polling_rank_waits_for_a_late_peer_without_taking_a_core():
    waits, cpu = _run(2, "poll")
    # rank 0 waited 1 s for rank 1: spinning costs ~1 s of CPU, polling ~1,000 short tests
    assert waits == "poll" and cpu < 0.3, cpu


@pytest.mark.timeout(120)
def test_spinning_ranks_give_the_same_results():
    waits, _ = _run(2, "spin")
    assert waits == "spin"


@pytest.mark.timeout(120)
def test_auto_polls_when_the_ranks_outnumber_the_cores():
    cores = len(os.sched_getaffinity(0))
    if cores > 3:
        pytest.skip(f"{cores} cores: -np {cores + 1} would start too many ranks for the suite")
    waits, _ = _run(cores + 1, "auto")  # not bound (they do not fit): they share the cores
    assert waits == "poll"


def test_auto_spins_on_cores_of_a_ranks_own_and_polls_when_they_are_shared():
    assert not wants_poll("auto", local_size=2, threads=1, cores=1)  # bound to its core
    assert not wants_poll("auto", local_size=2, threads=2, cores=2)  # bound to its 2 cores
    assert not wants_poll("auto", local_size=2, threads=1, cores=2)  # unbound, but they fit
    assert wants_poll("auto", local_size=4, threads=1, cores=2)
    assert wants_poll("auto", local_size=2, threads=2, cores=3)
    assert wants_poll("poll", local_size=1, threads=1, cores=8)
    assert not wants_poll("spin", local_size=8, threads=1, cores=2)


def test_an_unknown_wait_policy_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("DISTNET_MPI_WAIT", "busy")
    with pytest.raises(ValueError, match="DISTNET_MPI_WAIT='busy'"):
        policy_from_env()
