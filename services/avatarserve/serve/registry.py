"""Redis-backed registry of stage replicas and session routes (asyncio, `redis.asyncio`).

Keys (all under an optional `namespace` prefix, e.g. "avatarserve:"):
    replica:{deployment}:{replica_id}   hash  deployment, replica_id, address, live_sessions,
                                              capacity, updated_ms   (PEXPIRE ttl: a replica that
                                              stops heartbeating disappears)
    replicas:{deployment}               zset  replica_id -> expiry (Redis server ms): the index
    route:{session_id}                  string JSON [{"deployment", "replica_id", "address"}, ...]

Expiry uses the Redis server's clock (TIME inside scripts), so replicas on hosts with skewed
clocks agree. `pick_least_loaded` selects and reserves (increments `live_sessions`) atomically in
one script, so concurrent gateways do not pile onto the same replica between heartbeats; the
replica's next heartbeat overwrites the count with its true value.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

__all__ = [
    "NoReplicaAvailableError",
    "RegistryError",
    "ReplicaHeartbeat",
    "ReplicaInfo",
    "ReplicaRegistry",
    "RouteHop",
]

log = logging.getLogger(__name__)


class RegistryError(Exception):
    """Registry misuse or unreadable registry data."""


class NoReplicaAvailableError(RegistryError):
    """No live replica of a deployment has a free session slot."""


@dataclass(frozen=True)
class ReplicaInfo:
    deployment: str
    replica_id: str
    address: str
    live_sessions: int = 0
    capacity: int = 1
    updated_ms: int = 0  # Redis server time of the last heartbeat (set by the registry)

    def __post_init__(self) -> None:
        for name in ("deployment", "replica_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or ":" in value:
                raise RegistryError(f"ReplicaInfo.{name} must be a non-empty string without ':', got {value!r}")
        if not isinstance(self.address, str) or ":" not in self.address:
            raise RegistryError(f"ReplicaInfo.address must be host:port, got {self.address!r}")
        if self.capacity < 1:
            raise RegistryError(f"ReplicaInfo.capacity must be >= 1, got {self.capacity}")
        if self.live_sessions < 0:
            raise RegistryError(f"ReplicaInfo.live_sessions must be >= 0, got {self.live_sessions}")

    @property
    def load(self) -> float:
        return self.live_sessions / self.capacity

    @classmethod
    def _from_hash(cls, h: dict[str, str]) -> "ReplicaInfo":
        try:
            return cls(
                deployment=h["deployment"],
                replica_id=h["replica_id"],
                address=h["address"],
                live_sessions=int(h["live_sessions"]),
                capacity=int(h["capacity"]),
                updated_ms=int(h.get("updated_ms", 0)),
            )
        except (KeyError, ValueError) as exc:
            raise RegistryError(f"malformed replica record {h!r}: {exc}") from None


@dataclass(frozen=True)
class RouteHop:
    deployment: str
    replica_id: str
    address: str


# KEYS[1] replica hash, KEYS[2] index zset; ARGV: ttl_ms, field/value pairs, replica id.
_REGISTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local fields = {}
for i = 2, #ARGV - 1 do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'updated_ms', now, unpack(fields))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[#ARGV])
return now
"""

# KEYS[1] index zset; ARGV[1] replica hash prefix, ARGV[2] "1" to reserve a slot.
# Returns {0} (none registered), {1} (all full) or {2, field, value, ...} of the chosen replica.
_PICK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local best, best_load, best_live, seen = nil, 0, 0, 0
for _, id in ipairs(ids) do
  local v = redis.call('HMGET', ARGV[1] .. id, 'live_sessions', 'capacity')
  if v[1] and v[2] then
    seen = seen + 1
    local live, cap = tonumber(v[1]), tonumber(v[2])
    if cap > 0 and live < cap then
      local load = live / cap
      if best == nil or load < best_load or (load == best_load and (live < best_live or (live == best_live and id < best))) then
        best, best_load, best_live = id, load, live
      end
    end
  end
end
if best == nil then
  if seen == 0 then return {0} end
  return {1}
end
local key = ARGV[1] .. best
if ARGV[2] == '1' then redis.call('HINCRBY', key, 'live_sessions', 1) end
local out = {2}
for _, x in ipairs(redis.call('HGETALL', key)) do out[#out + 1] = x end
return out
"""


class ReplicaRegistry:
    """Replica registry and session routes in one Redis; safe to share across tasks of one loop."""

    def __init__(self, client: aioredis.Redis, *, namespace: str = "", ttl_s: float = 10.0) -> None:
        if ttl_s <= 0:
            raise RegistryError(f"ttl_s must be > 0, got {ttl_s}")
        self._r = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._register = client.register_script(_REGISTER)
        self._pick = client.register_script(_PICK)

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "", ttl_s: float = 10.0) -> "ReplicaRegistry":
        return cls(aioredis.Redis.from_url(url, decode_responses=True), namespace=namespace, ttl_s=ttl_s)

    async def close(self) -> None:
        await self._r.aclose()

    async def __aenter__(self) -> "ReplicaRegistry":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ keys

    def _replica_prefix(self, deployment: str) -> str:
        return f"{self.namespace}replica:{deployment}:"

    def _index_key(self, deployment: str) -> str:
        return f"{self.namespace}replicas:{deployment}"

    def _route_key(self, session_id: str) -> str:
        if not session_id:
            raise RegistryError("session_id must be non-empty")
        return f"{self.namespace}route:{session_id}"

    @staticmethod
    def _check_deployment(deployment: str) -> None:
        if not isinstance(deployment, str) or not deployment or ":" in deployment:
            raise RegistryError(f"deployment must be a non-empty string without ':', got {deployment!r}")

    # ------------------------------------------------------------------ replicas

    async def register(self, info: ReplicaInfo) -> int:
        """Create or refresh a replica record (also the heartbeat); returns the server time in ms."""
        fields = [
            "deployment", info.deployment,
            "replica_id", info.replica_id,
            "address", info.address,
            "live_sessions", str(info.live_sessions),
            "capacity", str(info.capacity),
        ]  # fmt: skip
        # The replica id is the last ARGV so the script can ZADD it.
        args = [int(self.ttl_s * 1000), *fields, info.replica_id]
        return int(await self._register(keys=[self._replica_prefix(info.deployment) + info.replica_id, self._index_key(info.deployment)], args=args))

    async def deregister(self, deployment: str, replica_id: str) -> None:
        self._check_deployment(deployment)
        async with self._r.pipeline(transaction=True) as p:
            p.delete(self._replica_prefix(deployment) + replica_id)
            p.zrem(self._index_key(deployment), replica_id)
            await p.execute()

    async def replicas(self, deployment: str) -> list[ReplicaInfo]:
        """Live replicas of `deployment` (heartbeat not expired), by replica id."""
        self._check_deployment(deployment)
        now_s, now_us = await self._r.time()
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        ids = await self._r.zrangebyscore(self._index_key(deployment), now_ms, "+inf")
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as p:
            for rid in ids:
                p.hgetall(self._replica_prefix(deployment) + rid)
            hashes = await p.execute()
        return sorted((ReplicaInfo._from_hash(h) for h in hashes if h), key=lambda r: r.replica_id)

    async def pick_least_loaded(self, deployment: str, *, reserve: bool = True) -> ReplicaInfo:
        """Live replica with the lowest live_sessions/capacity that still has a free slot.

        Ties go to fewer live sessions, then the smallest replica id. With `reserve`, its
        `live_sessions` is incremented in the same atomic step.
        """
        self._check_deployment(deployment)
        res = await self._pick(keys=[self._index_key(deployment)], args=[self._replica_prefix(deployment), "1" if reserve else "0"])
        status = int(res[0])
        if status == 0:
            raise NoReplicaAvailableError(f"no live replica of {deployment!r} is registered")
        if status == 1:
            raise NoReplicaAvailableError(f"every live replica of {deployment!r} is at capacity")
        flat = res[1:]
        return ReplicaInfo._from_hash(dict(zip(flat[::2], flat[1::2])))

    # ------------------------------------------------------------------ routes

    async def record_route(self, session_id: str, hops: Sequence[RouteHop], *, ttl_s: Optional[float] = None) -> None:
        if not hops:
            raise RegistryError(f"route of session {session_id!r} has no hops")
        payload = json.dumps([asdict(h) for h in hops])
        px = int(ttl_s * 1000) if ttl_s is not None else None
        await self._r.set(self._route_key(session_id), payload, px=px)

    async def get_route(self, session_id: str) -> Optional[list[RouteHop]]:
        raw = await self._r.get(self._route_key(session_id))
        if raw is None:
            return None
        try:
            return [RouteHop(**h) for h in json.loads(raw)]
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"malformed route record for session {session_id!r}: {exc}") from None

    async def remove_route(self, session_id: str) -> bool:
        return bool(await self._r.delete(self._route_key(session_id)))


class ReplicaHeartbeat:
    """Background task that keeps one replica's record fresh (every `interval_s`).

    `info` is called at each beat so live_sessions stays current. Redis hiccups are logged and
    retried at the next beat; `stop()` deregisters the replica.
    """

    def __init__(self, registry: ReplicaRegistry, info: Callable[[], ReplicaInfo], *, interval_s: float) -> None:
        if not 0 < interval_s < registry.ttl_s:
            raise RegistryError(f"heartbeat interval {interval_s}s must be > 0 and below the registry ttl {registry.ttl_s}s")
        self._registry = registry
        self._info = info
        self.interval_s = interval_s
        self._task: Optional[asyncio.Task[None]] = None
        self.beats = 0

    async def start(self) -> None:
        """Register once (errors propagate: a replica that cannot register should not go live), then beat."""
        if self._task is not None:
            raise RegistryError("heartbeat already started")
        await self._registry.register(self._info())
        self.beats = 1
        self._task = asyncio.get_running_loop().create_task(self._run(), name="replica-heartbeat")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._registry.register(self._info())
                self.beats += 1
            except (RedisError, OSError) as exc:
                log.warning("replica heartbeat failed: %s", exc)

    async def stop(self, *, deregister: bool = True) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if deregister:
            info = self._info()
            try:
                await self._registry.deregister(info.deployment, info.replica_id)
            except (RedisError, OSError) as exc:
                log.warning("replica deregistration failed: %s", exc)
