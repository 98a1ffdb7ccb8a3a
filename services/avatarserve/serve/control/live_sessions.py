"""A gateway's session store: the sessions it streams survive a Redis outage, and a Redis that lost its data.

Redis is not a single point of silent failure for live streams. A gateway replica *tracks* every session while a
stream of it is open on that replica (`GatewaySessionStore.track`, right after the stream opened): it keeps the
session hash as it last wrote it, the sink blob (once it holds the adaptive-sink latent, re-read from its header
until then), its stream lock and (control/registry.py `track_route`) its route, all in memory; small.

- While Redis answers, tracked writes go to Redis as before, and the in-memory copy follows them.
- When a tracked write finds Redis unreachable, the store enters *write-behind*: that write and every later write
  of a tracked session (counters, state and fields, TTL refreshes, the release of the stream lock) go to memory
  only and never fail, so the stream goes on; the outage is logged once (control/redis_client.py `RedisOutage`).
  Calls on sessions it does not track (CreateSession, GetSession, CloseSession, opening a stream) raise
  `StoreUnavailableError`, which the API answers UNAVAILABLE with `retry-after-ms`.
- A watcher probes Redis every `timeouts.redis.probe_s` while it is unreachable, and while sessions are tracked it
  also checks that Redis did not restart unnoticed (its run id). Once Redis answers, it writes every tracked session
  back, idempotently and atomically per session (`SessionStore.write_back`): the whole hash when Redis lost it (else
  the buffered counters and fields added to it), the sink blob and idle-index entry unless present, the stream lock
  (or its release), then the routes (registry hooks). Only then does write-behind end, so GetSession, CloseSession
  and a later stream of a live session work again, with its counters complete.
- A tracked write that finds its session missing while Redis answers checks the run id: a restarted Redis means
  lost data (written back at once); otherwise the session really is gone (closed or expired) and stops being tracked.

Sessions that were not streaming on any gateway when Redis lost its data are gone (NOT_FOUND): nothing else holds
them. Run Redis with persistence (AOF `appendonly yes`, the Helm chart's default) so that a Redis restart keeps them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Optional

import redis.asyncio as aioredis

from avatarserve.serve.config import RedisTimeouts
from avatarserve.serve.cancel_safe import cancel_requested
from avatarserve.serve.control.redis_client import RedisOutage, RedisUnavailableError, connect
from avatarserve.serve.control.session_store import SessionStore, StoreError, StoreUnavailableError

__all__ = ["GatewaySessionStore", "LiveSession"]

log = logging.getLogger(__name__)

AAS_TENSOR = "aas_latent"


@dataclass
class LiveSession:
    """What a gateway holds in memory of one session it streams."""

    sid: str
    owner: str  # the stream lock's value: this gateway replica
    full: Dict[str, str]  # the session hash as this gateway last wrote it
    sink: bytes
    sink_has_aas: bool
    lock: str = "hold"  # "hold" while the stream is open, "release" once it ended
    sets: Dict[str, str] = field(default_factory=dict)  # not yet in Redis: fields set during write-behind
    deltas: Dict[str, int] = field(default_factory=dict)  # ... and counters added during write-behind
    lock_pending: bool = False  # the lock's release is not yet in Redis
    ended: bool = False  # the stream ended: forget the session once nothing is pending

    @property
    def pending(self) -> bool:
        return bool(self.sets or self.deltas or self.lock_pending)

    def apply(self, sets: Optional[Dict[str, Any]], deltas: Optional[Dict[str, int]]) -> None:
        """Follow a write in the in-memory copy."""
        for k, v in (sets or {}).items():
            self.full[k] = str(v)
        for k, v in (deltas or {}).items():
            if v:
                self.full[k] = str(int(self.full.get(k, 0) or 0) + int(v))

    def defer(self, sets: Optional[Dict[str, Any]], deltas: Optional[Dict[str, int]]) -> None:
        """Keep a write that did not reach Redis for the write-back."""
        for k, v in (sets or {}).items():
            self.sets[k] = str(v)
        for k, v in (deltas or {}).items():
            if v:
                self.deltas[k] = self.deltas.get(k, 0) + int(v)

    def take_pending(self) -> tuple:
        sets, deltas, lock_pending = self.sets, self.deltas, self.lock_pending
        self.sets, self.deltas, self.lock_pending = {}, {}, False
        return sets, deltas, lock_pending

    def put_back(self, sets: Dict[str, str], deltas: Dict[str, int], lock_pending: bool) -> None:
        """A write-back failed: its writes are pending again (under any made meanwhile)."""
        self.sets = {**sets, **self.sets}
        for k, v in deltas.items():
            self.deltas[k] = self.deltas.get(k, 0) + v
        self.lock_pending = self.lock_pending or lock_pending

    @property
    def idle_deadline_ms(self) -> int:
        try:
            timeout_s = float(json.loads(self.full.get("options") or "{}").get("idle_timeout_s", 0) or 0)
            since = max(int(self.full.get("created_ms", 0) or 0), int(self.full.get("last_audio_ms", 0) or 0))
        except (TypeError, ValueError):
            return 0
        return since + int(timeout_s * 1000) if timeout_s > 0 else 0


class GatewaySessionStore(SessionStore):
    """The SessionStore of a gateway replica (one per event loop): tracked sessions are written behind while Redis
    is unreachable and written back when it returns (see the module docstring)."""

    def __init__(self, client: aioredis.Redis, *, redis_options: Optional[RedisTimeouts] = None, **kw: Any) -> None:
        super().__init__(client, **kw)
        self.options = redis_options or RedisTimeouts()
        self.outage = RedisOutage("gateway", consequence="live streams go on from memory and their session writes are "
                                                          "buffered; new calls answer UNAVAILABLE")
        self.restore_hooks: List[Callable[[], Awaitable[None]]] = []  # run after every write-back (routes)
        self.written_back = 0  # session hashes this store re-created in Redis (it had lost them)
        self._live: Dict[str, LiveSession] = {}
        self._run_id: Optional[str] = None
        self._deferring = False  # write-behind: tracked writes go to memory only
        self._watch_task: Optional[asyncio.Task] = None
        self._write_back_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, *, redis_options: Optional[RedisTimeouts] = None, **kw: Any) -> "GatewaySessionStore":
        return cls(connect(url, redis_options), redis_options=redis_options, **kw)

    async def close(self) -> None:
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await super().close()

    # ----- tracking ------------------------------------------------------------------------------------------
    @property
    def tracked(self) -> List[str]:
        return list(self._live)

    @property
    def writing_behind(self) -> bool:
        return self._deferring

    def live_session(self, sid: str) -> Optional[LiveSession]:
        return self._live.get(sid)

    async def track(self, sid: str, owner: str) -> bool:
        """Hold session `sid` in memory while its stream (holding the stream lock as `owner`) is open here. Reads
        the session from Redis (call it right after the stream opened). False when the session is not there."""
        full = await self.read_session_hash(sid)
        blob = await self.get_sink_blob(sid)
        if self._run_id is None:
            self._run_id = await self.server_run_id()
        if not full or blob is None:
            return False
        names = _tensor_names(blob)
        self._live[sid] = LiveSession(sid=sid, owner=owner, full=full, sink=blob, sink_has_aas=AAS_TENSOR in names)
        self._ensure_watch()
        return True

    def untrack(self, sid: str) -> None:
        """The stream of `sid` ended here: forget the session once what it wrote is in Redis."""
        t = self._live.get(sid)
        if t is None:
            return
        t.ended = True
        if not t.pending:
            self._live.pop(sid, None)

    # ----- writes of tracked sessions: write-behind while Redis is unreachable ---------------------------------
    async def _tracked_write(self, sid: str, call: Callable[[], Awaitable[Any]], *, benign: Any, missing: Any = False,
                             sets: Optional[Dict[str, Any]] = None, deltas: Optional[Dict[str, int]] = None) -> Any:
        t = self._live.get(sid)
        if t is None:
            return await call()
        t.apply(sets, deltas)
        if self._deferring:
            t.defer(sets, deltas)
            return benign
        try:
            result = await call()
        except StoreUnavailableError as exc:
            t.defer(sets, deltas)
            self._enter_write_behind(exc)
            return benign
        if result == missing and missing is not benign and sid in self._live:
            # Missing while Redis answers: a restart that lost it (write it back), or really gone (closed/expired).
            try:
                restarted = await self._restarted()
            except StoreUnavailableError as exc:
                t.defer(sets, deltas)
                self._enter_write_behind(exc)
                return benign
            if restarted:
                t.defer(sets, deltas)
                await self._write_back_all()
                return benign
            self._live.pop(sid, None)
        return result

    async def incr(self, sid: str, **counters: int) -> bool:
        return await self._tracked_write(sid, lambda: super(GatewaySessionStore, self).incr(sid, **counters),
                                         benign=True, deltas=counters)

    async def set_state(self, sid: str, state: str) -> bool:
        return await self._tracked_write(sid, lambda: super(GatewaySessionStore, self).set_state(sid, state),
                                         benign=True, sets={"state": state})

    async def set_fields(self, sid: str, **fields: Any) -> bool:
        return await self._tracked_write(sid, lambda: super(GatewaySessionStore, self).set_fields(sid, **fields),
                                         benign=True, sets=fields)

    async def sync_stream(self, sid: str, *, deltas: Dict[str, int], fields: Optional[Dict[str, Any]] = None,
                          idle_deadline_ms: int = 0) -> Optional[str]:
        return await self._tracked_write(
            sid, lambda: super(GatewaySessionStore, self).sync_stream(sid, deltas=deltas, fields=fields,
                                                                      idle_deadline_ms=idle_deadline_ms),
            benign="", missing=None, sets=fields, deltas=deltas)

    async def touch(self, sid: str) -> bool:
        return await self._tracked_write(sid, lambda: super(GatewaySessionStore, self).touch(sid), benign=True)

    async def release_stream_lock(self, sid: str, owner: str) -> None:
        t = self._live.get(sid)
        if t is None or t.owner != owner:
            return await super().release_stream_lock(sid, owner)
        t.lock = "release"
        if self._deferring:
            t.lock_pending = True
            return None
        try:
            await super().release_stream_lock(sid, owner)
        except StoreUnavailableError as exc:
            t.lock_pending = True
            self._enter_write_behind(exc)
        return None

    # ----- reads of tracked sessions: never stale nor NOT_FOUND because the write-back has not run yet -----------
    async def _settle(self, sid: str, *, missing: bool) -> bool:
        """Before reading tracked session `sid` (or after a read found it missing): if writes are behind, or Redis
        restarted, write every tracked session back now rather than at the next probe. True when it wrote back; an
        unreachable Redis raises StoreUnavailableError."""
        if sid not in self._live or not (self._deferring or (missing and await self._restarted())):
            return False
        await self._write_back_all()
        if self._deferring:
            raise StoreUnavailableError("Redis is back, but this gateway could not write its live sessions back yet")
        return True

    async def check_token(self, sid: str, token: str) -> Optional[bool]:
        await self._settle(sid, missing=False)
        ok = await super().check_token(sid, token)
        if ok is None and await self._settle(sid, missing=True):
            ok = await super().check_token(sid, token)
        return ok

    async def get_session(self, sid: str):
        await self._settle(sid, missing=False)
        rec = await super().get_session(sid)
        if rec is None and await self._settle(sid, missing=True):
            rec = await super().get_session(sid)
        return rec

    async def delete_session(self, sid: str) -> None:
        await super().delete_session(sid)
        self._live.pop(sid, None)  # deleted on purpose: never written back

    async def finalize_close(self, sid: str):
        res = await super().finalize_close(sid)
        self._live.pop(sid, None)  # closed: never written back
        return res

    # ----- the watcher and the write-back ----------------------------------------------------------------------
    def _enter_write_behind(self, exc: BaseException) -> None:
        self._deferring = True
        self.outage.failed(exc)
        self._ensure_watch()

    def _ensure_watch(self) -> None:
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="gateway-redis-watch")

    async def _restarted(self) -> bool:
        run_id = await self.server_run_id()
        if self._run_id is None:
            self._run_id = run_id
        return run_id != self._run_id

    async def _watch(self) -> None:
        """Every `probe_s` while sessions are tracked or write-behind is on: probe Redis, write back when it returns
        (or restarted unnoticed), refresh sink copies that lack the adaptive-sink latent."""
        while (self._live or self._deferring) and not cancel_requested():  # a Redis call may swallow the stop
            await asyncio.sleep(self.options.probe_s)
            try:
                try:
                    restarted = await self._restarted()
                except StoreUnavailableError as exc:
                    self._enter_write_behind(exc)
                    continue
                if self._deferring or restarted:
                    await self._write_back_all()
                else:
                    await self._refresh_sinks()
            except StoreUnavailableError as exc:
                self._enter_write_behind(exc)
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one failure
                log.warning("gateway Redis watcher: %s: %s", type(exc).__name__, exc)

    async def _write_back_all(self) -> None:
        """Write every tracked session back (rounds until no write made meanwhile is pending), then the hooks; write-
        behind ends only when all of it is in Redis."""
        async with self._write_back_lock:
            try:
                run_id = await self.server_run_id()
                if not self._deferring and run_id == self._run_id:
                    return  # another caller just wrote everything back
                self._deferring = True  # tracked writes made from now on wait for the next round
                first = True
                while True:
                    todo = [t for t in self._live.values() if first or t.pending]
                    if not todo:
                        break
                    for t in todo:
                        await self._write_back_session(t)
                    if first:
                        for hook in self.restore_hooks:
                            await hook()
                    first = False
            except (StoreUnavailableError, RedisUnavailableError) as exc:
                self.outage.failed(exc)
                return
            self._run_id = run_id
            self._deferring = False  # no await since the last check: nothing can be pending now
            self.outage.recovered()

    async def _write_back_session(self, t: LiveSession) -> None:
        sets, deltas, lock_pending = t.take_pending()
        try:
            res = await self.write_back(t.sid, full=t.full, sets=sets, deltas=deltas, sink=t.sink, lock_owner=t.owner,
                                        lock=t.lock, idle_deadline_ms=t.idle_deadline_ms)
        except BaseException:
            t.put_back(sets, deltas, lock_pending)
            raise
        if res is None:  # closed meanwhile (a tombstone exists): nothing to keep
            self._live.pop(t.sid, None)
            return
        if res:
            self.written_back += 1
            log.warning("session %s: re-written to Redis from this gateway's memory (Redis had lost it)", t.sid)
        if t.ended and not t.pending:
            self._live.pop(t.sid, None)

    async def _refresh_sinks(self) -> None:
        """Copy the sink blob again once the last stage stored the adaptive-sink latent in it (header check first)."""
        for t in list(self._live.values()):
            if t.sink_has_aas:
                continue
            names = await self.sink_tensor_names(t.sid)
            if names and AAS_TENSOR in names:
                blob = await self.get_sink_blob(t.sid)
                if blob is not None:
                    t.sink, t.sink_has_aas = blob, AAS_TENSOR in _tensor_names(blob)


def _tensor_names(blob: bytes) -> List[str]:
    try:
        n = int.from_bytes(blob[:8], "little")
        return [k for k in json.loads(blob[8:8 + n]) if k != "__metadata__"]
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"unreadable sink blob: {exc}") from None
