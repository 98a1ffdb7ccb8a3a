"""The gateway's API-key check and per-key quotas (`app.auth`; keys and their Redis schema: control/api_keys.py).

CreateSession carries an API key in its metadata, `authorization: Bearer <key>` or `x-api-key: <key>`:
- none, a malformed key, or one the store does not know (or a wrong secret): UNAUTHENTICATED;
- a revoked key: PERMISSION_DENIED;
- a key at its concurrent-session limit, or out of session-seconds for the current quota window: RESOURCE_EXHAUSTED
  with trailing metadata `retry-after-ms`.
StreamSession / GetSession / CloseSession keep using the session token; the session remembers its key
(`session-key:{sid}`), so opening a stream checks the key's session-seconds again and the stream's time is charged
to it (every `auth.usage_flush_s` and when the stream ends). Session-seconds are seconds of open streams: the time
a session holds KV caches on every stage.

Nothing here logs, stores or exports a key or a session token; per-key information names the key id only.
With `auth.mode: disabled` every hook is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, Iterable, Optional, Tuple

import grpc

from avatarserve.serve.api.errors import ApiError
from avatarserve.serve.config import AppConfig
from avatarserve.serve.control.api_keys import ApiKeyError, ApiKeyRecord, ApiKeyStore, QuotaExceeded
from avatarserve.serve.cancel_safe import cancel_requested

__all__ = ["Authenticator", "Grant", "api_key_from_metadata"]

log = logging.getLogger(__name__)

# A CreateSession's pending slot outlives the longest CreateSession by this much.
_PENDING_MARGIN_S = 30.0


def api_key_from_metadata(metadata: Iterable[Tuple[str, Any]]) -> Optional[str]:
    """The API key of a call's metadata (`authorization: Bearer <key>`, else `x-api-key: <key>`), or None."""
    bearer = header = None
    for k, v in metadata or ():
        key = k.lower()
        if isinstance(v, bytes):
            v = v.decode("ascii", "replace")
        if key == "authorization" and bearer is None:
            scheme, _, rest = str(v).strip().partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                bearer = rest.strip()
        elif key == "x-api-key" and header is None and str(v).strip():
            header = str(v).strip()
    return bearer or header


def _metadata_of(grpc_context: Any) -> Iterable[Tuple[str, Any]]:
    fn = getattr(grpc_context, "invocation_metadata", None)
    return (fn() or ()) if callable(fn) else ()


@dataclass
class Grant:
    """One admitted CreateSession: the key and the concurrent-session slot it holds until `bind`."""

    auth: "Authenticator"
    record: Optional[ApiKeyRecord] = None  # None: auth disabled
    member: Optional[str] = None
    bound: bool = False

    @property
    def key_id(self) -> Optional[str]:
        return self.record.key_id if self.record is not None else None

    async def bind(self, session_id: str) -> None:
        """The session was created: its slot and its key are recorded with the session's lifetime."""
        if self.record is None or self.member is None:
            return
        await self.auth._store().bind_session(self.record.key_id, self.member, session_id,
                                              self.auth.app.timeouts.session_ttl_s)
        self.bound = True


@dataclass
class _Meter:
    key_id: str
    period_s: float
    last: float = field(default_factory=time.monotonic)


class Authenticator:
    """API keys and quotas of one gateway replica (redis.asyncio clients per event loop, like the gateway's)."""

    def __init__(self, app: AppConfig):
        self.app = app
        self.cfg = app.auth
        self.enabled = self.cfg.mode == "required"
        self._loops: Dict[int, ApiKeyStore] = {}
        self._meters: Dict[int, Dict[str, _Meter]] = {}  # loop -> session id -> its open stream's meter
        self._flushers: Dict[int, asyncio.Task] = {}

    def _store(self) -> ApiKeyStore:
        loop = id(asyncio.get_running_loop())
        st = self._loops.get(loop)
        if st is None:
            st = ApiKeyStore.from_url(self.app.require_redis(), namespace=self.app.namespace,
                                      keys_file=self.cfg.keys_file)
            self._loops[loop] = st
        return st

    def _limits(self, rec: ApiKeyRecord) -> Tuple[Optional[int], Optional[float], float]:
        lim = rec.limits
        return (self.cfg.default_max_sessions if lim.max_sessions is None else lim.max_sessions,
                self.cfg.default_session_seconds if lim.session_seconds is None else lim.session_seconds,
                lim.period_s or self.cfg.quota_period_s)

    # ----- CreateSession -------------------------------------------------------------------------------------
    async def authenticate(self, grpc_context: Any) -> Optional[ApiKeyRecord]:
        """The caller's key record (None when auth is disabled); ApiError UNAUTHENTICATED / PERMISSION_DENIED."""
        if not self.enabled:
            return None
        key = api_key_from_metadata(_metadata_of(grpc_context))
        if key is None:
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED,
                           "CreateSession needs an API key: send metadata `authorization: Bearer <key>` or "
                           "`x-api-key: <key>` (the SDK reads AVATARSERVE_API_KEY)")
        try:
            verdict, rec = await self._store().verify(key)
        except ApiKeyError as exc:  # an unreadable keys file: the operator's problem, not the caller's
            log.error("API key check failed: %s", exc)
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the API key store is unavailable") from exc
        if verdict == "malformed":
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "the API key is malformed (expected avs_<id>_<secret>)")
        if verdict == "unknown":
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "the API key is not valid")
        if verdict == "revoked":
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED, f"API key {rec.key_id} was revoked")
        return rec

    @contextlib.asynccontextmanager
    async def admit(self, grpc_context: Any) -> AsyncIterator[Grant]:
        """Authenticate CreateSession and take a slot under the key's quotas. The slot is released when the block
        fails or ends without `Grant.bind` (a crash expires it after the longest CreateSession)."""
        rec = await self.authenticate(grpc_context)
        grant = Grant(self, rec)
        if rec is None:
            yield grant
            return
        max_sessions, session_seconds, period_s = self._limits(rec)
        store = self._store()
        t = self.app.timeouts
        try:
            await store.check_usage(rec.key_id, session_seconds, period_s)
            grant.member = await store.acquire_pending(
                rec.key_id, max_sessions, t.admission_wait_s + t.prepare_session_s + _PENDING_MARGIN_S,
                self.app.retry_after_ms)
        except QuotaExceeded as exc:
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                           {"retry-after-ms": str(exc.retry_after_ms)}) from exc
        try:
            yield grant
        finally:
            if not grant.bound:
                with contextlib.suppress(Exception):
                    await store.release_pending(rec.key_id, grant.member)

    # ----- sessions ----------------------------------------------------------------------------------------
    async def session_closed(self, sid: str) -> None:
        """CloseSession: the key's slot goes back at once (closed sessions are also dropped lazily)."""
        if self.enabled:
            try:
                await self._store().release_session(sid)
            except Exception as exc:  # noqa: BLE001 - the next acquire drops it anyway (its session is closed)
                log.warning("session %s: releasing its API-key slot failed: %s", sid, exc)

    async def touch_session(self, sid: str) -> None:
        """Keep the session's slot alive with its other keys."""
        if self.enabled:
            await self._store().touch_session(sid, self.app.timeouts.session_ttl_s)

    # ----- streams: session-seconds ------------------------------------------------------------------------
    async def stream_opened(self, sid: str) -> None:
        """A stream opens on `sid`: RESOURCE_EXHAUSTED if its key is out of session-seconds, else start metering."""
        if not self.enabled:
            return
        store = self._store()
        key_id = await store.session_key(sid)
        rec = await store.get(key_id) if key_id else None
        if rec is None:  # a session created while auth was off
            return
        _, session_seconds, period_s = self._limits(rec)
        try:
            await store.check_usage(rec.key_id, session_seconds, period_s)
        except QuotaExceeded as exc:
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                           {"retry-after-ms": str(exc.retry_after_ms)}) from exc
        loop = asyncio.get_running_loop()
        self._meters.setdefault(id(loop), {})[sid] = _Meter(rec.key_id, period_s)
        task = self._flushers.get(id(loop))
        if task is None or task.done():
            self._flushers[id(loop)] = loop.create_task(self._flush_loop(), name="api-key-usage-flush")

    async def stream_closed(self, sid: str) -> None:
        """The stream on `sid` ended: charge what is left of its time. Never raises."""
        if not self.enabled:
            return
        meter = self._meters.get(id(asyncio.get_running_loop()), {}).pop(sid, None)
        if meter is not None:
            await self._charge(meter)

    async def _charge(self, meter: _Meter) -> None:
        now = time.monotonic()
        seconds, meter.last = now - meter.last, now
        try:
            await self._store().charge(meter.key_id, seconds, meter.period_s)
        except Exception as exc:  # noqa: BLE001 - usage is best effort; the stream goes on
            log.warning("API key %s: charging %.1f s of streaming failed: %s", meter.key_id, seconds, exc)

    async def _flush_loop(self) -> None:
        meters = self._meters.setdefault(id(asyncio.get_running_loop()), {})
        while not cancel_requested():  # stopped by a cancel, which a Redis call may swallow
            await asyncio.sleep(self.cfg.usage_flush_s)
            for meter in list(meters.values()):
                await self._charge(meter)
