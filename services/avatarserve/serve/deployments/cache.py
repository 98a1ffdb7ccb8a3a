"""The SinkFrameCache deployment: answers for the session store's health and size.

The data path talks to Redis directly (one hop less); this deployment reports how many sessions the store holds and
whether Redis answers (`stats()`). Its Serve health check does NOT fail while Redis is unreachable: Serve replaces a
replica whose health check fails, and a new replica cannot bring Redis back. The outage is logged once when it starts
and once when it ends (control/redis_client.py `RedisOutage`); the gateway's gRPC health answers NOT_SERVING meanwhile.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from avatarserve.serve.config import AppConfig
from avatarserve.serve.control.redis_client import RedisOutage, RedisUnavailableError
from avatarserve.serve.control.session_store import SessionStore

__all__ = ["SinkFrameCache"]


class SinkFrameCache:
    def __init__(self, app: AppConfig):
        self.app = AppConfig.parse(app)
        self._store: Optional[SessionStore] = None
        self.outage = RedisOutage("SinkFrameCache", consequence="its health check keeps passing (a new replica would "
                                                                "not bring Redis back)")

    @property
    def store(self) -> SessionStore:
        if self._store is None:  # created on the replica's loop (redis.asyncio binds to the loop that uses it)
            self._store = SessionStore.from_url(self.app.require_redis(), namespace=self.app.namespace,
                                                ttl_s=self.app.timeouts.session_ttl_s,
                                                redis_options=self.app.timeouts.redis)
        return self._store

    async def check_health(self) -> None:
        try:
            await self.store.ping()
        except RedisUnavailableError as exc:
            self.outage.failed(exc)
        else:
            self.outage.recovered()

    async def stats(self) -> Dict[str, Any]:
        try:
            return {"redis": "ok", "sessions": await self.store.count_sessions(),
                    "used_memory_bytes": await self.store.used_memory()}
        except RedisUnavailableError as exc:
            self.outage.failed(exc)
            return {"redis": "unreachable", "error": str(exc)}
