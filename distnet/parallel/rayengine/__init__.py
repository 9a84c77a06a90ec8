"""The Ray engine: workers as Ray actors, a torch-free Ray allreduce, heterogeneous shares,
elastic workers. Nothing here imports ray until a job or a benchmark uses it.

    from distnet.parallel.rayengine import RayOptions, worker_specs
    from distnet.train.jobs.rayjob import run_ray_job      # jobs are the train layer's
    report = run_ray_job(job, RayOptions(workers=worker_specs(2)))
"""

from distnet.parallel.rayengine.comm import RayCommunicator
from distnet.parallel.rayengine.driver import RayJob, run_on_ray
from distnet.parallel.rayengine.mailbox import Mailbox, WorkerLostError
from distnet.parallel.rayengine.options import (
    RayEngineError,
    RayOptions,
    WorkerSpec,
    options_from_job,
    start_ray,
    worker_specs,
)
from distnet.parallel.rayengine.rank import RayRankEngine

__all__ = [
    "Mailbox",
    "RayRankEngine",
    "RayCommunicator",
    "RayEngineError",
    "RayJob",
    "RayOptions",
    "WorkerLostError",
    "WorkerSpec",
    "options_from_job",
    "run_on_ray",
    "start_ray",
    "worker_specs",
]
