"""The SinkFrameCache deployment: answers for the session store's health and size.

The data path talks to Redis directly (one hop less); this deployment makes a Redis outage visible as an unhealthy
deployment in Serve's status and reports how many sessions the store holds.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from avatarserve.serve.config import AppConfig
from avatarserve.serve.control.session_store import SessionStore

__all__ = ["SinkFrameCache"]


class SinkFrameCache:
    def __init__(self, app: AppConfig):
        self.app = AppConfig.parse(app)
        self._store: Optional[SessionStore] = None

    @property
    def store(self) -> SessionStore:
        if self._store is None:  # created on the replica's loop (redis.asyncio binds to the loop that uses it)
            self._store = SessionStore.from_url(self.app.require_redis(), namespace=self.app.namespace,
                                                ttl_s=self.app.timeouts.session_ttl_s)
        return self._store

    async def check_health(self) -> None:
        await self.store.ping()

    async def stats(self) -> Dict[str, Any]:
        return {"sessions": await self.store.count_sessions(), "used_memory_bytes": await self.store.used_memory()}
