"""Under ``distnet launch`` over two hosts (``-H nodeA:2,nodeB:2``): a job whose run directories
are node-local, stopped after a checkpoint and resumed.

    python resume_two_hosts.py JOB.toml RANK0_OUT LOCAL_ROOT MODE

Rank 0 runs in RANK0_OUT; every other rank in a new, empty LOCAL_ROOT/rank<r>-<MODE> (on a
network-namespace host LOCAL_ROOT lies in that host's private /tmp, which rank 0 cannot see,
and RANK0_OUT is out of its reach). MODE "crash" stops every rank after the second epoch of
fine-tuning has been checkpointed; "full" and "resume" run to the end. Files on other hosts
are out of the test's reach too, so rank 0 gathers and writes, in RANK0_OUT:
``final-<MODE>.npz`` (every rank's final parameters, ``rank<r>/<name>``) and
``layout-<MODE>.json`` (per rank: node, local rank, network namespace, what it could see).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
from crash_resume import run_or_crash

from distnet.parallel import init
from distnet.train.jobs.job import load_job

job_path, rank0_out, local_root, mode = sys.argv[1:5]
comm = init("mpi")
out = Path(rank0_out) if comm.rank == 0 else Path(local_root) / f"rank{comm.rank}-{mode}"
layout = {
    "rank": comm.rank, "num_nodes": comm.num_nodes, "local_rank": comm.local_rank,
    "netns": os.stat("/proc/self/ns/net").st_ino,  # another namespace: another "host"
    "dir_was_new": comm.rank == 0 or not out.exists(),
    "sees_rank0_out": Path(rank0_out).exists(),
}  # fmt: skip
job = load_job(job_path, {"run": {"out": str(out)}})

report, model = run_or_crash(job, comm, mode, log=lambda line: None)
# what rank > 0 wrote in its own directory (it must not need, nor write, checkpoints)
layout["wrote"] = sorted({p.relative_to(out).parts[0] for p in out.rglob("*")})
params = {k: np.asarray(v) for k, v in model.state_dict().items()}
everyone = comm.allgather((layout, params))
if comm.rank == 0:
    np.savez(
        Path(rank0_out) / f"final-{mode}.npz",
        **{f"rank{r}/{k}": v for r, (_, p) in enumerate(everyone) for k, v in p.items()},
    )
    layouts = [lay for lay, _ in everyone]
    (Path(rank0_out) / f"layout-{mode}.json").write_text(json.dumps(layouts))
resumed = [s["resumed_from_epoch"] for s in report["stages"]]
comm.print0(f"{mode} done, resumed from {resumed}")
