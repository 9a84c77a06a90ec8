"""Mid-epoch resume after a worker died: only the interrupted global step is computed again.

After every finished step each worker notes where its loader stands (``StepMark``: a few
integers). When a peer dies, the survivors leave the stage at their next collective (or
parameter-server round) and each keeps, in its actor, a *carry* (``capture``): the stage,
the epoch, the loader state after the last finished global step, and the parameters and
optimiser state after that step. Those are the replica's own under allreduce (the failed
step's reduction never finished, so its update was not applied), and the shards' under the
parameter server in ``sync`` (they hold the state after the last round every worker pushed
to; a round a dead worker never pushed to is never applied).

The driver picks one survivor's carry (rank 0's when it lives), makes that survivor rank 0
of the new group, and the interrupted stage starts from it (``apply_carry``): every rank,
the replacement included, gets parameters and optimiser state by broadcast from rank 0 (the
shards are loaded from them), and every loader resumes at the next global step of the same
epoch's order. With fewer (or more) workers than before, the samples the epoch has left
are split among the live ones (``StreamLoader.load_state_dict`` starts a new phase). So the
global batch being computed when the worker died is the only work done twice, and every
sample of the epoch enters the parameters once.

``capture`` gives no carry, and the job falls back to the stage's last epoch checkpoint (the
interrupted epoch from its start), when: the stage had not finished a step yet, the epoch
had just ended (its checkpoint may not be written), the stage trains on a loader other than
the one noted (cached codes of a stacked autoencoder's deeper layers), the optimiser state
is sharded over the ranks (ZeRO), or the parameter-server shards disagree on the last round
(the dead worker pushed to some shards only) or one was lost (no snapshot). The shards
belong to the job (``ps/keeper.py``), so rank 0's death leaves them, and a carry, in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from distnet import backend
from distnet.data import order


@dataclass(frozen=True)
class StepMark:
    """Where a stage stood after its last finished step on this worker."""

    epoch: int
    loader: dict[str, Any]  # StreamLoader.state_dict() after the step
    steps: int  # steps this stage finished in this run of the job


def note_step(
    previous: StepMark | None, loader: Any, steps: int, start: tuple[int, int]
) -> StepMark | None:
    """The mark after a finished step, or None when ``loader`` did not move since the last
    mark (or since ``start``, its (epoch, samples_seen) when the stage began): the stage
    iterates another loader, and this one says nothing about where it stands."""
    state = loader.state_dict()
    ref_epoch, ref_seen = (previous.epoch, previous.loader["samples_seen"]) if previous else start
    if int(loader.epoch) == ref_epoch and int(state["samples_seen"]) <= ref_seen:
        return None
    return StepMark(int(loader.epoch), state, steps)


def epoch_finished(loader: Any, state: dict[str, Any]) -> bool:
    """Whether ``state`` (of ``loader``'s dataset) is at the end of its epoch."""
    ds = loader.dataset
    ph = order.current_phase(
        len(ds), ds.chunk_samples, int(state["seed"]), int(state["epoch"]), bool(state["shuffle"]),
        int(state["shuffle_chunks"]), bool(state["drop_last"]), state.get("history", []),
    )  # fmt: skip
    global_batch = sum(int(b) for b in state["batch_sizes"])
    steps = order.steps_per_epoch(ph.stream.n, global_batch, bool(state["drop_last"]))
    return (int(state["samples_seen"]) - ph.seen_before) // global_batch >= steps


def capture(stage: int | None, mark: StepMark | None, opt: Any, loader: Any) -> dict | None:
    """This survivor's carry (see the module docstring), or None when none fits.

    ``opt``: the stage's optimiser wrapper (``flat_params`` (n,), ``state_dict()``, and
    ``resume_check(steps)``: false for sharded state, the shards' word for a parameter
    server)."""
    if stage is None or mark is None or opt is None:
        return None
    if epoch_finished(loader, mark.loader) or not opt.resume_check(mark.steps):
        return None
    return {
        "stage": int(stage),
        "epoch": mark.epoch,
        "loader": mark.loader,
        "steps": mark.steps,
        "params": np.array(backend.to_device(opt.flat_params, "cpu"), copy=True),
        "optimizer": opt.state_dict(),
    }


def summary(carry: dict | None) -> dict[str, Any] | None:
    """What the driver needs to choose among survivors' carries (no arrays)."""
    if carry is None:
        return None
    return {
        "stage": carry["stage"],
        "epoch": carry["epoch"],
        "samples_seen": int(carry["loader"]["samples_seen"]),
        "steps": carry["steps"],
    }


def apply_carry(
    comm: Any, carry: dict | None, stage: int, start_epoch: int, opt: Any, loader: Any
) -> int | None:
    """Collective: loads rank 0's carry into every rank's model, optimiser (and shards) and
    loader when it belongs to ``stage`` at ``start_epoch`` (the epoch the stage's checkpoint
    resumes at); returns that epoch, or None (nothing loaded)."""
    header: Any = None
    if comm.rank == 0 and carry is not None and carry["stage"] == stage:
        if carry["epoch"] == start_epoch:
            state = carry["optimizer"]
            arrays = {"params": carry["params"]}
            arrays.update({f"optimizer/{k}": v for k, v in state.items() if _is_array(v)})
            scalars = {k: v for k, v in state.items() if not _is_array(v)}
            specs = [(k, a.shape, np.asarray(a).dtype.str) for k, a in arrays.items()]
            header = (carry["epoch"], carry["loader"], scalars, specs)
    header = comm.broadcast_object(header, root=0)
    if header is None:
        return None
    epoch, loader_state, scalars, specs = header
    received: dict[str, np.ndarray] = {}
    for name, shape, dtype in specs:
        if comm.rank == 0:
            buf = np.array(arrays[name], order="C", copy=True)
        else:
            buf = np.empty(shape, dtype=np.dtype(dtype))
        comm.broadcast(buf.reshape(-1).view(np.uint8), root=0)  # bytes: any dtype, 0-d too
        received[name] = buf
    xp = backend.array_module(opt.flat_params)
    opt.flat_params[...] = xp.asarray(received.pop("params"))
    state = dict(scalars)
    state.update({k[len("optimizer/") :]: v for k, v in received.items()})
    opt.load_state_dict(state)  # the parameter server's wrapper loads its shards too
    loader.load_state_dict(loader_state)
    return int(epoch)


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or backend.is_gpu_array(value)


def choose_carry(
    actors: list[Any], lost: list[int], enabled: bool = True
) -> tuple[int, dict[str, Any]] | None:
    """Driver side: (rank, ``summary``) of the survivor whose carry the next run resumes from,
    rank 0's when it has one (it stays the writer of the run directory), else the furthest;
    None when none has one or ``enabled`` is False (every survivor then drops its carry). The
    other survivors keep theirs until the next run finished a step past it (``Rank``): should
    the chosen one die before that, the run after it resumes from one of them, not from the
    epoch's checkpoint (a second death during a recovery; seen in ``distnet bench chaos``)."""
    import ray  # noqa: PLC0415

    survivors = [r for r in range(len(actors)) if r not in lost]
    infos: dict[int, Any] = {}
    for r in survivors:
        try:
            infos[r] = ray.get(actors[r].carry_info.remote(), timeout=30)
        except ray.exceptions.RayError:
            infos[r] = None
    held = [r for r in survivors if infos[r] is not None]
    chosen = None
    if enabled and held:
        far = lambda r: (infos[r]["stage"], infos[r]["epoch"], infos[r]["samples_seen"])  # noqa: E731
        rank = 0 if 0 in held else max(held, key=far)
        chosen = (rank, infos[rank])
    drops = [actors[r].drop_carry.remote() for r in survivors if chosen is None]
    try:  # before the next run starts there (actor calls may run concurrently)
        ray.get(drops, timeout=30)
    except ray.exceptions.RayError:
        pass  # a survivor that cannot answer will not be rank 0 of the next group
    return chosen


def share_carry(actors: list[Any], lost: list[int], chosen: int) -> None:
    """Driver side: every other survivor without a carry of its own gets a copy of survivor
    ``chosen``'s (bounded wait). Its own capture may have failed: in sync ps rank 0 ends the
    stage's server right after taking its carry, and a survivor whose shards' check came later
    found no server to ask (seen in ``distnet bench chaos``). The loader state in a carry is
    the whole group's (``apply_carry`` hands rank 0's to every rank), so any survivor can be
    the next rank 0 with it."""
    import ray  # noqa: PLC0415

    ref = actors[chosen].carry_copy.remote()
    others = [a for r, a in enumerate(actors) if r not in lost and r != chosen]
    try:
        ray.get([a.keep_carry.remote(ref) for a in others], timeout=60)
    except ray.exceptions.RayError:
        pass  # a survivor that cannot take it will not resume from it
