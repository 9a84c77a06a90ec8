"""A separate Ray client process, for the tests of Ray's token authentication."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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
