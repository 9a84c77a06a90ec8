"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import pytest

# Every collective of every test (and of the ranks and actors they start, which inherit the
# environment) is compared across ranks: a mismatch raises instead of hanging or mixing data.
os.environ.setdefault("DISTNET_COLLECTIVE_CHECK", "1")
# Two pytest workers run two jobs at once on the suite's 2 cores, which each job's ranks do
# not know (``distnet launch`` binds 2 ranks to the 2 cores): a rank spinning in MPI while
# it waits takes a core from the other job. Polled arrival (distnet/parallel/mpi/waiting.py).
os.environ.setdefault("DISTNET_MPI_WAIT", "poll")

# tests/ (the ``helpers`` package) on the path of every process a test starts: Ray's workers
# import a test module's actor classes by the module's name, and that module imports helpers
# (pytest puts tests/ on this process's sys.path because this file lives there).
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_TESTS, os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """A directory of the module's own whose ``data/train`` and ``data/test`` are scikit-learn's
    digits as stores (25% test, stratified, seed 0, chunks of 64 samples): a job file written
    into it names them ``data/train`` and ``data/test``."""
    pytest.importorskip("sklearn")
    from distnet.data import convert_digits  # noqa: PLC0415

    root = tmp_path_factory.mktemp("digits")
    convert_digits(root / "data", test_fraction=0.25, seed=0, chunk_samples=64)
    return root


MAX_LOAD_FACTOR = 4.0


def load_factor() -> float:
    """How many times its idle time a CPU-bound job of several processes may take now: the
    1-minute load average over 4 runnable processes per core (a job's own workers, shards
    and driver keep ~4 busy on a 2-core machine), at least 1, at most ``MAX_LOAD_FACTOR``.
    Measured (tests/faults/test_faults_ray.py, seed 1, 2 cores): 38 s at load 17, 148 s at 25-30."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 1.0
    return min(MAX_LOAD_FACTOR, max(1.0, load / (4 * (os.cpu_count() or 1))))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item):
    """``@pytest.mark.load_scaled``: the test's timeout (its closest ``timeout`` mark) times
    ``load_factor()`` as it starts, for tests whose work is genuinely long (whole jobs with
    failures and recoveries), not for waits: a hang still ends, later on a loaded machine."""
    limit = item.get_closest_marker("timeout")
    if item.get_closest_marker("load_scaled") is not None and limit is not None and limit.args:
        factor = load_factor()
        seconds = float(limit.args[0]) * factor
        item.add_marker(pytest.mark.timeout(seconds, **limit.kwargs), append=False)
        item.user_properties.append(("timeout_s", round(seconds)))
    yield


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "own_ray: the module starts (and stops) a Ray of its own (ray.init, ray.cluster_utils): "
        "the shared local Ray of ``ray_cluster`` is shut down before it",
    )
    config.addinivalue_line(
        "markers",
        "fresh_ray: the module's ``ray_cluster`` is started after its module fixtures (their "
        "environment reaches Ray's workers) and shut down after the module",
    )


# Whether this process started the local Ray that is up now (``ray_cluster``): one per pytest
# process, shared by the modules that ask for it (a start and a shutdown cost ~8 s each module)
_SHARED_RAY = {"up": False}
_LEAK_WAIT_S = 3.0


def stop_shared_ray() -> None:
    """Shuts down the shared local Ray if this process started it and it is up."""
    if _SHARED_RAY["up"]:
        import ray  # noqa: PLC0415

        ray.shutdown()
        _SHARED_RAY["up"] = False


def _ray_holds_leftovers(ray) -> list[str]:
    """What a module left in the shared Ray that the next one must not see: actors not dead
    (named or detached ones included), placement groups not removed, CPUs still held. Polled
    for up to ``_LEAK_WAIT_S`` (a killed actor's death is recorded a moment later)."""
    deadline = time.monotonic() + _LEAK_WAIT_S
    while True:
        actors = ray._private.state.actors().values()
        groups = ray.util.placement_group_table().values()
        left = [f"actor {a.get('Name') or a['ActorID']} {a['State']}"
                for a in actors if a["State"] != "DEAD"]  # fmt: skip
        left += [f"placement group {g['placement_group_id']} {g['state']}"
                 for g in groups if g["state"] != "REMOVED"]  # fmt: skip
        if ray.available_resources().get("CPU", 0.0) < ray.cluster_resources().get("CPU", 0.0):
            left.append("CPUs held")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(scope="module", autouse=True)
def _ray_of_the_module(request):
    """Modules marked ``own_ray`` start their own Ray: the shared one goes first. Modules marked
    ``fresh_ray`` get a shared Ray started after their module fixtures and shut down after."""
    marked = {m.name for m in request.node.iter_markers()} & {"own_ray", "fresh_ray"}
    if marked:
        stop_shared_ray()
    yield
    if marked:
        stop_shared_ray()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray (4 CPUs) shared by the modules of this pytest process that ask for it:
    started by the first, checked after each (what a module left behind, actors, placement
    groups, held CPUs, shuts it down, and the next module starts a clean one) and shut down as
    the session ends. Token authentication stays on (Ray 2.60's default, never turned off)."""
    ray = pytest.importorskip("ray")
    from ray._raylet import get_authentication_mode  # noqa: PLC0415

    from distnet.parallel.rayengine import start_ray  # noqa: PLC0415

    if _SHARED_RAY["up"] and not ray.is_initialized():  # a module shut it down itself
        _SHARED_RAY["up"] = False
    if not _SHARED_RAY["up"]:
        if ray.is_initialized():  # a Ray of a module's own that the module left up
            ray.shutdown()
        _SHARED_RAY["up"] = start_ray(None, num_cpus=4)
    assert os.environ.get("RAY_AUTH_MODE") == "token"
    assert int(get_authentication_mode()) == 1  # AuthenticationMode.TOKEN
    yield
    if not _SHARED_RAY["up"]:
        return
    left = _ray_holds_leftovers(ray) if ray.is_initialized() else []
    if left:  # not an error of the module's tests: the next module gets a clean Ray
        warnings.warn(f"the shared Ray restarts: left behind: {', '.join(left[:5])}", stacklevel=1)
    if left or not ray.is_initialized():
        stop_shared_ray()


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_stops_at_the_end():
    yield
    stop_shared_ray()


@pytest.fixture
def two_hosts(tmp_path):
    """Two "hosts" on this machine, nodeB in its own network namespace with a private /tmp
    (tests/helpers/hosts.py; skipped with the reason where the machine does not allow it).
    Yields (``distnet launch`` options, env)."""
    from helpers.hosts import namespace_hosts  # noqa: PLC0415

    with namespace_hosts(tmp_path) as (args, env):
        yield args, env
