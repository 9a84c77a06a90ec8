"""Under mpiexec: a job whose run directory is node-local (each rank runs in its own
directory BASE/node<rank>, out = "run" relative to it), traced. Usage: node_local_run.py BASE"""

import os
import sys
from pathlib import Path

base = Path(sys.argv[1])
rank = next(int(os.environ[v]) for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK") if v in os.environ)
(base / f"node{rank}").mkdir(parents=True, exist_ok=True)
os.chdir(base / f"node{rank}")

from distnet.train.jobs import job  # noqa: E402

spec = job.load_job(base / "job.toml", {"run": {"out": "run"}})
job.run_job(spec, log=lambda line: None, trace=True)
