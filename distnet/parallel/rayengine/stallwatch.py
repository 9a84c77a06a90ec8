"""The Ray engine's stall check: the driver watches where its workers are.

The MPI engine's check (``distnet.parallel.stall``) runs on rank 0 over MPI; a Ray job has a
driver that waits on every worker anyway, so the driver does it: every ``poll_s`` it asks each
worker actor (a threaded actor: it answers while its training thread waits) for its
communicator's last collective (sequence number, operation; the Ray mailbox numbers them) and
its last parameter-server round. When the slowest worker has not moved (no collective, no
round) for ``warn_after_s`` while another is ahead of it, and is not in declared work
(``distnet.parallel.stall.working``: rank 0 starting the parameter server's shards, say), the
driver asks every worker for the
Python stack of its training thread and logs the report, the same text as MPI's, and writes it
to the run directory's ``stall.json`` (report.html shows it). With ``abort_after_s`` the job
then ends with a ``RayEngineError`` instead of waiting for the collective timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distnet.parallel.stall import (
    ASK_S,
    describe_places,
    save_report,
    set_report_dir,
    stall_abort_from_env,
    stall_limit_from_env,
)


class RayStallWatch:
    """Polled by the driver's wait loop (``poll()``); ``actors``: the group, rank order."""

    def __init__(
        self,
        actors: list[Any],
        log: Callable[[str], None],
        run_dir: str | None,
        warn_after_s: float | None = -1.0,
        abort_after_s: float | None = -1.0,
        poll_s: float = 1.0,
    ) -> None:
        self.actors, self.log, self.run_dir = actors, log, run_dir
        self.warn_after_s = stall_limit_from_env() if warn_after_s == -1.0 else warn_after_s
        self.abort_after_s = stall_abort_from_env() if abort_after_s == -1.0 else abort_after_s
        self.poll_s = poll_s
        self.reports: list[str] = []
        self._asked: list[Any] | None = None  # the refs of the progress questions in flight
        self._next_ask = 0.0
        self._places: list[tuple[int, str, bool]] = []  # per rank: (seq, round, working)
        self._slowest: tuple[int, Any] | None = None  # (rank, its place) being timed
        self._since = time.monotonic()
        self._warned = False

    @property
    def active(self) -> bool:
        return self.warn_after_s is not None and len(self.actors) > 1

    def poll(self) -> str | None:
        """Takes in the answers that arrived, asks again when due; returns the error text when
        the job must end (a stall past ``abort_after_s``), else None. Never blocks long."""
        import ray  # noqa: PLC0415

        if not self.active:
            return None
        now = time.monotonic()
        if self._asked is not None:
            ready, _ = ray.wait(self._asked, num_returns=len(self._asked), timeout=0)
            if len(ready) < len(self._asked):
                return None  # a busy actor: the answers come with a later poll
            try:
                places = ray.get(self._asked, timeout=0)
            except ray.exceptions.RayError:
                places = None  # a worker died: the driver's own loop handles it
            self._asked = None
            if places is not None:
                return self._judge(places, now)
        if self._asked is None and now >= self._next_ask:
            self._asked = [a.progress.remote() for a in self.actors]
            self._next_ask = now + self.poll_s
        return None

    def _judge(self, places: list[tuple[int, str, bool]], now: float) -> str | None:
        seqs = [int(place[0]) for place in places]
        front, slowest = max(seqs), seqs.index(min(seqs))
        mark = (slowest, tuple(places[slowest]))
        laggards = [r for r, s in enumerate(seqs) if s < front]
        if (front == seqs[slowest] or mark != self._slowest
                or all(len(places[r]) > 2 and places[r][2] for r in laggards)):  # fmt: skip
            # nobody waits for anyone, the slowest moved (a collective or a round), or the
            # ranks waited for are in declared work: the clock starts again
            self._slowest, self._since, self._warned = mark, now, False
            return None
        waited = now - self._since
        waiting = [r for r in range(len(seqs)) if r not in laggards]
        if waited >= self.warn_after_s and not self._warned:  # type: ignore[operator]
            self._warned = True
            msg = (
                f"stall: ranks {laggards} have not joined collective #{front} for "
                f"{waited:.0f} s; ranks {waiting} are waiting in it"
            )
            self._report(msg, waited, laggards)
        if self.abort_after_s is not None and waited >= self.abort_after_s:
            return (
                f"stall: ranks {laggards} did not join collective #{front} within "
                f"{waited:.0f} s (the stall abort limit, DISTNET_STALL_ABORT_S); the job was "
                f"stopped (where every rank was: the log above"
                + (f", {Path(self.run_dir) / 'stall.json'})" if self.run_dir else ")")
            )
        return None

    def _report(self, msg: str, waited: float, laggards: list[int]) -> None:
        import ray  # noqa: PLC0415

        refs = [a.where.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=ASK_S)
        ranks = []
        for rank, ref in enumerate(refs):
            try:
                ranks.append(ray.get(ref, timeout=0) if ref in ready else None)
            except ray.exceptions.RayError:
                ranks.append(None)
            if ranks[-1] is None:
                ranks[-1] = {"rank": rank, "seq": None, "op": None, "round": "",
                             "stack": f"(no answer within {ASK_S:.0f} s)"}  # fmt: skip
        self.reports.append(msg)
        self.log(describe_places(msg, ranks))
        set_report_dir(self.run_dir)
        save_report(msg, waited, laggards, ranks)
