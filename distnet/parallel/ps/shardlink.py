"""A shard's side of the same-node road (``link.py``): workers' outboxes and the board.

Mixed into ``ParameterServerShard`` (as ``Membership`` is): it maps a linked push's outbox
after the sender proved it is of this job, publishes the shard's reply onto its board after
every update once a worker is linked, and answers a linked worker with the board's ref.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet.parallel.ps import link


class ShardLink:
    """The board and the mapped outboxes of a shard (needs ``index``, ``lo``, ``hi``,
    ``version``, ``_reply()``, ``_refuse()``, ``_sender_problem()``)."""

    index: int
    lo: int
    hi: int
    version: int
    _reply: Any
    _refuse: Any
    _sender_problem: Any

    def _init_link(self) -> None:
        self._outboxes = link.PeerViews()
        self._board: link.Segment | None = None
        self._linked = False  # a worker pushed through the board: publish every update
        if link.enabled():
            try:
                self._board = link.Segment(self.hi - self.lo, f"distnet-ps-board-{self.index}")
            except OSError:
                self._board = None

    def _open_outbox(self, token: Any, worker: Any, ref: link.LinkRef) -> np.ndarray | None:
        """This shard's slice of a worker's outbox (read-only view), or None when it cannot
        be mapped here (another host: the worker then pushes arrays). Only a sender with this
        job's token gets its file opened; a ref smaller than the buffer is refused."""
        problem = self._sender_problem(token, worker)
        if problem is None and not (
            isinstance(ref.floats, int) and isinstance(ref.offset, int) and ref.offset >= 0
            and ref.offset + self.hi <= ref.floats
        ):  # fmt: skip
            problem = (
                f"worker {worker} pushed a segment of {ref.floats!r} floats at offset "
                f"{ref.offset!r}, too small for [{self.lo}:{self.hi})"
            )
        if problem:
            self._refuse(problem)
        if self._board is None:
            return None
        try:
            view = self._outboxes.get(worker, ref)
        except link.LinkError:
            return None
        if not self._linked:
            self._linked = True
            self._publish()
        return view.data[ref.offset + self.lo : ref.offset + self.hi]

    def _publish(self) -> None:
        """Writes the reply (parameters or summed gradient) onto the board for linked workers."""
        if self._linked and self._board is not None:
            self._board.publish(self._reply(), self.version)

    def _answer(self, linked: bool) -> tuple[int, Any]:
        """``(version, reply)``: the board's ref for a linked worker, else a copy of the array.

        A copy: Ray serialises a reply after the coroutine returned, in another thread, while
        the event loop may already run the next push's update (a kernel that releases the
        GIL) on the same array; the reply would then mix two versions."""
        if linked and self._board is not None:
            return self.version, self._board.ref
        return self.version, self._reply().copy()
