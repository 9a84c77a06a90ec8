"""Ray's token authentication guards a local Ray that distnet starts: a client with the wrong
token or none is refused, the right token connects (a positive control)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.ray_client import connect

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def gcs_address(ray_cluster):
    return ray.get_runtime_context().gcs_address


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
