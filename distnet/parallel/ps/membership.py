"""Workers that leave and join a running parameter server (async and ssp modes).

The OSDI 2014 parameter server lets nodes leave and join while the others go on; this mixin
gives ``ParameterServerShard`` the same for its workers:

- ``leave(token, worker)``: the worker died. It no longer counts as live, so ssp's bound (a
  worker may start a step only when it is at most s clocks ahead of the slowest) is taken over
  the live workers only and the survivors are never held for it; pushes that still arrive from
  it (a retry in flight when it died) are ignored, never applied.
- ``join(token, worker, clock=None)``: a replacement takes the worker's index under a new
  *incarnation*: its pushes carry it, and a push of an older incarnation is ignored. It starts
  at the slowest live worker's clock, or at ``clock`` (the Ray engine passes the dead
  worker's: its replacement takes over the dead worker's data at that step, and since every
  epoch ends with a collective of all workers, a replacement numbered from the survivors'
  clock would wait for them in ssp while they wait for it at the epoch's end). Returns
  ``(clock, incarnation)``; the replacement numbers its steps from that clock.

Every leave and join is noted in ``membership`` (worker, every worker's clock, the shard's
version, the time), which ``stats()`` shows: the clocks the survivors advanced between a
leave and the following join are the steps they made while the worker was being replaced.
``sync`` rounds wait for every worker by design: leave and join are refused there.
"""

from __future__ import annotations

import hmac
import time
from typing import Any


class MembershipRefused(ValueError):
    """A leave or join that was not from this job or not possible in this mode."""


class Membership:
    """Mixin of ``ParameterServerShard``: live workers and their incarnations.

    The class using it sets ``num_workers``, ``clocks``, ``mode``, ``version``, ``_token``,
    ``_clock_changed`` (an ``asyncio.Condition``) and ``_where()``; it calls
    ``_init_membership()`` in its constructor and ``_admits(worker, incarnation)`` before it
    applies a push.
    """

    def _init_membership(self) -> None:
        self.left: set[int] = set()  # workers that left and were not replaced yet
        self.incarnations = [0] * self.num_workers
        self.ignored_pushes = [0] * self.num_workers  # from a worker gone or an old incarnation
        self.membership: list[dict[str, Any]] = []

    def live_slowest(self) -> int:
        """The smallest clock among the live workers (0 when none is live)."""
        live = [c for w, c in enumerate(self.clocks) if w not in self.left]
        return min(live, default=0)

    def _admits(self, worker: int, incarnation: int) -> bool:
        """Whether a push of ``worker``'s ``incarnation`` may be applied (counts the others)."""
        if worker in self.left or incarnation < self.incarnations[worker]:
            self.ignored_pushes[worker] += 1
            return False
        return True

    def _check_member(self, token: str, worker: Any, what: str) -> None:
        where = f"{self._where()}: {what} of worker {worker!r} refused"
        if not isinstance(token, str) or not hmac.compare_digest(token, self._token):
            raise MembershipRefused(f"{where}: not this job's token")
        if not isinstance(worker, int) or not 0 <= worker < self.num_workers:
            raise MembershipRefused(f"{where}: not in [0, {self.num_workers})")
        if self.mode == "sync":
            raise MembershipRefused(
                f"{where}: a sync round waits for every worker (the Ray engine restarts the "
                "group instead)"
            )

    def _note(self, event: str, worker: int) -> None:
        self.membership.append({
            "event": event, "worker": worker, "clocks": list(self.clocks),
            "version": self.version, "incarnation": self.incarnations[worker],
            "time": time.time(),
        })  # fmt: skip

    async def leave(self, token: str, worker: int) -> dict[str, Any]:
        """``worker`` is gone: ssp waits no longer count it, its late pushes are ignored.
        Returns ``{"clock": its clock here, "clocks": every worker's}`` (the steps it pushed
        to this shard)."""
        self._check_member(token, worker, "leave")
        self.left.add(worker)
        self._note("leave", worker)
        if self.replicated:
            await self._forward(self._op_members())
        async with self._clock_changed:  # ssp waits re-check their bound without it
            self._clock_changed.notify_all()
        return {"clock": self.clocks[worker], "clocks": list(self.clocks)}

    async def join(self, token: str, worker: int, clock: int | None = None) -> tuple[int, int]:
        """A replacement takes ``worker``'s index under a new incarnation; returns ``(clock,
        incarnation)`` to push with (its next push carries clock + 1).

        ``clock`` None: it starts at the slowest live worker's clock. Given: it goes on with
        the dead worker's numbering from there (the Ray engine's replacement takes over the
        dead worker's data at that step); a push this shard already applied from the dead
        worker (clock <= the one it holds) is then taken as done, not applied again."""
        self._check_member(token, worker, "join")
        if worker not in self.left:
            raise MembershipRefused(
                f"{self._where()}: join of worker {worker} refused: it did not leave"
            )
        if clock is None:
            live = len(self.left) < self.num_workers
            self.clocks[worker] = self.live_slowest() if live else self.clocks[worker]
        else:
            self.clocks[worker] = max(self.clocks[worker], int(clock))
        self.left.discard(worker)
        self.incarnations[worker] += 1
        self._note("join", worker)
        if self.replicated:
            await self._forward(self._op_members())
        async with self._clock_changed:
            self._clock_changed.notify_all()
        return self.clocks[worker], self.incarnations[worker]

    def membership_state(self) -> dict[str, Any]:
        """What a snapshot keeps of the membership (a restarted shard must not wait for a
        worker that left)."""
        return {"left": sorted(self.left), "incarnations": list(self.incarnations)}

    def load_membership(self, meta: dict[str, Any]) -> None:
        self.left = {int(w) for w in meta.get("left", [])}
        self.incarnations = [int(i) for i in meta.get("incarnations", self.incarnations)]
