"""The update inside backward under allreduce: each bucket's slice of the flat buffer is
updated as soon as that bucket's reduction over ranks completes.

``DistributedOptimizer(SGD(..., update_in_backward=True), comm)``: the wrapped optimiser's own
hooks (``distnet.optim.in_backward``, which would apply this rank's local gradient) are
removed, and the wrapper updates instead, from its ``BucketReducer``'s completions:

- ``overlap=True``: the grad-ready hooks start each bucket's allreduce during backward; after
  each hook the reducer tests the earliest started buckets and, for those whose sum has
  arrived, the update of their slice runs at once, while backward goes on computing the
  earlier layers and the later buckets are still on the wire (through shared memory the sum
  is done when it is started, so every bucket of at least ``DISTNET_SHM_MIN_BYTES`` (64 KiB)
  is updated inside backward);
- otherwise (the default on CPU nodes, ``DISTNET_OVERLAP=0``): ``synchronize()`` starts every
  bucket and waits for them in launch order; each bucket is updated as soon as its wait
  returns, while the later buckets are still being reduced, and its gradient still in cache.

``step()`` then has nothing left to update. Buckets are reduced in launch order (the last
layer first) and updated in that order, in groups of consecutive buckets of at least
``kernels.selection.MIN_ELEMENTS`` floats (a short remainder joins the group before it), so
each group's update takes the implementation the whole buffer takes.

Exactness: bit-identical to the update after the reduction (tested under mpiexec with SGD
momentum and Adam, with weight decay): every update rule is elementwise and reads the
reduced gradient, which is final once its bucket's sum arrived; a group is large enough to
run the same kernel as the whole buffer; ``steps`` is counted once, when the first group of a
step is updated (Adam's bias correction uses the step's own number); ``lr`` is read when a
group is updated (schedules change it between steps). Weight decay and L1 are elementwise
(``penalised_grads(part)`` reads the slice's parameters before their own update), so they
need nothing more than the slice. Gradient accumulation (``backward_passes_per_step > 1``)
is exact too: buckets are reduced, hence updated, only after the last pass.

What needs the whole gradient first, and falls back to the update after the reduction (the
reason logged once, at debug level, by ``distnet.optim.in_backward``):
- fit's non-finite check (``check_finite=True``, the default: a skipped step must leave every
  parameter and every state array as it was, but a bucket found non-finite may come after
  buckets already updated), and clipping by the global norm (none in distnet): the caller
  holds ``require_whole_gradient(reason)``; a step that begins under a reason updates after
  the reduction, whole;
- fp16 compression: a float16 sum that overflowed must stop the step before any update
  (``BucketReducer.overflow``), and it is known only once every bucket arrived.
A caller that reads or changes the reduced gradient between ``synchronize()`` and ``step()``
(Horovod's pattern for clipping) must hold ``require_whole_gradient`` too: with this feature
the update has happened by the time ``synchronize()`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distnet.kernels import selection
from distnet.optim.in_backward import decline
from distnet.parallel.buckets import Bucket

__all__ = ["ReducedBucketUpdates", "plan_groups", "take_over"]


def plan_groups(buckets: Sequence[Bucket], min_elements: int) -> list[list[int]]:
    """Indices of ``buckets`` (in launch order) in groups of consecutive buckets, each group
    holding at least ``min_elements`` elements; a short remainder joins the group before it.
    Consecutive buckets are adjacent in the buffer, so a group is one contiguous range."""
    groups: list[list[int]] = []
    members: list[int] = []
    count = 0
    for b, bucket in enumerate(buckets):
        members.append(b)
        count += bucket.size
        if count >= min_elements:
            groups.append(members)
            members, count = [], 0
    if members:
        if groups:
            groups[-1].extend(members)
        else:
            groups.append(members)
    return groups


class ReducedBucketUpdates:
    """Updates each group of reduced buckets of a ``DistributedOptimizer`` (``opt``: it is the
    wrapped optimiser too, with ``_update``, ``penalised_grads``, ``steps``).

    Args:
        opt: the distributed optimiser.
        buckets: its buckets in launch order (each ``[start, stop)`` of the flat buffer).
    """

    def __init__(self, opt: Any, buckets: Sequence[Bucket]) -> None:
        self.opt = opt
        self.buckets = list(buckets)
        self.index = {bucket: b for b, bucket in enumerate(self.buckets)}
        self.groups = plan_groups(self.buckets, selection.MIN_ELEMENTS)
        self.group_of = [0] * len(self.buckets)
        for g, members in enumerate(self.groups):
            for b in members:
                self.group_of[b] = g
        self.ranges = [
            (
                min(self.buckets[b].start for b in members),
                max(self.buckets[b].stop for b in members),
            )
            for members in self.groups
        ]
        self.reset()

    def reset(self) -> None:
        """Forgets this step's progress (a new step begins)."""
        self.missing = [len(m) for m in self.groups]
        self.updated = [False] * len(self.groups)
        self.in_pass = False  # some group of this step was updated (and ``steps`` counted)
        self.whole = False  # this step updates after the reduction (a reason held)

    def bucket_reduced(self, bucket: Bucket) -> None:
        """``bucket``'s sum over ranks is in ``flat_grads``: update its group when complete."""
        g = self.group_of[self.index[bucket]]
        self.missing[g] -= 1
        if self.missing[g] or self.whole:
            return
        opt = self.opt
        if not self.in_pass:
            if opt.whole_gradient_reasons:  # decided once per step, at its first group
                self.whole = True
                return
            opt.steps += 1  # the step's own number, for Adam's bias correction
            self.in_pass = True
        self.update(g)

    def update(self, g: int) -> None:
        lo, hi = self.ranges[g]
        part = slice(lo, hi)
        opt = self.opt
        opt._update(opt.flat_params[part], opt.penalised_grads(part), part)
        self.updated[g] = True

    def finish_step(self) -> bool:
        """Called by ``step()`` after the reduction: True when this step's update is done (it
        updates any group not updated yet); False when ``step()`` must update the whole
        buffer (a reason held when the step began)."""
        done = self.in_pass
        if done:
            for g in range(len(self.groups)):
                if not self.updated[g]:
                    self.update(g)
        self.reset()
        return done


def take_over(opt: Any) -> ReducedBucketUpdates | None:
    """For a ``DistributedOptimizer`` whose wrapped optimiser was made with
    ``update_in_backward=True``: removes the wrapped optimiser's own hooks (they would apply
    this rank's local gradient) and returns the updates driven by the reductions; None when
    the optimiser did not ask for it, or with fp16 compression (then it updates after the
    reduction, and says so once at debug level)."""
    if getattr(opt, "_in_backward", None) is None:
        return None
    if opt.compression is not None:
        decline(opt, f"{opt.compression} compression (an overflow stops the step)")
        return None
    opt._in_backward.close()
    opt._in_backward = None
    return ReducedBucketUpdates(opt, opt.buckets)
