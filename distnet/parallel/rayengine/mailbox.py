"""A Ray worker's ``Mailbox``, and the errors of a group that lost a member.

Messages are small actor calls ``deliver(generation, seq, src, payload)`` into the receiving
actor's mailbox (the worker actor is threaded, so deliveries arrive while its training thread
waits; ``RayCommunicator`` takes them out). Every wait has a timeout, and the driver can
``abort`` a mailbox (a peer died): the waiting collective then raises ``WorkerLostError``, and
what else the worker waits on (a parameter server's rounds) ends through ``on_abort``.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class WorkerLostError(RuntimeError):
    """A peer of this collective died or the driver stopped the group (the job may go on
    with a replacement: see ``distnet.parallel.rayengine.driver``)."""


class JoinFailed(WorkerLostError):
    """A replacement could not take its place in the running group (its collectives did not
    match the log it was given): the engine runs the job again instead."""

    group_may_restart = True


class Mailbox:
    """Messages for one worker, keyed by (generation, seq, src); thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._messages: dict[tuple[int, int, int], Any] = {}
        self._aborted: str | None = None
        # what else this worker waits on (a parameter server's rounds) must end on abort too
        self._on_abort: list[Any] = []

    def put(self, generation: int, seq: int, src: int, payload: Any) -> None:
        with self._cond:
            self._messages[(generation, seq, src)] = payload
            self._cond.notify_all()

    def take(self, generation: int, seq: int, src: int, timeout_s: float, what: str) -> Any:
        """Removes and returns the message; raises ``WorkerLostError`` on abort or timeout."""
        key = (generation, seq, src)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while key not in self._messages:
                if self._aborted is not None:
                    raise WorkerLostError(f"{what}: {self._aborted}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerLostError(
                        f"{what}: no message from rank {src} within {timeout_s:.0f} s"
                    )
                self._cond.wait(min(left, 1.0))
            return self._messages.pop(key)

    def abort(self, reason: str) -> None:
        """Every current and later ``take`` raises ``WorkerLostError(reason)``; the callbacks
        of ``on_abort`` run (once)."""
        with self._cond:
            self._aborted = reason
            self._cond.notify_all()
            callbacks, self._on_abort = self._on_abort, []
        for callback in callbacks:
            callback(reason)

    def on_abort(self, callback: Any) -> None:
        """``callback(reason)`` on the next abort (at once if this group is aborted already)."""
        with self._cond:
            reason = self._aborted
            if reason is None:
                self._on_abort.append(callback)
        if reason is not None:
            callback(reason)

    def check(self) -> None:
        """Raises ``WorkerLostError`` when the group was aborted (for waits outside the
        mailbox: a parameter-server round that a dead worker will never complete)."""
        reason = self._aborted
        if reason is not None:
            raise WorkerLostError(reason)

    def reset(self) -> None:
        """Forgets messages and the abort (a new generation of the group starts)."""
        with self._cond:
            self._messages.clear()
            self._aborted = None
            self._on_abort = []
