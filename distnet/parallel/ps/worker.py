"""``ParameterServerOptimizer``: ``DistributedOptimizer``'s interface over a ``ParameterServer``.

    opt = ParameterServerOptimizer(SGD(model, lr=0.1), ps, worker_index)
    for x, y in loader:
        opt.zero_grad(); opt.backward(loss(model(x), y)); opt.step()

On construction the model's flat parameter buffer is filled from the shards, so every worker
starts from the server's parameters. ``step()`` sends each shard its slice of the flat gradient
buffer (all shards at once, one call each: the slice crosses the object store once) and writes
the slices that come back into the flat parameter buffer; with the optimiser on the workers
(``optimizer_on="worker"``) the summed gradient comes back and the wrapped optimiser steps.

Gradient weights: in ``sync`` each worker's mean gradient is weighted by its batch share (1/W
by default), so the summed update equals one on the whole global batch. In ``async``/``ssp``
each push is a step of its own (Downpour), so it carries the worker's unweighted gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import backend, trace
from distnet.optim import in_backward
from distnet.parallel.ps import link
from distnet.parallel.ps.ledger import Ledger
from distnet.parallel.ps.pushcheck import push_site
from distnet.parallel.ps.server import ParameterServer
from distnet.parallel.stall import note_round
from distnet.parallel.sync import SyncOptimizer, check_share


class ParameterServerOptimizer(SyncOptimizer):
    """Data-parallel optimiser that synchronises through parameter-server shards.

    Args:
        optimizer: a ``distnet.optim`` optimiser over the model (``flat_params``,
            ``flat_grads``, ``zero_grad``, ``step``); with the optimiser on the shards only its
            buffers and ``lr`` are used (``lr`` is sent with every push, so schedules work).
        ps: the handle from ``ParameterServer.create`` (sent to this worker by the driver).
        worker_index: this worker's index in ``[0, ps.num_workers)``.
        batch_share: this worker's fraction of every global batch (sync; None: 1/W).
    """

    def __init__(
        self,
        optimizer: Any,
        ps: ParameterServer,
        worker_index: int,
        batch_share: float | None = None,
    ) -> None:
        if not 0 <= worker_index < ps.num_workers:
            raise ValueError(f"worker_index {worker_index} is not in [0, {ps.num_workers})")
        if optimizer.flat_params.size != ps.size:
            raise ValueError(
                f"the model has {optimizer.flat_params.size} parameters, the parameter server "
                f"{ps.size}"
            )
        self.optimizer, self.ps, self.worker_index = optimizer, ps, worker_index
        in_backward.decline(
            optimizer, "the parameter server (the update waits for the sum of every push)"
        )
        self.batch_share = check_share(batch_share)
        self.init_sync()
        self.clock = 0
        self.rounds_skipped = 0  # sync: steps every worker skipped (no round on the shards)
        self.incarnation = 0  # > 0: a replacement that joined the running server (join())
        self.seen_versions = [0] * len(ps.shards)
        self.acks = Ledger(3)  # (incarnation, clock, kind) every shard acknowledged
        self._weighted: np.ndarray | None = None
        # the same-node road (link.py): the weighted gradient goes into this worker's outbox
        # and every shard that can map it reads its slice there; a shard that answers
        # "unlinked" (another host) gets arrays from then on
        self._outbox: link.Segment | None = None  # made when the gradient is not in FLAT
        self._by_link = [link.enabled()] * len(ps.shards)
        self._boards = link.PeerViews()
        self._host_scratch: np.ndarray | None = None
        self._pull_all()

    def default_share(self) -> float:
        return 1.0 / self.ps.num_workers

    def weight(self, share: float | None) -> float:
        """sync: this worker's batch share; async/ssp: 1 (each push is a step of its own)."""
        return super().weight(share) if self.ps.mode == "sync" else 1.0

    @property
    def async_group(self) -> Any:
        """Who decides a step's fate together in async/ssp: nobody, each push stands alone."""
        return None

    def _pull_all(self) -> None:
        parts = self.ps.call_all("state_dict", self.ps.token)
        self.optimizer.follow_layout()
        xp = backend.array_module(self.optimizer.flat_params)
        for i, ((lo, hi), part) in enumerate(zip(self.ps.ranges, parts, strict=True)):
            self.optimizer.flat_params[lo:hi] = xp.asarray(part["params"])
            import json

            self.seen_versions[i] = int(json.loads(str(part["meta"]))["version"])

    # --- the synchronisation protocol (zero_grad, backward: ``SyncOptimizer``) ---------------
    def step(self, batch_share: float | None = None) -> None:
        """Pushes this worker's gradient slices, pulls the new parameter slices (waiting as
        the mode says: every worker in ``sync``, the slowest within s clocks in ``ssp``)."""
        self.push_gradient(self.step_weight(batch_share))

    def push_gradient(self, share: float = 1.0) -> None:
        """``step()`` for a gradient ``flat_grads`` that ``share`` still weights (1: weighted
        already, as a hybrid node's leader pushes its node's sum)."""
        opt, ps = self.optimizer, self.ps
        opt.follow_layout()
        grads = backend.to_device(opt.settle_grads(), "cpu")
        ref = self._outbox_ref(grads, share) if any(self._by_link) else None
        if ref is not None:
            grads, share = (grads, share) if self._outbox is None else (self._outbox.data, 1.0)
        elif share != 1.0:  # weighted here, in parallel across workers, not on the busy shard
            if self._weighted is None or self._weighted.shape != grads.shape:
                self._weighted = np.empty_like(grads)
            grads = np.multiply(grads, np.float32(share), out=self._weighted)
            share = 1.0
        on_server = ps.optimizer_on == "server"

        def payload(i: int) -> Any:
            if ref is not None and self._by_link[i]:
                return ref
            lo, hi = ps.ranges[i]
            return np.ascontiguousarray(grads[lo:hi])

        self._push_pull(payload, share, 1)
        if on_server:
            opt.steps += 1  # schedules that read the step count see the same count as locally
        else:
            opt.step()
            if self.worker_index == 0 and ps.snapshot_every and self.clock % ps.snapshot_every == 0:
                self.publish()

    def skip_step(self) -> None:
        """A step ``fit`` skipped (a non-finite gradient). In sync mode every worker skipped
        it and no shard hears of it. In async/ssp this worker decided alone: its clock still
        advances on every shard (nothing is applied; ssp waits as after a push) and it pulls
        the parameters, so the others never wait for a clock it would not push."""
        self.init_sync()
        if self.ps.mode == "sync":
            self.rounds_skipped += 1
            return
        self.optimizer.follow_layout()
        self._push_pull(lambda i: None, 1.0, 0)

    def _push_pull(self, payload: Any, share: float, kind: int) -> None:
        """One step's call to every shard (``payload(i)``: shard i's gradient slice, its
        outbox reference, or None for a skipped step, ``kind`` 0); takes the replies into the
        flat parameters (the summed gradient with the optimiser on the workers) and notes
        the push as acknowledged (``acks``, the ledger's other side)."""
        opt, ps = self.optimizer, self.ps
        self.clock += 1
        note_round("push_pull", self.clock)  # where this worker is, for a stall report
        on_server = ps.optimizer_on == "server"
        lr = float(opt.lr) if on_server else None
        site = push_site()  # with the collective check on: the shards compare the pushes

        def submit(i: int, shard: Any) -> Any:
            return shard.push_pull.remote(
                ps.token, self.worker_index, self.clock, self.seen_versions[i],
                payload(i), float(share), lr, self.incarnation, site,
            )  # fmt: skip

        # every shard's call goes out before the first wait: shards work concurrently
        with trace.span("push", shards=len(ps.shards)):
            calls = [submit(i, s) for i, s in enumerate(ps.shards)]
        with trace.span("pull", shards=len(ps.shards)):  # waits as the mode says, then copies
            replies = ps.gather(calls, submit)
            target = opt.flat_params if on_server else opt.flat_grads
            for i, (version, part) in enumerate(replies):
                if version == "unlinked":  # nothing was applied: this shard gets the array
                    self._by_link[i] = False
                    version, part = ps.call_with_retry(i, lambda s, i=i: submit(i, s))
                self.seen_versions[i] = self._take(i, target, version, part)
        self.acks.note(self.incarnation, self.clock, kind)

    def _outbox_ref(self, grads: np.ndarray, share: float) -> link.LinkRef | None:
        """Where the shards find this step's (weighted) gradient: the flat gradient buffer
        itself when it lives in a memfd file (``link.FLAT``, the Ray engine's allocator) and
        needs no weighting, else this worker's outbox, written here; None without memfd."""
        if share == 1.0:
            ref = link.FLAT.ref_of(grads)
            if ref is not None:
                self._outbox = None
                return ref
        if self._outbox is None or self._outbox.floats != grads.size:
            try:
                self._outbox = link.Segment(grads.size, "distnet-ps-outbox")
            except OSError:
                self._by_link = [False] * len(self._by_link)
                return None
        if share != 1.0:
            np.multiply(grads, np.float32(share), out=self._outbox.data)
        else:
            np.copyto(self._outbox.data, grads)
        return self._outbox.ref

    def _take(self, i: int, target: Any, version: int, part: Any) -> int:
        """Writes shard ``i``'s reply into ``target[lo:hi]``; returns the version it holds.
        A board reference is read under its seqlock (a newer version than ``version`` may be
        there in async mode); a board that cannot be mapped or read here is fetched once as an
        array and the shard gets arrays from then on."""
        lo, hi = self.ps.ranges[i]
        xp = backend.array_module(target)
        if isinstance(part, link.LinkRef):
            host = target[lo:hi] if xp is np else self._scratch(hi - lo)
            try:
                version = self._boards.get(i, part).read(host)
                part = host
            except link.LinkError:
                self._by_link[i] = False
                version, part = self.ps.call_with_retry(
                    i, lambda s: s.get_reply.remote(self.ps.token)
                )
            if part is host and xp is np:
                return int(version)
        target[lo:hi] = xp.asarray(part)
        return int(version)

    def _scratch(self, n: int) -> np.ndarray:
        if self._host_scratch is None or self._host_scratch.size < n:
            self._host_scratch = np.empty(n, np.float32)
        return self._host_scratch[:n]

    def publish(self) -> None:
        """Optimiser on the workers: writes this worker's parameters into the shards (so that
        ``ps.pull()``/``state_dict()`` and snapshots see them)."""
        params = backend.to_device(self.optimizer.flat_params, "cpu")
        for i, (lo, hi) in enumerate(self.ps.ranges):
            part = np.ascontiguousarray(params[lo:hi])
            self.ps.call_with_retry(i, lambda s, p=part: s.set_params.remote(self.ps.token, p))

    def state_dict(self) -> dict[str, Any]:
        """The state of the optimiser that makes the updates, in the wrapped optimiser's format
        (flat arrays of shape ``(n,)``, lr, steps): the shards' when they step (momentum,
        Adam's moments live there; the wrapped optimiser's are never used), else the wrapped
        optimiser's. A checkpoint of it resumes the run where it was.

        ``steps`` is this worker's own count (fit numbers the steps, and keys the dropout
        noise, on from it); the shards' count (every worker's pushes in async/ssp: Adam's
        bias correction) goes in ``server_steps``."""
        if self.ps.optimizer_on != "server":
            return self.optimizer.state_dict()
        return server_optimizer_state(self.ps, self.optimizer.steps)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads state into the wrapped optimiser (``load_server`` puts it into the shards)."""
        self.optimizer.load_state_dict(worker_optimizer_state(state))

    def load_server(self, state: dict[str, Any]) -> None:
        """Writes this worker's parameters (a restored checkpoint's) and the optimiser
        ``state`` (what ``state_dict`` gave) into the shards. Call it on one worker, before
        any worker pushes again, then ``pull()`` on every worker."""
        params = np.array(backend.to_device(self.optimizer.flat_params, "cpu"), np.float32)
        state = dict(state)
        if "server_steps" in state:  # the shards go on counting from their own count
            state["steps"] = state.pop("server_steps")
        server = {"params": params, **{f"opt/{k}": v for k, v in state.items()}}
        if self.ps.optimizer_on != "server":  # summing shards keep no optimiser state
            server = {"params": params}
        self.ps.load_state_dict(server)

    def pull(self) -> None:
        """Overwrites this worker's parameters with the shards' (and their versions)."""
        self._pull_all()

    def join(self, clock: int | None = None) -> int:
        """This worker replaces one that left the running server (async/ssp, see
        ``membership.py``): it takes the index under a new incarnation, numbers its steps on
        from ``clock`` (None: the slowest live worker's), and pulls the current parameters.
        Returns the clock it goes on from."""
        joined = self.ps.call_all("join", self.ps.token, self.worker_index, clock)
        # None: the highest start, so that on every shard the next push is past its clock
        self.clock = int(clock) if clock is not None else max(c for c, _ in joined)
        self.steps = self.clock  # the lost worker's count (its noise keys go on from it)
        self.incarnation = max(inc for _, inc in joined)
        self._pull_all()
        return self.clock

    def acknowledged(self) -> tuple[int, np.ndarray]:
        """(this worker's index, its acknowledged pushes, shape ``(m, 3)``: incarnation,
        clock, kind), for ``ledger.check_ledgers``."""
        return self.worker_index, self.acks.rows()

    def close(self) -> None:
        """Worker 0 publishes its parameters when the optimiser runs on the workers."""
        if self.ps.optimizer_on == "worker" and self.worker_index == 0:
            self.publish()


def server_optimizer_state(ps: ParameterServer, steps: int) -> dict[str, Any]:
    """The shards' optimiser state (flat arrays of shape ``(n,)``, lr) with ``steps``, the
    calling worker's own step count, and ``server_steps``, the count of updates the shards
    made (which differs in async/ssp, where every worker's push is an update)."""
    state = {k[4:]: v for k, v in ps.state_dict().items() if k.startswith("opt/")}
    state["server_steps"] = state.get("steps", steps)
    state["steps"] = int(steps)
    return state


def worker_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` of ``server_optimizer_state`` as the wrapped optimiser loads it."""
    return {k: v for k, v in state.items() if k != "server_steps"}
