"""One rank of a conformance-matrix job: ``matrix_rank.py JOB.toml [crash]`` (see
tests/helpers/matrix.py::run_rank); exits with its return code."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers

from helpers.matrix import run_rank  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_rank(sys.argv[1], crash=sys.argv[2:] == ["crash"]))
