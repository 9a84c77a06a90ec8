"""``DistributedOptimizer``: Horovod's wrapper, over distnet's flat buffers.

Wrap any ``distnet.optim`` optimiser; use it exactly as before::

    comm = distnet.parallel.init()
    opt = DistributedOptimizer(SGD(model.parameters(), lr=0.1), comm)
    for x, y in loader:            # this rank's shard of each global batch
        opt.zero_grad(); loss(model(x), y).backward(); opt.step()
        # or opt.backward(loss) instead of loss.backward(): the weighting then costs nothing

What it adds:

- On construction, rank 0's parameters and optimiser state are broadcast so that every replica
  starts equal. (It must happen before the first forward pass: a gradient computed on
  parameters that differ from rank 0's would be averaged into the first update.)
- ``step()`` sums the flat gradient buffer over ranks in buckets (views, no copies), each rank's
  gradient weighted by its share of the global batch (``1/size`` by default), then runs the
  wrapped optimiser's ``step()``. The update equals one taken on the whole global batch.
- ``overlap=True``: buckets are started (non-blocking ``Iallreduce``) from the parameters'
  grad-ready hooks while backward goes on, in a fixed bucket order on every rank.
- ``backward_passes_per_step=k`` (Horovod's name): gradients of k backward passes are
  accumulated locally and reduced once, on the last one; the update is the one of a single
  pass over the k micro-batches together.
- ``update_in_backward=True`` on the wrapped optimiser: each bucket's slice is updated as
  soon as that bucket's reduction completes, inside backward with overlap, bit-identical to
  updating after it (``distnet.parallel.bucket_updates``: what falls back, and why).
- A stall check names ranks that have not reached a step the others are waiting in (the
  communicator's, ``distnet.parallel.stall.watch_stalls``: every collective counts).

What it is: like Horovod's ``DistributedOptimizer``, the object returned is an instance of a
subclass of the wrapped optimiser's class (``DistributedOptimizer(SGD(...), comm)`` is an
``SGD`` and an ``optim.Optimizer``), so schedules, callbacks and checkpoints treat it as the
optimiser it is. It shares the wrapped optimiser's state (the same attribute dictionary:
lr, step count, state arrays), so writing ``lr`` on either is seen by both; the wrapped
object's own ``step()`` stays the local update without communication (``opt.optimizer``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from distnet.backend import array_module, is_gpu_array
from distnet.parallel import bucket_updates
from distnet.parallel.buckets import Bucket, BucketReducer, plan_buckets
from distnet.parallel.comm import Communicator
from distnet.parallel.stall import watch_stalls
from distnet.parallel.sync import check_share


def _overlap_default() -> bool:
    # Measured on 2-core CPU nodes: MPICH moves a non-blocking allreduce only inside MPI
    # calls, so overlap gained nothing there (see distnet/bench/allreduce.py --overlap).
    return os.environ.get("DISTNET_OVERLAP", "0") == "1"


_CLASSES: dict[tuple[type, type], type] = {}


def _distributed_class(cls: type, base: type) -> type:
    """The class ``cls`` + ``base`` (e.g. DistributedOptimizer over SGD), made once per pair."""
    made = _CLASSES.get((cls, base))
    if made is None:
        made = type(f"{cls.__name__}[{base.__name__}]", (cls, base), {"__module__": __name__})
        _CLASSES[(cls, base)] = made
    return made


class DistributedOptimizer:
    """Data-parallel optimiser: the wrapped optimiser's class plus gradient averaging.

    ``DistributedOptimizer(opt, comm, ...)`` returns an instance of a class derived from both
    this class and ``type(opt)`` (Horovod's design), sharing ``opt``'s state.

    Args:
        optimizer: has ``params``, ``flat_params`` and ``flat_grads`` (1-D, shape ``(n,)``),
            ``step()``, ``zero_grad()``, ``state_dict()``, ``load_state_dict()`` and
            ``state_buffers()`` (every ``distnet.optim`` optimiser does).
        comm: from ``distnet.parallel.init()``.
        bucket_mb: bucket size in MiB (0: one bucket per parameter).
        compression: None, or ``"fp16"`` to send gradients as float16.
        batch_share: this rank's fraction of every global batch (all ranks' shares sum to 1);
            None means ``1/size``. ``backward(loss, batch_share=...)`` or
            ``step(batch_share=...)`` overrides it for one step.
        overlap: start buckets from grad-ready hooks during backward (None: ``DISTNET_OVERLAP``).
        backward_passes_per_step: backward passes accumulated before each ``step()``; the
            gradients are averaged over them and reduced once, on the last pass.
        stall_check_s: report ranks missing from a collective after this long (None: off;
            default 60 s or ``DISTNET_STALL_CHECK_S``); ``stall_abort_s`` also ends the job
            (default ``DISTNET_STALL_ABORT_S``). Both set the communicator's check (MPI).
        hierarchical: True/False/"auto" sets the communicator's hierarchical allreduce (inside
            nodes, then across node leaders); None keeps its choice.
    """

    # after synchronize(), flat_grads holds the same reduced gradient on every rank: fit's
    # finite decision reads it there and needs no exchange of its own (train.loop.finite)
    grads_agree = True

    def __new__(cls, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(optimizer, DistributedOptimizer) or "_wrapped" in getattr(
            optimizer, "__dict__", {}
        ):
            raise TypeError(
                f"{type(optimizer).__name__} is already distributed: wrap a new optimiser"
            )
        if issubclass(cls, type(optimizer)):  # cls is already the combined class
            return object.__new__(cls)
        return object.__new__(_distributed_class(cls, type(optimizer)))

    def __init__(
        self,
        optimizer: Any,
        comm: Communicator,
        bucket_mb: float = 25,
        compression: str | None = None,
        batch_share: float | None = None,
        *,
        overlap: bool | None = None,
        backward_passes_per_step: int = 1,
        stall_check_s: float | None = -1.0,
        stall_abort_s: float | None = -1.0,
        hierarchical: bool | str | None = None,
    ) -> None:
        # One state, two faces: lr, steps and state arrays written through either are seen by
        # both (a schedule made over the wrapped optimiser keeps working).
        self.__dict__ = optimizer.__dict__
        self._wrapped = optimizer
        self.comm = comm
        if hierarchical is not None:  # None: the communicator's choice (auto / env)
            comm.set_hierarchical(hierarchical)
        self.params: Sequence[Any] = list(optimizer.params)
        self.batch_share = check_share(batch_share)
        if int(backward_passes_per_step) < 1:
            raise ValueError(
                f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}"
            )
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.bucket_bytes = int(bucket_mb * 2**20)
        sizes = [int(p.data.size) for p in self.params]
        if sum(sizes) != self.flat_grads.size:
            raise ValueError(
                f"parameters hold {sum(sizes)} elements but flat_grads has {self.flat_grads.size}"
            )
        self.buckets: list[Bucket] = plan_buckets(
            sizes, self.bucket_bytes, self.flat_grads.dtype.itemsize
        )
        self._setup_gpu()
        self.compression = compression
        self._reduced_updates = bucket_updates.take_over(self)
        self.reducer = BucketReducer(self.flat_grads, comm, compression)
        self._hand_on_reductions()
        # the communicator's check (made with it from the environment): set only if asked
        custom = stall_check_s != -1.0 or stall_abort_s != -1.0
        self.stall = getattr(comm, "stall", None)
        if custom and comm.size > 1 and comm.engine == "mpi":
            self.stall = watch_stalls(comm, stall_check_s, stall_abort_s)
        self.overlap = _overlap_default() if overlap is None else overlap
        self._hooked = False
        self._prescaled = False  # set by backward(), cleared by step()
        self._backward_share: float | None = None
        self._synchronized = False  # set by synchronize(), cleared by backward/zero_grad/step
        if self.overlap and comm.size > 1:
            self._hooked = self._register_hooks()
        self.broadcast_state()

    def _hand_on_reductions(self) -> None:
        """With the update inside backward, each reduced bucket goes to its update."""
        if self._reduced_updates is not None:
            self.reducer.on_reduced = self._reduced_updates.bucket_reduced

    @property
    def update_in_backward(self) -> bool:
        """Whether each bucket is updated as soon as its reduction completes, in the coming
        steps (asked for, and no reason to wait for the whole gradient)."""
        return self._reduced_updates is not None and not self.whole_gradient_reasons

    @property
    def optimizer(self) -> Any:
        """The wrapped optimiser (same state; its ``step()`` updates without communication)."""
        return self._wrapped

    def algorithm(self) -> str:
        """The update rule's class name (``SGD``, ``Adam``): what checkpoints record."""
        return type(self._wrapped).__name__

    # --- setup ----------------------------------------------------------------------------
    def _setup_gpu(self) -> None:
        """Collective: NCCL when every rank holds GPU buffers, else host staging for GPU ones."""
        if self.comm.size == 1 or not hasattr(self.comm, "use_nccl"):
            return
        on_gpu = self.comm.allgather(is_gpu_array(self.flat_grads))
        if all(on_gpu):
            self.comm.use_nccl()
        elif any(on_gpu) and self.comm.rank == 0:
            self.comm.log("mixed CPU/GPU ranks: GPU gradients go through host memory")

    def _register_hooks(self) -> bool:
        """Hooks on every parameter, or False when the autodiff core offers none."""
        if not all(hasattr(p, "register_grad_ready_hook") for p in self.params):
            self.comm.log(
                "overlap off: parameters have no register_grad_ready_hook", all_ranks=False
            )
            return False
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._buckets_of: list[list[int]] = [[] for _ in self.params]
        for b, bucket in enumerate(self.buckets):
            for i in bucket.params:
                self._buckets_of[i].append(b)
        self._reset_overlap()
        self._unhook = [p.register_grad_ready_hook(self._grad_ready) for p in self.params]
        return True

    def _reset_overlap(self) -> None:
        self._missing = [len(b.params) for b in self.buckets]
        self._passes = [0] * len(self.params)  # backward passes seen per parameter this step
        self._next = 0  # buckets start strictly in order, so every rank issues the same sequence

    def broadcast_state(self, root: int = 0) -> None:
        """Collective: copies root's parameters and optimiser state buffers to every rank."""
        if self.comm.size == 1:
            return
        # scalars too: Adam's bias correction depends on the step count, and a replica with
        # another lr or step count would drift from the others without any error
        scalars = self.comm.allgather((getattr(self, "lr", None),
                                       getattr(self, "steps", None)))[root]  # fmt: skip
        for name, value in zip(("lr", "steps"), scalars, strict=True):
            if value is not None:
                setattr(self, name, value)
        self.comm.broadcast(self.flat_params, root)
        buffers = list(self.state_buffers()) if hasattr(self, "state_buffers") else []
        counts = self.comm.allgather(len(buffers))
        if len(set(counts)) != 1:
            raise RuntimeError(f"ranks hold different numbers of optimiser state buffers: {counts}")
        for buf in buffers:
            self.comm.broadcast(buf, root)

    # --- weighting and overlap ------------------------------------------------------------
    def _weight(self, share: float | None) -> float:
        """What this rank's gradient buffer is multiplied by before the sum over ranks."""
        if self._prescaled:
            return 1.0  # backward() already weighted the gradients
        share = self.batch_share if share is None else share
        share = 1.0 / self.comm.size if share is None else share
        return share / self.backward_passes_per_step

    def backward(self, loss: Any, batch_share: float | None = None) -> None:
        """``loss.backward()`` with this rank's weight (its batch share, or ``1/size``, over
        ``backward_passes_per_step``) as the seed gradient, so the gradients come out
        weighted and ``step()`` skips its pass over the gradient buffer (measured: that pass
        is ~25% of a 2-rank allreduce here).

        ``loss``: a scalar Tensor, the mean loss over this rank's samples.
        """
        check_share(batch_share)
        if self._prescaled and batch_share != self._backward_share:
            raise ValueError(
                f"backward passes of one step were given different shares "
                f"({self._backward_share} and {batch_share})"
            )
        self._prescaled = False
        weight = self._weight(batch_share)
        self._backward_share = batch_share
        self._synchronized = False
        xp = array_module(loss.data)
        self._prescaled = True  # before backward: overlap hooks start buckets inside it
        try:
            loss.backward(xp.full(loss.shape, weight, dtype=loss.dtype))
        except BaseException:
            self._prescaled = False
            raise

    def _grad_ready(self, param: Any) -> None:
        if not self._hooked:  # overlap switched off after the hooks were registered
            return
        i = self._index[id(param)]
        self._passes[i] += 1
        self._synchronized = False
        if self._passes[i] > self.backward_passes_per_step:
            raise RuntimeError(
                f"parameter {param.name!r} got {self._passes[i]} backward passes before "
                f"step(), but with overlap=True its bucket is reduced during pass "
                f"{self.backward_passes_per_step}: to accumulate gradients pass "
                f"backward_passes_per_step={self._passes[i]} (or more) to DistributedOptimizer"
            )
        if self._passes[i] < self.backward_passes_per_step:
            return  # still accumulating: the buffer must not be on the wire yet
        for b in self._buckets_of[i]:
            self._missing[b] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self.reducer.start(self.buckets[self._next], self._weight(None))
            self._next += 1
        self.reducer.progress()

    # --- the optimiser interface ----------------------------------------------------------
    def synchronize(self, batch_share: float | None = None) -> Any:
        """Sums the weighted gradients over ranks into ``flat_grads`` and waits for every
        reduction; returns it. ``step()`` then does not reduce again (Horovod's
        ``synchronize()`` before ``step()``, e.g. to read or clip the averaged gradients)."""
        check_share(batch_share)
        if self._synchronized:
            return self.flat_grads
        if self._prescaled and batch_share is not None and batch_share != self._backward_share:
            raise ValueError(
                f"backward(loss) weighted the gradients by share {self._backward_share}, "
                f"step() was given batch_share={batch_share}: pass the share to backward()"
            )
        weight = self._weight(batch_share)
        # zero_grad() defers its memset to the next backward: a rank with no samples this
        # step (or a parameter backward did not reach) would otherwise send stale gradients.
        self.settle_grads()  # also follows a re-layout of the parameters (follow_layout)
        if self._hooked:
            started = self._next > 0  # with the default weight, by the hooks
            if (
                started
                and batch_share is not None
                and batch_share != self.batch_share
                and not self._prescaled
            ):
                raise ValueError(
                    "with overlap, buckets start during backward: set opt.batch_share before "
                    "backward (or pass it to opt.backward) instead of step(batch_share=...)"
                )
            short = max(self._passes)
            if 0 < short < self.backward_passes_per_step:
                self._reset_overlap()  # the next step starts counting afresh
                raise RuntimeError(
                    f"step() after {short} backward pass(es), but backward_passes_per_step="
                    f"{self.backward_passes_per_step}: the accumulated gradient would be "
                    f"{short}/{self.backward_passes_per_step} of the average"
                )
            # Buckets the hooks did not start (parameters without gradients) start now.
            for bucket in self.buckets[self._next :]:
                self.reducer.start(bucket, weight)
            self._reset_overlap()
            reduced = self.reducer.finish(raise_overflow=False)
        else:
            reduced = self.reducer.reduce(self.buckets, weight, raise_overflow=False)
        self._synchronized = True
        return reduced

    def step(self, batch_share: float | None = None) -> None:
        """Averages gradients over ranks (weighted by batch share), then one optimiser step
        (the wrapped class's ``step``)."""
        try:
            self.synchronize(batch_share)
        finally:
            self._prescaled = False
            self._backward_share = None
        self._synchronized = False
        if self.reducer.overflow is not None:
            # an fp16 sum that overflowed reaches step() only when nobody checked it (fit's
            # finite decision skips or stops before): never apply it
            raise self.reducer.overflow
        if self._reduced_updates is not None and self._reduced_updates.finish_step():
            return  # every bucket was updated as its reduction completed
        super().step()  # type: ignore[misc]

    def zero_grad(self) -> None:
        """Zeroes the gradients (the wrapped class's ``zero_grad``)."""
        self.follow_layout()  # before backward: overlap hooks reduce during it
        self._synchronized = False
        # a step that fit skipped (non-finite) left backward's weighting noted: forget it
        self._prescaled = False
        self._backward_share = None
        if self._reduced_updates is not None:  # a step fit skipped never reached step()
            self._reduced_updates.reset()
        super().zero_grad()  # type: ignore[misc]

    def follow_layout(self) -> bool:
        """The wrapped class's ``follow_layout``; a moved gradient buffer gets a new reducer."""
        follow = getattr(super(), "follow_layout", None)
        if follow is None or not follow():
            return False
        self.reducer = BucketReducer(self.flat_grads, self.comm, self.compression)
        self._hand_on_reductions()
        return True

    def close(self) -> None:
        """Removes the grad-ready hooks (the stall check is the communicator's: it stays).

        Call it when a stage is done with its parameters: a later wrapper over the same
        parameters must be the only one that reduces their gradients.
        """
        for remove in getattr(self, "_unhook", []):
            remove()
        self._unhook = []
        self._hooked = False
