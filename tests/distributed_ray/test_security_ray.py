"""Ray's token authentication guards a local Ray that distnet starts: a client with the wrong
token or none is refused, the right token connects (a positive control)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def gcs_address():
    from distnet.parallel.rayengine import start_ray

    started = start_ray(None, num_cpus=1)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def connect(gcs: str, tmp_path: Path, token: str | None) -> subprocess.CompletedProcess:
    """A separate client process with no token file, and ``token`` (if any) in its env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token there
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    env["RAY_gcs_server_port_wait_time_s"] = "3"  # 3 tries to reach the GCS, not Ray's 20
    code = f"import ray; ray.init(address={gcs!r}); print('CONNECTED', ray.is_initialized())"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_clients_without_the_token_are_refused_and_with_it_connect(gcs_address, tmp_path):
    assert os.environ.get("RAY_AUTH_MODE") == "token"
    none = connect(gcs_address, tmp_path, None)
    assert none.returncode != 0 and "CONNECTED" not in none.stdout
    assert "AuthenticationError" in none.stderr or "token" in none.stderr.lower()
    wrong = connect(gcs_address, tmp_path, "0" * 32)
    assert wrong.returncode != 0 and "CONNECTED" not in wrong.stdout, wrong.stdout
    right_token = os.environ.get("RAY_AUTH_TOKEN") or (
        Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        .read_text()
        .strip()
    )
    right = connect(gcs_address, tmp_path, right_token)
    assert "CONNECTED True" in right.stdout, right.stderr[-2000:]
