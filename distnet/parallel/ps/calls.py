"""Calls to the shards of a ``ParameterServer``: bounded, retried, and all shards at once.

A call fails over when its shard died, is restarting, or did not answer within the server's
``timeout_s``; it is then sent again (up to ``retries`` times, with back-off) while the calls
to the other shards stay in flight. Retrying shard by shard deadlocks a sync job after a
shard restarts: one worker waits in shard 0's round for the other worker, who waits in the
restarted shard 1's round for the first one's push, which it sends only after shard 0
answered (seen in CI).

Ray's errors are imported lazily: importing this module does not import Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class ShardLostError(RuntimeError):
    """A shard stopped answering (dead and not restarted, or silent past every retry).

    ``group_may_restart``: an engine that resumes jobs from checkpoints may run the job again
    with a new server (the Ray engine does, as for a lost worker)."""

    group_may_restart = True


def retryable() -> tuple[type[BaseException], ...]:
    """The errors after which a call to a shard is sent again."""
    from ray.exceptions import (  # noqa: PLC0415
        ActorUnavailableError,
        GetTimeoutError,
        ObjectLostError,
        RayActorError,
    )

    # ObjectLostError (OwnerDiedError among them): a reply put by a shard that died since
    return (RayActorError, ActorUnavailableError, GetTimeoutError, ObjectLostError)


def _died(err: BaseException) -> bool:
    from ray.exceptions import ActorDiedError  # noqa: PLC0415

    return isinstance(err, ActorDiedError)


def _fetch(ray: Any, ref: Any, timeout_s: float) -> Any:
    """The result of a ready call; a sync round's reply carries the slice as a reference
    (put once for every worker), fetched here."""
    result = ray.get(ref, timeout=timeout_s)
    if isinstance(result, tuple) and result and isinstance(result[-1], ray.ObjectRef):
        result = (*result[:-1], ray.get(result[-1], timeout=timeout_s))
    return result


def _fail_over(ps: Any, i: int, err: BaseException) -> bool:
    """After a call to shard ``i`` found its actor dead: whether the call can go on to a live
    replica. The dead one is the shard's primary: its backup, which holds every push the
    primary acknowledged (``replica.py``), takes over in ``ps.shards``. Or another call on this
    handle switched already (the dead actor is no longer the one in ``ps.shards``). When it
    cannot, ``ps.lost_why[i]`` says why (for ``ShardLostError``'s message)."""
    backups = ps.__dict__.get("backups") or []
    dead = getattr(err, "actor_id", None)
    current = ps.shards[i]._actor_id.hex()
    if dead is not None and dead != current:
        return True
    warden = ps.__dict__.get("warden")
    if warden is not None:  # the one that says which replica is the primary (warden.py)
        return _route(ps, warden, i, current)
    if i < len(backups) and backups[i]:
        ps.shards[i] = backups[i].pop(0)
        ps.failovers = ps.__dict__.get("failovers", 0) + 1
        return True
    return False


ABORT_GRACE_S = 5.0  # from one survivor's abort reaching the shards to the driver's at another


def await_group_abort(interrupt: Callable[[], None], err: BaseException) -> None:
    """After a shard's error: raises the group's ``WorkerLostError`` (``interrupt()``) when the
    group was stopped. A round the shard's abort ended (``RoundAborted``) waits for it up to
    ``ABORT_GRACE_S``: every survivor's abort ends the shared shards' rounds, and the driver's
    abort of this worker may come a moment later. Without this the worker failed with the
    round's error, kept no carry, and the group restarted from the epoch's checkpoint instead
    of resuming at the last finished step (seen under load)."""
    from ray.exceptions import RayError  # noqa: PLC0415

    from distnet.parallel.ps.rounds import RoundAborted  # noqa: PLC0415

    if not isinstance(err, RayError):  # not the shard's answer (the interrupt's own error)
        return
    aborted = isinstance(err, RoundAborted) or isinstance(getattr(err, "cause", None), RoundAborted)
    deadline = time.monotonic() + (ABORT_GRACE_S if aborted else 0.0)
    while True:
        interrupt()
        if time.monotonic() >= deadline:
            return
        time.sleep(0.02)


ROUTE_TRIES = 3  # asks of a warden that did not answer within the server's timeout_s


def _route(ps: Any, warden: Any, i: int, dead: str) -> bool:
    """Shard ``i``'s replica ``dead`` died: the warden names the live primary (None: the
    shard has no replica left that holds every acknowledged push). A warden that does not
    answer in time is asked again (it is busy with the same loss: the node's other replicas,
    their rebuilds); one that died ends the job (it was the job's)."""
    import ray  # noqa: PLC0415
    from ray.exceptions import GetTimeoutError  # noqa: PLC0415

    why = ps.__dict__.setdefault("lost_why", {})
    for attempt in range(ROUTE_TRIES):
        try:
            route = ray.get(warden.route.remote(ps.token, i, dead), timeout=ps.timeout_s)
            break
        except GetTimeoutError:
            why[i] = f"the replica warden did not answer within {ps.timeout_s:g} s, {attempt + 1}x"
        except Exception as e:  # noqa: BLE001 (the warden is the job's: gone, the job is ending)
            why[i] = f"the replica warden is gone ({type(e).__name__})"
            return False
    else:
        return False
    if route is None:
        why[i] = "its primary died with no backup caught up (the replica warden)"
        return False
    ps.shards[i], ps.backups[i] = route
    ps.failovers = ps.__dict__.get("failovers", 0) + 1
    why.pop(i, None)  # a later loss of this shard has its own reason
    return True


def call_shards(ps: Any, submit: Callable[[int, Any], Any], refs: dict[int, Any]) -> dict[int, Any]:
    """Results, by shard index, of one call to each shard in ``refs`` (index -> the call's
    reference already in flight, or None to send it with ``submit(index, shard)``).

    ``ps``: the ``ParameterServer`` (its ``shards``, ``ranges``, ``timeout_s``, ``retries``,
    ``snapshot_every``, ``aborted``, and a worker's ``interrupt`` hook, checked four times a
    second while an answer is missing). A shard's own error (a refused push) is raised at
    once; a shard that cannot answer raises ``ShardLostError`` naming it.
    """
    import ray  # noqa: PLC0415
    from ray.exceptions import GetTimeoutError  # noqa: PLC0415

    interrupt = ps.__dict__.get("interrupt")
    now = time.monotonic()
    flying: dict[int, tuple[Any, float]] = {}  # index -> (reference, answer deadline)
    for i, ref in refs.items():
        flying[i] = (submit(i, ps.shards[i]) if ref is None else ref, now + ps.timeout_s)
    resend: dict[int, float] = {}  # index -> when to send again
    attempts = dict.fromkeys(refs, 0)
    results: dict[int, Any] = {}
    while flying or resend:
        if ps.aborted is not None:
            i = min([*flying, *resend])
            raise RuntimeError(f"parameter-server shard {i} {ps.ranges[i]}: {ps.aborted}")
        if flying:
            pending = [ref for ref, _ in flying.values()]
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0.25)
        else:
            time.sleep(min(0.25, max(0.0, min(resend.values()) - time.monotonic())))
            ready = []
        ready_now, now = set(ready), time.monotonic()
        for i, (ref, deadline) in list(flying.items()):
            if ref not in ready_now and now < deadline:
                continue
            del flying[i]
            try:
                if ref not in ready_now:
                    raise GetTimeoutError(f"no answer within {ps.timeout_s:g} s")
                results[i] = _fetch(ray, ref, ps.timeout_s)
            except retryable() as err:
                if _died(err) and _fail_over(ps, i, err):
                    resend[i] = now  # to the backup, at once (replica.py)
                    continue
                attempts[i] += 1
                if attempts[i] > ps.retries or (not ps.snapshot_every and _died(err)):
                    lost = (
                        ""
                        if ps.snapshot_every
                        else " (no snapshots: a killed shard is not restarted)"
                    )
                    if i in ps.__dict__.get("lost_why", {}):
                        lost = f" ({ps.lost_why[i]})"
                    raise ShardLostError(
                        f"parameter-server shard {i} {ps.ranges[i]} did not answer "
                        f"({ps.retries} retries, each waiting up to {ps.timeout_s:g} s){lost}: "
                        f"{err}"
                    ) from err
                resend[i] = now + min(0.2 * 2 ** (attempts[i] - 1), 5.0)  # a restart takes time
            except Exception as err:  # the shard's own error: a refused push, a failed round
                if interrupt is not None:
                    await_group_abort(interrupt, err)
                raise
        for i, when in list(resend.items()):
            if now >= when:
                del resend[i]
                flying[i] = (submit(i, ps.shards[i]), now + ps.timeout_s)
        if (flying or resend) and interrupt is not None:
            interrupt()  # the group was stopped: a dead peer never completes a sync round
    return results


class ShardCalls:
    """The calls of a ``ParameterServer`` to its shards, with bounded retries (mixed into it:
    needs ``shards``, ``timeout_s``, ``retries``, and ``interrupt`` where a worker set one)."""

    shards: list[Any]
    timeout_s: float

    def call_with_retry(self, index: int, submit: Callable[[Any], Any], ref: Any = None) -> Any:
        """The result of ``submit(shard)`` (or of ``ref`` already submitted), sent again on a
        dead, restarting or silent shard up to ``retries`` times, each waiting ``timeout_s``
        (see ``calls.call_shards``). A shard's own error (a refused push) is raised at once."""
        return call_shards(self, lambda i, shard: submit(shard), {index: ref})[index]

    def _get(self, refs: Any) -> Any:
        """``ray.get(refs)`` within ``timeout_s``. A worker's ``interrupt`` (set by ``attach``:
        a callable that raises when its group was stopped, since a dead worker never completes
        a sync round) is checked twice a second while the shards have not answered."""
        import ray  # noqa: PLC0415

        interrupt = self.__dict__.get("interrupt")
        if interrupt is None:
            return ray.get(refs, timeout=self.timeout_s)
        waiting = refs if isinstance(refs, list) else [refs]
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=max(0.0, min(0.5, left)))
            if len(ready) == len(waiting) or left <= 0:
                return ray.get(refs, timeout=0 if left <= 0 else self.timeout_s)
            interrupt()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("interrupt", None)  # a worker's own hook (a closure over its mailbox)
        return state

    def gather(self, refs: list[Any], submit: Callable[[int, Any], Any]) -> list[Any]:
        """Results of one call per shard (``refs``, submitted by ``submit(i, shard)``): one
        ``ray.get`` for all of them, and one for the sync rounds' put-once replies; on any
        failure, through ``calls.call_shards``."""
        import ray  # noqa: PLC0415

        try:
            results = self._get(refs)
            inner = [r[-1] for r in results if isinstance(r[-1], ray.ObjectRef)]
            if inner:
                fetched = iter(self._get(inner))
                results = [
                    (*r[:-1], next(fetched)) if isinstance(r[-1], ray.ObjectRef) else r
                    for r in results
                ]
            return results
        except retryable():
            # the calls still in flight are kept; only the failed ones are sent again, all
            # shards at once (see calls.py for the deadlock one shard at a time would risk)
            results = call_shards(self, submit, dict(enumerate(refs)))
            return [results[i] for i in range(len(refs))]
        except Exception as err:  # a shard's own error: a refused push, a failed round
            interrupt = self.__dict__.get("interrupt")
            if interrupt is not None:
                await_group_abort(interrupt, err)
            raise

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every shard (concurrently), with retries; results in order."""
        results = call_shards(
            self, lambda i, shard: getattr(shard, method).remote(*args),
            dict.fromkeys(range(len(self.shards))),
        )  # fmt: skip
        return [results[i] for i in range(len(self.shards))]

    def call_all_once(self, method: str, timeout_s: float) -> list[Any]:
        """``method()`` on every shard, one attempt each (a replicated shard's dead primary:
        then its backup), all within ``timeout_s``; raises Ray's error on any failure. For
        questions a retry cannot answer better (after a peer died: does the server still hold
        the last step's state?)."""
        import ray  # noqa: PLC0415

        refs = [getattr(s, method).remote() for s in self.shards]
        if self.__dict__.get("warden") is None:
            return ray.get(refs, timeout=timeout_s)
        results = []  # replicas = 2: a dead primary's backup holds every acknowledged push
        for i, ref in enumerate(refs):
            try:
                results.append(ray.get(ref, timeout=timeout_s))
            except retryable() as err:
                if not (_died(err) and _fail_over(self, i, err)):
                    raise
                results.append(ray.get(getattr(self.shards[i], method).remote(), timeout=timeout_s))
        return results
