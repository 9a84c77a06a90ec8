"""The update inside backward: each bucket of the flat buffer is updated as soon as its
gradient is final, while the rest of backward goes on (one process).

After backward, an update reads the parameters, the gradient and the optimiser state once
more (SGD momentum: 5 floats moved per parameter, 56 MB a step for the 2.8M-parameter MLP),
when the gradient has long left the caches. Here the parameters' grad-ready hooks
(``Tensor.register_grad_ready_hook``: a leaf's gradient for this pass is complete) mark their
parameter done; when every parameter of a bucket is done, the optimiser's own ``_update``
runs on that bucket's slice of the flat arrays, so the last layer is updated while the
earlier ones are still being differentiated. ``step()`` then updates the buckets whose
gradient never came (parameters outside this pass's graph: zero gradient, state still moves).

Exactness: every update distnet has is elementwise (the kernels of ``distnet.kernels``; the
L2/L1 penalties too, read from the parameter before its own update), so a slice gives the
same bits as the whole buffer provided the same implementation runs: buckets hold at least
``kernels.selection.MIN_ELEMENTS`` elements, the size from which the whole buffer also takes the
compiled kernels. The step number (Adam's bias correction, AdaGrad's decay) is the step's
own (``steps`` counts the step when its first bucket is updated). ``lr`` is read when a
bucket is updated: change it between ``step()`` and the next backward, as schedules do.

What needs the whole gradient first, and falls back to the update after backward:
- the training loop's non-finite check (``fit(check_finite=True)``, the default: a skipped
  step must leave every parameter untouched) and any clipping by the global norm (none in
  distnet today): the loop calls ``Optimizer.require_whole_gradient(reason)``;
- a distributed wrapper: the local gradient is not the one to apply. ``DistributedOptimizer``
  (allreduce) removes these hooks and updates each bucket as soon as its reduction completes
  instead (``distnet.parallel.bucket_updates``); ZeRO-1 and the parameter-server wrappers hold
  ``require_whole_gradient`` (their reduction is not per bucket); local SGD's local step is
  the local gradient's, so it keeps the update inside backward;
- gradient accumulation (two backward passes before one ``step()``): refused with an error
  on the second pass, since the first one already applied a partial gradient.
"""

from __future__ import annotations

import logging
from typing import Any

from distnet.kernels import selection

log = logging.getLogger(__name__)
_LOGGED: set[tuple[str, str]] = set()


def log_fallback(name: str, reason: str) -> None:
    """Says once per process, at debug level, that optimiser ``name`` asked for the update
    inside backward and updates after backward instead, and why."""
    if (name, reason) in _LOGGED:
        return
    _LOGGED.add((name, reason))
    log.debug("%s(update_in_backward=True) updates after backward: %s needs the whole "
              "gradient first", name, reason)  # fmt: skip


def decline(opt: Any, reason: str) -> None:
    """For a wrapper that applies no update before the whole gradient is reduced (ZeRO-1, a
    parameter server): removes ``opt``'s hooks, if it has them, for good and logs ``reason``
    once (the local gradient the hooks would apply is not the one to apply)."""
    if getattr(opt, "_in_backward", None) is None:
        return
    opt._in_backward.close()
    opt._in_backward = None
    log_fallback(opt.algorithm(), reason)


def plan(sizes: list[int], min_elements: int) -> list[tuple[int, int, list[int]]]:
    """Buckets (lo, hi, parameter indices) over consecutive parameters of the given sizes.

    Built from the last parameter backwards (the order backward completes them), each bucket
    closing once it holds ``min_elements``; a short remainder joins the bucket after it.
    """
    buckets: list[tuple[int, int, list[int]]] = []
    hi = sum(sizes)
    members: list[int] = []
    count = 0
    for i in range(len(sizes) - 1, -1, -1):
        members.insert(0, i)
        count += sizes[i]
        if count >= min_elements:
            buckets.append((hi - count, hi, members))
            hi, members, count = hi - count, [], 0
    if members:
        if buckets:
            lo, top, first = buckets.pop()
            buckets.append((hi - count, top, members + first))
        else:
            buckets.append((0, hi, members))
    return buckets[::-1]


class BackwardUpdates:
    """The hooks and bucket bookkeeping of one optimiser's update inside backward."""

    def __init__(self, opt: Any):
        self.opt = opt
        sizes = [p.size for p in opt.params]
        self.buckets = plan(sizes, selection.MIN_ELEMENTS)
        self.bucket_of = [0] * len(sizes)
        for b, (_, _, members) in enumerate(self.buckets):
            for i in members:
                self.bucket_of[i] = b
        self.missing = [len(m) for _, _, m in self.buckets]
        self.updated = [False] * len(self.buckets)
        self.ready = [False] * len(sizes)
        self.in_pass = False  # some bucket of the coming step was already updated
        self._unhook = [p.register_grad_ready_hook(self._hook(i)) for i, p in enumerate(opt.params)]

    def _hook(self, i: int) -> Any:
        return lambda leaf: self.grad_ready(i)

    def close(self) -> None:
        """Removes the hooks (the optimiser updates after backward again)."""
        for unhook in self._unhook:
            unhook()
        self._unhook = []

    def grad_ready(self, i: int) -> None:
        """Parameter i's gradient for this pass is complete: update its bucket when full."""
        opt = self.opt
        if opt.whole_gradient_reasons:
            return
        if self.ready[i]:
            raise RuntimeError(
                f"{type(opt).__name__}(update_in_backward=True): a second backward before "
                "step() (gradient accumulation) would apply a partial gradient; create the "
                "optimiser with update_in_backward=False to accumulate"
            )
        self.ready[i] = True
        b = self.bucket_of[i]
        self.missing[b] -= 1
        if self.missing[b] == 0:
            if not self.in_pass:
                opt.follow_layout()
                opt.steps += 1  # the step's own number, for Adam's bias correction
                self.in_pass = True
            self.update(b)

    def update(self, b: int) -> None:
        lo, hi, members = self.buckets[b]
        opt = self.opt
        for i in members:  # a deferred zero: this parameter took no part in the pass
            if opt.params[i]._grad_zeroed:
                opt.params[i].grad  # noqa: B018  (the getter writes the zeros)
        part = slice(lo, hi)
        opt._update(opt.flat_params[part], opt.penalised_grads(part), part)
        self.updated[b] = True

    def finish_step(self) -> bool:
        """Called by ``step()``: updates the buckets backward did not; False when no bucket
        was updated in backward (then ``step()`` updates the whole buffer at once)."""
        if not self.in_pass:
            self.reset()
            return False
        for b in range(len(self.buckets)):
            if not self.updated[b]:
                self.update(b)
        self.reset()
        return True

    def reset(self) -> None:
        self.missing = [len(m) for _, _, m in self.buckets]
        self.updated = [False] * len(self.buckets)
        self.ready = [False] * len(self.ready)
        self.in_pass = False
