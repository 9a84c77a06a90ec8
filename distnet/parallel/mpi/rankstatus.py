"""How a rank tells ``distnet launch`` why it stopped, on any host.

The launcher makes a status directory on its own host and names it in
``DISTNET_LAUNCH_STATUS_DIR``. A rank on the same host writes a small JSON file there (atomic
rename). A rank on another host has no such directory (it is a local temp dir), so it writes
the same record as one line on stderr instead, marked with ``MARKER``: mpiexec forwards every
rank's stderr to the launcher, which takes these lines out of the output and reads them.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

MARKER = "distnet-rank-status: "


def report(record: dict[str, Any], name: str) -> None:
    """Records ``record`` (``rank``, ``status``, ``what``, ``time``, [``cause``]) as ``name``.json
    in the launcher's status directory, or as a marked stderr line where that directory does
    not exist here. Never raises: a report that cannot be made must not hide the failure."""
    status_dir = os.environ.get("DISTNET_LAUNCH_STATUS_DIR")
    if not status_dir:
        return
    path = os.path.join(status_dir, f"{name}.json")
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
        return
    except OSError:
        pass  # another host (or a full disk): say it on stderr instead
    try:
        sys.stderr.write(MARKER + json.dumps(record) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def parse_line(line: str) -> dict[str, Any] | None:
    """The record in a marked line (rank prefixes before the marker allowed), else None."""
    at = line.find(MARKER)
    if at < 0:
        return None
    try:
        record = json.loads(line[at + len(MARKER) :])
    except ValueError:
        return None
    return record if isinstance(record, dict) and "rank" in record else None
