"""The engine interface: what an engine does for one rank of a job.

In the spirit of Ray Train's ``Backend`` (named hooks: ``on_start``, ``on_training_start``,
``on_shutdown``) and ChainerMN's communicator classes: the job runner
(``distnet.train.jobs.job.run_job``) talks to one ``Engine`` and knows no engine by name. Per
rank an engine gives

- ``start(job, log)``: the communicator (``comm``) and the ``[dist]`` settings (``dist``) the
  strategy factory reads;
- ``place(model, device)``: the device this rank trains on, the model moved there and its flat
  buffers where the engine wants them (shared memory, memfd files): explicit, whatever the
  order of ``init()`` and the model's construction;
- ``share(loader)``: this rank's share of every global batch, given to a stage's loader;
- ``wrap(optimizer, loader)``: the stage's synchronising optimiser, through the strategy
  factory (``distnet.parallel.strategy``), the only place a strategy is chosen;
- ``parameter_server(optimizer, hybrid)``: the service the ``ps``/``hybrid`` strategies ask
  for (the Ray engine's shard actors; others refuse);
- ``in_stage(name, fn)``, ``resume_stage(ctx, optimizer, epoch)``: a stage's function as the
  engine runs it, and its mid-epoch resumption (Ray: after a lost worker);
- ``close(failed)``: the end of the job on this rank.

``ProcessEngine`` is the engine of one process and of ``mpiexec``-started ranks (``engine =
"local"``/``"mpi"``); the Ray engine's is ``distnet.parallel.rayengine.rank.RayRankEngine``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from distnet import backend
from distnet.parallel.strategy import make_sync_optimizer

__all__ = ["Engine", "EngineBase", "ProcessEngine", "place_flat_buffers"]


@runtime_checkable
class Engine(Protocol):
    """What ``run_job`` asks an engine for, per rank (see the module docstring)."""

    comm: Any
    dist: dict[str, Any]
    stands_in: bool  # a rank taking a lost one's place in a running group
    draws_report: bool  # the engine draws report.html after the job (else ``run_job`` does)

    def start(self, job: dict[str, Any], log: Callable[[str], None]) -> None: ...
    def place(self, model: Any, device: str) -> str: ...
    def share(self, loader: Any) -> Any: ...
    def wrap(self, optimizer: Any, loader: Any) -> Any: ...
    def parameter_server(self, optimizer: Any, hybrid: bool) -> Any: ...
    def note(self, line: str) -> None: ...
    def in_stage(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]: ...
    def resume_stage(self, ctx: Any, optimizer: Any, start: int) -> int: ...
    def close(self, failed: bool = False) -> None: ...


def place_flat_buffers(
    model: Any, zeros: Callable[[int, Any], Any] | None, owns: Callable[[Any], bool]
) -> bool:
    """Lays ``model``'s flat buffers into ones made by ``zeros(n, dtype)`` (shared memory, a
    memfd file; None: leave them) unless ``owns(buffer)`` says they are there already (a model
    built after ``init()``, which makes the allocator the default): the values move, the
    parameters' views follow. A model on a GPU stays where it is. True when it moved them."""
    data = model.flat_params()
    if zeros is None or backend.is_gpu_array(data) or owns(data):
        return False
    model.lay_out_flat(zeros)
    return True


class EngineBase:
    """What every engine does the same way: one-time notes on rank 0, stage hooks that change
    nothing, the strategy factory behind ``wrap``."""

    comm: Any = None
    dist: dict[str, Any]
    flat_zeros: Callable[[int, Any], Any] | None = None  # where flat buffers go (None: default)
    # this rank takes a lost rank's place in a running group (Ray, async/ssp parameter server):
    # it does not begin the run's records again (run.json, the stage's trained segment)
    stands_in: bool = False
    # the engine draws report.html itself once the job returned, with what it adds to
    # report.json (Ray with parameter servers: their stats); else ``run_job`` draws it
    draws_report: bool = False

    def flat_owns(self, buf: Any) -> bool:
        """Whether ``buf`` is where ``flat_zeros`` puts flat buffers."""
        return False

    def _start_logging(self, log: Callable[[str], None]) -> None:
        self.say = log if self.comm.rank == 0 else (lambda line: None)
        self._noted: set[str] = set()

    def note(self, line: str) -> None:
        """``line`` once per job, on rank 0."""
        if line not in self._noted:
            self._noted.add(line)
            self.say(line)

    def place(self, model: Any, device: str) -> str:
        """``device`` "cpu": the model's flat buffers go where ``flat_zeros`` makes them;
        else this rank's GPU (one per rank on a node), the model moved there."""
        if device != "cpu":  # one GPU per rank; gradients then go through NCCL
            device = backend.use_device(backend.device_for_rank(self.comm.local_rank, device))
            model.to(device)
            return device
        place_flat_buffers(model, self.flat_zeros, self.flat_owns)
        return device

    def share(self, loader: Any) -> Any:
        """Every rank takes an equal share (the loader's own split)."""
        return loader

    def wrap(self, optimizer: Any, loader: Any) -> Any:
        """The stage's synchronising optimiser (``strategy.make_sync_optimizer``)."""
        self.share(loader)
        return make_sync_optimizer(optimizer, self)

    def parameter_server(self, optimizer: Any, hybrid: bool) -> Any:
        raise ValueError(
            f"strategy {'hybrid' if hybrid else 'ps'!r} needs engine = 'ray' (parameter-server "
            f"shards are Ray actors; this is {type(self).__name__})"
        )

    def in_stage(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn

    def resume_stage(self, ctx: Any, optimizer: Any, start: int) -> int:
        """The epoch checkpoint's epoch: nothing finer to resume from."""
        return start

    def close(self, failed: bool = False) -> None:
        """Nothing held beyond the job."""


class ProcessEngine(EngineBase):
    """The engine of one process (``engine = "local"``) and of MPI ranks started by
    ``distnet launch``/``mpiexec``/``srun`` (``"mpi"``; ``"auto"``: MPI under a launcher).

    Args:
        comm: a communicator to use instead of ``distnet.parallel.init(engine)``.
    """

    def __init__(self, comm: Any = None) -> None:
        self.comm = comm
        self.rebalancing: Any = None  # distnet.parallel.rebalance.Rebalancing, when on

    def start(self, job: dict[str, Any], log: Callable[[str], None]) -> None:
        from distnet.parallel.comm import init  # noqa: PLC0415

        self.dist = job["dist"]
        if self.comm is None:
            self.comm = init(self.dist["engine"])
        hierarchical = self.dist["hierarchical"]
        if hierarchical != "auto":  # "auto": init decides
            self.comm.set_hierarchical(hierarchical)
        shm = getattr(self.comm, "shm", None)  # every MPI rank on this node: shared memory
        if shm is not None:
            from distnet.parallel.shm import ARENA  # noqa: PLC0415

            self.flat_zeros = ARENA.zeros
            self.flat_owns = lambda buf: ARENA.locate(buf) is not None  # type: ignore[method-assign]
        self._start_logging(log)
        from distnet.parallel.rebalance import Rebalancing  # noqa: PLC0415

        if Rebalancing.wanted(self):  # shares that follow each rank's compute rate
            self.rebalancing = Rebalancing(self)

    def share(self, loader: Any) -> Any:
        """The split in force (``[dist] rebalance``), else the loader's own equal split."""
        if self.rebalancing is None or loader is None:
            return loader
        return self.rebalancing.share(loader)

    def wrap(self, optimizer: Any, loader: Any) -> Any:
        """The strategy's optimiser, re-splitting the global batch at epoch ends when the
        ranks rebalance (``distnet.parallel.rebalance``)."""
        wrapped = super().wrap(optimizer, loader)
        if self.rebalancing is None or loader is None:  # no loader: no batch to split
            return wrapped
        return self.rebalancing.wrap(wrapped, loader)
