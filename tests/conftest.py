"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every collective of every test (and of the ranks and actors they start, which inherit the
# environment) is compared across ranks: a mismatch raises instead of hanging or mixing data.
os.environ.setdefault("DISTNET_COLLECTIVE_CHECK", "1")

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


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray (4 CPUs), started once per module that asks for it and shut down after;
    token authentication stays on (Ray 2.60's default, never turned off)."""
    ray = pytest.importorskip("ray")
    from ray._raylet import get_authentication_mode  # noqa: PLC0415

    from distnet.parallel.rayengine import start_ray  # noqa: PLC0415

    started = start_ray(None, num_cpus=4)
    assert os.environ.get("RAY_AUTH_MODE") == "token"
    assert int(get_authentication_mode()) == 1  # AuthenticationMode.TOKEN
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def two_hosts(tmp_path):
    """Two "hosts" on this machine, nodeB in its own network namespace with a private /tmp
    (tests/helpers/hosts.py; skipped with the reason where the machine does not allow it).
    Yields (``distnet launch`` options, env)."""
    from helpers.hosts import namespace_hosts  # noqa: PLC0415

    with namespace_hosts(tmp_path) as (args, env):
        yield args, env
