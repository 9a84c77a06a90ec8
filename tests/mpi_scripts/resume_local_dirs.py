"""Run under mpiexec (2 ranks): a job whose rank > 0 run directories are node-local.

    python resume_local_dirs.py JOB.toml RANK0_OUT LOCAL_ROOT MODE [DEVICE]

Rank 0 runs in RANK0_OUT; every other rank in a new, empty LOCAL_ROOT/rank<r>-<MODE>, as on
nodes without a shared file system. MODE "crash" stops every rank after the second epoch of
fine-tuning has been checkpointed; "full" and "resume" run to the end. Each rank saves its
final parameters to LOCAL_ROOT/final-<MODE>-rank<r>.npz.
"""

import sys
from pathlib import Path

import numpy as np
from crash_resume import run_or_crash

from distnet.parallel import init
from distnet.train.jobs.job import load_job

job_path, rank0_out, local_root, mode = sys.argv[1:5]
device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
comm = init("mpi")
out = Path(rank0_out) if comm.rank == 0 else Path(local_root) / f"rank{comm.rank}-{mode}"
assert comm.rank == 0 or not out.exists()
job = load_job(job_path, {"run": {"out": str(out), "device": device}})

report, model = run_or_crash(job, comm, mode, log=print if comm.rank == 0 else (lambda line: None))
np.savez(Path(local_root) / f"final-{mode}-rank{comm.rank}.npz", **model.state_dict())
comm.print0(f"{mode} done, resumed from {[s['resumed_from_epoch'] for s in report['stages']]}")
