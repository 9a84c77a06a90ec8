"""A shard's checks: who may call it, and what a push must look like before it is applied.

Mixed into ``ParameterServerShard`` (as ``Membership`` and ``ShardLink`` are). Every push
carries the job's token; anything not from this job, or not a float32 array of the slice's
shape, is refused before the parameters are touched (``PushRefused``). Every call that reads
or writes the parameters or the optimiser state, or aborts, checks the token first
(``CallRefused``).
"""

from __future__ import annotations

import hmac
import math
from typing import Any

import numpy as np


class CallRefused(ValueError):
    """A call that did not carry this job's token (never retried)."""


class PushRefused(CallRefused):
    """A push that was not from this job or did not fit the shard (never retried)."""


class ShardChecks:
    """The token and push checks of a shard (needs ``lo``, ``hi``, ``mode``, ``num_workers``,
    ``refused``, ``_token`` and ``_where()``)."""

    lo: int
    hi: int
    mode: str
    num_workers: int
    refused: int
    _token: str
    _where: Any

    def _check(
        self,
        token: str,
        worker: int,
        grad: Any,
        share: float,
        clock: Any,
        seen: Any,
        lr: Any,
        site: Any = None,
    ) -> None:
        problem = self._sender_problem(token, worker) or self._push_problem(
            worker, grad, share, clock, seen, lr
        )
        if problem:
            self._refuse(problem if site is None else f"{problem} (pushed at {site})")

    def _refuse(self, problem: str) -> None:
        self.refused += 1
        raise PushRefused(f"{self._where()}: refused: {problem}")

    def _push_problem(
        self, worker: int, grad: Any, share: Any, clock: Any, seen: Any, lr: Any
    ) -> str | None:
        if grad is None:  # a skipped step; in sync every worker skips it, and none pushes
            if self.mode == "sync":
                return f"worker {worker} pushed a skipped step in sync mode"
        elif not isinstance(grad, np.ndarray) or grad.dtype != np.float32:
            kind = getattr(grad, "dtype", type(grad).__name__)
            return f"worker {worker} pushed {kind}, expected a float32 numpy array"
        elif grad.shape != (self.hi - self.lo,):
            return f"worker {worker} pushed shape {grad.shape}, expected {(self.hi - self.lo,)}"
        if not (isinstance(share, float | int) and math.isfinite(share) and 0 <= share <= 1):
            return f"worker {worker} pushed batch share {share!r}, expected a number in [0, 1]"
        if not (isinstance(clock, int) and isinstance(seen, int) and clock > 0 and seen >= 0):
            return f"worker {worker} pushed clock {clock!r} / version {seen!r}: not counts"
        if lr is not None and not (isinstance(lr, float | int) and math.isfinite(lr) and lr > 0):
            return f"worker {worker} pushed learning rate {lr!r}, expected a positive number"
        return None

    def _sender_problem(self, token: Any, worker: Any) -> str | None:
        if not self._from_job(token):
            return "the push does not carry this job's token"
        if not isinstance(worker, int) or not 0 <= worker < self.num_workers:
            return f"worker index {worker!r} is not in [0, {self.num_workers})"
        return None

    def _from_job(self, token: Any) -> bool:
        return isinstance(token, str) and hmac.compare_digest(token, self._token)

    def _check_caller(self, token: Any, what: str) -> None:
        """Refuses ``what`` (a call other than a push) without this job's token."""
        if not self._from_job(token):
            self.refused += 1
            raise CallRefused(f"{self._where()}: {what} refused: not this job's token")
