"""Redis-backed registry of stage replicas, session reservations and session routes (asyncio, `redis.asyncio`).

Keys (all under an optional `namespace` prefix, e.g. "avatarserve:"):
    replica:{deployment}:{replica_id}   hash  deployment, replica_id, address, live_sessions,
                                              capacity, updated_ms   (PEXPIRE ttl: a replica that
                                              stops heartbeating disappears)
    replicas:{deployment}               zset  replica_id -> expiry (Redis server ms): the index (PEXPIRE
                                              ttl from the newest heartbeat of any of its replicas)
    resv:{deployment}:{replica_id}      zset  session_id -> expiry (Redis server ms): admitted
                                              sessions that hold a slot but are not streaming yet
    route:{session_id}                  string JSON [{"deployment", "replica_id", "address"}, ...]
    admitted:{deployment}               zset  session_id -> expiry (Redis server ms): every session admitted on
                                              the deployment and not closed yet, whether it streams or not

Admission limit. A replica's reservation becomes "live" while the session streams and is counted nowhere once its
stream ended (an IDLE session moves freely), so per-replica slots alone do not bound how many sessions are admitted.
`reserve_route` takes a per-deployment limit (the admission policy passes max replicas x capacity) and refuses, in the
same atomic step, when `admitted:{deployment}` already holds that many sessions; a session leaves it when it closes
(`release`) or, if nobody closes it, when its entry expires (`touch_admission` restarts that while it lives).

A replica's load is `live_sessions` (its own count, written by its heartbeat) plus its unexpired
reservations. Picking a replica reserves a slot for the session in the same atomic script, so
concurrent gateways never over-fill a replica between heartbeats. A reservation lasts until the
replica reports that session live (its heartbeat removes it: the slot is then counted as live),
until it is released (CloseSession, failed admission), or until it expires (`reservation_ttl_s`:
a client that never streams). Heartbeats never overwrite reservations, so an admitted session keeps
its slot however many heartbeats pass before its stream opens.

Expiry uses the Redis server's clock (TIME inside scripts), so replicas on hosts with skewed
clocks agree. The scripts touch keys they compute from a prefix, so they need one Redis server
(not Redis Cluster).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from avatarserve.serve.cancel_safe import cancel_requested
from avatarserve.serve.config import RedisTimeouts
from avatarserve.serve.control.redis_client import RedisOutage, RedisUnavailableError, connect, translate_unavailable

__all__ = [
    "NoReplicaAvailableError",
    "RegistryError",
    "RegistryUnavailableError",
    "ReplicaHeartbeat",
    "ReplicaInfo",
    "ReplicaRegistry",
    "RouteHop",
    "RouteReservation",
]

log = logging.getLogger(__name__)


class RegistryError(Exception):
    """Registry misuse or unreadable registry data."""


class RegistryUnavailableError(RegistryError, RedisUnavailableError):
    """Redis is unreachable (every public coroutine method of ReplicaRegistry raises this for redis' connection
    errors and timeouts)."""


class NoReplicaAvailableError(RegistryError):
    """No live replica of a deployment has a free session slot."""

    def __init__(self, message: str, *, deployment: str = "", registered: int = 0,
                 full: Optional[dict[str, int]] = None, at_limit: Optional[dict[str, int]] = None) -> None:
        super().__init__(message)
        # deployments whose admission limit is reached -> that limit (more replicas would not help)
        self.at_limit: dict[str, int] = dict(at_limit or {})
        self.deployment = deployment
        self.registered = registered  # live replicas of that deployment (0: none registered)
        # every deployment without a free slot -> its live replicas (`reserve_route` checks them all)
        self.full: dict[str, int] = dict(full) if full is not None else ({deployment: registered} if deployment else {})


@dataclass(frozen=True)
class ReplicaInfo:
    deployment: str
    replica_id: str
    address: str
    live_sessions: int = 0  # read back from the registry: live + reserved (the slots in use)
    capacity: int = 1
    updated_ms: int = 0  # Redis server time of the last heartbeat (set by the registry)
    reserved: int = 0  # read back: unexpired reservations (included in live_sessions)
    session_ids: tuple[str, ...] = ()  # sent by heartbeats: ids of the sessions live on the replica

    def __post_init__(self) -> None:
        for name in ("deployment", "replica_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or ":" in value:
                raise RegistryError(f"ReplicaInfo.{name} must be a non-empty string without ':', got {value!r}")
        if not isinstance(self.address, str) or ":" not in self.address:
            raise RegistryError(f"ReplicaInfo.address must be host:port, got {self.address!r}")
        if self.capacity < 1:
            raise RegistryError(f"ReplicaInfo.capacity must be >= 1, got {self.capacity}")
        if self.live_sessions < 0 or self.reserved < 0:
            raise RegistryError(f"ReplicaInfo.live_sessions/reserved must be >= 0, got {self.live_sessions}/{self.reserved}")

    @property
    def load(self) -> float:
        return self.live_sessions / self.capacity

    @classmethod
    def _from_hash(cls, h: dict[str, str], reserved: int = 0) -> "ReplicaInfo":
        try:
            return cls(
                deployment=h["deployment"],
                replica_id=h["replica_id"],
                address=h["address"],
                live_sessions=int(h["live_sessions"]) + int(reserved),
                capacity=int(h["capacity"]),
                updated_ms=int(h.get("updated_ms", 0)),
                reserved=int(reserved),
            )
        except (KeyError, ValueError) as exc:
            raise RegistryError(f"malformed replica record {h!r}: {exc}") from None


@dataclass(frozen=True)
class RouteHop:
    deployment: str
    replica_id: str
    address: str


@dataclass(frozen=True)
class RouteReservation:
    """Outcome of re-validating a recorded route for a new stream (`ReplicaRegistry.reserve_route_hops`)."""

    ok: list[RouteHop]  # still registered; the session holds (or now got) a slot there
    gone: list[RouteHop]  # replica no longer registered (stopped, draining, crashed)
    full: list[RouteHop]  # registered but without a free slot for this session


# Lua helpers shared by the scripts: server time in ms; slots in use on a replica (purges expired reservations).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
_HELD = """
local function held(rkey, live)
  redis.call('ZREMRANGEBYSCORE', rkey, '-inf', now)
  return live + redis.call('ZCARD', rkey)
end
"""
# Least-loaded live replica of one deployment with a free slot (ties: fewer slots in use, then smallest id).
# Returns best_id (or nil), its slots in use, and how many live replicas were seen.
_BEST = """
local function best_of(index_key, prefix, resv_prefix, exclude)
  redis.call('ZREMRANGEBYSCORE', index_key, '-inf', now)
  local ids = redis.call('ZRANGE', index_key, 0, -1)
  local best, best_load, best_held, seen = nil, 0, 0, 0
  for _, id in ipairs(ids) do
    local v = redis.call('HMGET', prefix .. id, 'live_sessions', 'capacity')
    if v[1] and v[2] then
      seen = seen + 1
      local cap = tonumber(v[2])
      local h = held(resv_prefix .. id, tonumber(v[1]))
      if id ~= exclude and cap > 0 and h < cap then
        local load = h / cap
        if best == nil or load < best_load or (load == best_load and (h < best_held or (h == best_held and id < best))) then
          best, best_load, best_held = id, load, h
        end
      end
    end
  end
  return best, best_held, seen
end
"""

# KEYS[1] replica hash, KEYS[2] index zset, KEYS[3] reservation zset.
# ARGV: ttl_ms, 2*n, n field/value pairs, replica id, then the ids of the sessions live on the replica.
# Returns {server time ms, unexpired reservations left}.
_REGISTER = _NOW + """
local ttl = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local fields = {}
for i = 3, 2 + n do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'updated_ms', now, unpack(fields))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[3 + n])
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
for i = 4 + n, #ARGV do redis.call('ZREM', KEYS[3], ARGV[i]) end
return {now, redis.call('ZCARD', KEYS[3])}
"""

# KEYS[1] index zset; ARGV: replica hash prefix, reservation prefix, "1" to reserve, session id, reservation ttl ms,
# replica id to exclude ("" for none).
# Returns {0, seen} (none registered), {1, seen} (all full) or {2, slots in use, field, value, ...} of the chosen one.
_PICK = _NOW + _HELD + _BEST + """
local best, h, seen = best_of(KEYS[1], ARGV[1], ARGV[2], ARGV[6])
if best == nil then
  if seen == 0 then return {0, 0} end
  return {1, seen}
end
if ARGV[3] == '1' then
  local rkey = ARGV[2] .. best
  redis.call('ZADD', rkey, now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', rkey, tonumber(ARGV[5]) * 2)
  h = h + 1
end
local out = {2, h}
for _, x in ipairs(redis.call('HGETALL', ARGV[1] .. best)) do out[#out + 1] = x end
return out
"""

# All-or-nothing admission across deployments. KEYS: the index zset of each deployment, in route order.
# ARGV: namespace, session id, reservation ttl ms, admitted ttl ms, then the deployment names (same order as KEYS),
# then each deployment's admission limit (0: none).
# Returns {3, position, limit, ...} for every deployment at its admission limit, else {1, position, live replicas
# seen, position, seen, ...} for every deployment without a free slot (1-based positions; nothing reserved in either
# case), or {2, id1, address1, id2, address2, ...}.
_RESERVE_ROUTE = _NOW + _HELD + _BEST + """
local ns, sid, rttl, attl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local n = #KEYS
local limited = {3}
for i = 1, n do
  local limit = tonumber(ARGV[4 + n + i])
  local akey = ns .. 'admitted:' .. ARGV[4 + i]
  redis.call('ZREMRANGEBYSCORE', akey, '-inf', now)
  if limit > 0 and not redis.call('ZSCORE', akey, sid) and redis.call('ZCARD', akey) >= limit then
    limited[#limited + 1] = i
    limited[#limited + 1] = limit
  end
end
if #limited > 1 then return limited end
local chosen, failed = {}, {1}
for i = 1, n do
  local dep = ARGV[4 + i]
  local best, h, seen = best_of(KEYS[i], ns .. 'replica:' .. dep .. ':', ns .. 'resv:' .. dep .. ':', '')
  if best == nil then
    failed[#failed + 1] = i
    failed[#failed + 1] = seen
  end
  chosen[i] = best
end
if #failed > 1 then return failed end
local out = {2}
for i = 1, n do
  local dep = ARGV[4 + i]
  local rkey = ns .. 'resv:' .. dep .. ':' .. chosen[i]
  redis.call('ZADD', rkey, now + rttl, sid)
  redis.call('PEXPIRE', rkey, rttl * 2)
  local akey = ns .. 'admitted:' .. dep
  redis.call('ZADD', akey, now + attl, sid)
  if redis.call('PTTL', akey) < attl * 2 then redis.call('PEXPIRE', akey, attl * 2) end
  out[#out + 1] = chosen[i]
  out[#out + 1] = redis.call('HGET', ns .. 'replica:' .. dep .. ':' .. chosen[i], 'address')
end
return out
"""

# Restart the admission entries of a session. ARGV: namespace, session id, admitted ttl ms, then deployment names.
_TOUCH_ADMISSION = _NOW + """
local ns, sid, attl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local n = 0
for i = 4, #ARGV do
  local akey = ns .. 'admitted:' .. ARGV[i]
  n = n + redis.call('ZADD', akey, 'XX', 'CH', now + attl, sid)
  if redis.call('PTTL', akey) < attl * 2 then redis.call('PEXPIRE', akey, attl * 2) end
end
return n
"""

# Re-validate the hops of a recorded route for a new stream. ARGV: namespace, session id, reservation ttl ms, then
# (deployment, replica id) pairs. Per hop returns 1 (slot held/reserved), 0 (replica gone) or 2 (replica full).
_RESERVE_HOPS = _NOW + _HELD + """
local ns, sid, rttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 4, #ARGV, 2 do
  local dep, id = ARGV[i], ARGV[i + 1]
  local alive = redis.call('ZSCORE', ns .. 'replicas:' .. dep, id)
  local v = redis.call('HMGET', ns .. 'replica:' .. dep .. ':' .. id, 'live_sessions', 'capacity')
  if (not alive) or tonumber(alive) <= now or not v[1] or not v[2] then
    out[#out + 1] = 0
  else
    local rkey = ns .. 'resv:' .. dep .. ':' .. id
    local h = held(rkey, tonumber(v[1]))
    if redis.call('ZSCORE', rkey, sid) or h < tonumber(v[2]) then
      redis.call('ZADD', rkey, now + rttl, sid)
      redis.call('PEXPIRE', rkey, rttl * 2)
      out[#out + 1] = 1
    else
      out[#out + 1] = 2
    end
  end
end
return out
"""


@translate_unavailable(RegistryUnavailableError)
class ReplicaRegistry:
    """Replica registry, reservations and session routes in one Redis; safe to share across tasks of one loop."""

    def __init__(self, client: aioredis.Redis, *, namespace: str = "", ttl_s: float = 10.0,
                 reservation_ttl_s: float = 60.0) -> None:
        if ttl_s <= 0:
            raise RegistryError(f"ttl_s must be > 0, got {ttl_s}")
        if reservation_ttl_s <= 0:
            raise RegistryError(f"reservation_ttl_s must be > 0, got {reservation_ttl_s}")
        self._r = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.reservation_ttl_s = reservation_ttl_s
        self._register = client.register_script(_REGISTER)
        self._pick = client.register_script(_PICK)
        self._reserve_route = client.register_script(_RESERVE_ROUTE)
        self._reserve_hops = client.register_script(_RESERVE_HOPS)
        self._touch_admission = client.register_script(_TOUCH_ADMISSION)
        self._tracked_routes: dict[str, tuple[list[RouteHop], float]] = {}  # routes a gateway streams: sid -> (hops, ttl)

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "", ttl_s: float = 10.0, reservation_ttl_s: float = 60.0,
                 redis_options: Optional[RedisTimeouts] = None) -> "ReplicaRegistry":
        """A registry on its own client (control/redis_client.py `connect`: named timeouts, reconnects at once)."""
        return cls(connect(url, redis_options, decode_responses=True), namespace=namespace, ttl_s=ttl_s,
                   reservation_ttl_s=reservation_ttl_s)

    async def close(self) -> None:
        await self._r.aclose()

    async def __aenter__(self) -> "ReplicaRegistry":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ keys

    def _replica_prefix(self, deployment: str) -> str:
        return f"{self.namespace}replica:{deployment}:"

    def _resv_prefix(self, deployment: str) -> str:
        return f"{self.namespace}resv:{deployment}:"

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

    @property
    def _reservation_ms(self) -> int:
        return max(1, int(self.reservation_ttl_s * 1000))

    # ------------------------------------------------------------------ replicas

    async def heartbeat(self, info: ReplicaInfo) -> tuple[int, int]:
        """Create or refresh a replica record; sessions in `info.session_ids` stop being reservations (they are live
        now). Returns (Redis server time in ms, reservations still pending on the replica)."""
        fields = [
            "deployment", info.deployment,
            "replica_id", info.replica_id,
            "address", info.address,
            "live_sessions", str(info.live_sessions),
            "capacity", str(info.capacity),
        ]  # fmt: skip
        args = [int(self.ttl_s * 1000), len(fields), *fields, info.replica_id, *info.session_ids]
        keys = [self._replica_prefix(info.deployment) + info.replica_id, self._index_key(info.deployment),
                self._resv_prefix(info.deployment) + info.replica_id]
        now, reserved = await self._register(keys=keys, args=args)
        return int(now), int(reserved)

    async def register(self, info: ReplicaInfo) -> int:
        """Create or refresh a replica record (also the heartbeat); returns the server time in ms."""
        return (await self.heartbeat(info))[0]

    async def deregister(self, deployment: str, replica_id: str) -> None:
        """Remove a replica: no new session is placed on it (its live sessions are not affected)."""
        self._check_deployment(deployment)
        async with self._r.pipeline(transaction=True) as p:
            p.delete(self._replica_prefix(deployment) + replica_id)
            p.zrem(self._index_key(deployment), replica_id)
            await p.execute()

    async def replicas(self, deployment: str) -> list[ReplicaInfo]:
        """Live replicas of `deployment` (heartbeat not expired), by replica id; `live_sessions` counts reservations."""
        self._check_deployment(deployment)
        now_s, now_us = await self._r.time()
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        ids = await self._r.zrangebyscore(self._index_key(deployment), now_ms, "+inf")
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as p:
            for rid in ids:
                p.hgetall(self._replica_prefix(deployment) + rid)
                p.zcount(self._resv_prefix(deployment) + rid, now_ms, "+inf")
            res = await p.execute()
        out = [ReplicaInfo._from_hash(h, int(n)) for h, n in zip(res[::2], res[1::2]) if h]
        return sorted(out, key=lambda r: r.replica_id)

    async def pick_least_loaded(self, deployment: str, *, reserve: bool = True, session_id: Optional[str] = None,
                                exclude: str = "") -> ReplicaInfo:
        """Live replica with the lowest (live + reserved) / capacity that still has a free slot.

        Ties go to fewer slots in use, then the smallest replica id. With `reserve`, a slot is reserved for
        `session_id` (a random id when None) in the same atomic step. `exclude` skips one replica id.
        """
        self._check_deployment(deployment)
        member = session_id or f"anon-{uuid.uuid4().hex}"
        res = await self._pick(keys=[self._index_key(deployment)],
                               args=[self._replica_prefix(deployment), self._resv_prefix(deployment),
                                     "1" if reserve else "0", member, self._reservation_ms, exclude])
        status = int(res[0])
        if status == 0:
            raise NoReplicaAvailableError(f"no live replica of {deployment!r} is registered", deployment=deployment)
        if status == 1:
            raise NoReplicaAvailableError(f"every live replica of {deployment!r} is at capacity", deployment=deployment,
                                          registered=int(res[1]))
        held = int(res[1])
        flat = res[2:]
        h = dict(zip(flat[::2], flat[1::2]))
        live = int(h.get("live_sessions", 0))
        return ReplicaInfo._from_hash(h, max(0, held - live))

    async def reserve_route(self, deployments: Sequence[str], session_id: str, *,
                            limits: Optional[Mapping[str, int]] = None, admitted_ttl_s: float = 3600.0) -> list[RouteHop]:
        """Pick the least-loaded replica of every deployment and reserve a slot on each for `session_id`, all or
        nothing: when one deployment has no free slot, nothing is reserved and `NoReplicaAvailableError` names it.

        `limits` (deployment -> sessions): refuse, all or nothing, when a deployment already has that many admitted
        sessions (`NoReplicaAvailableError.at_limit`). The session counts as admitted on every deployment of the
        route until `release` (or `admitted_ttl_s` after its last `touch_admission`)."""
        if not deployments:
            raise RegistryError("a route needs at least one deployment")
        for d in deployments:
            self._check_deployment(d)
        self._route_key(session_id)
        if admitted_ttl_s <= 0:
            raise RegistryError(f"admitted_ttl_s must be > 0, got {admitted_ttl_s}")
        lim = [int((limits or {}).get(d, 0)) for d in deployments]
        if any(x < 0 for x in lim):
            raise RegistryError(f"admission limits must be >= 0, got {dict(zip(deployments, lim))}")
        res = await self._reserve_route(keys=[self._index_key(d) for d in deployments],
                                        args=[self.namespace, session_id, self._reservation_ms,
                                              max(1, int(admitted_ttl_s * 1000)), *deployments, *lim])
        if int(res[0]) == 3:
            at_limit = {deployments[int(pos) - 1]: int(n) for pos, n in zip(res[1::2], res[2::2])}
            msg = "; ".join(f"{d!r} already holds its maximum of {n} sessions (max replicas x capacity)"
                            for d, n in at_limit.items())
            dep = next(iter(at_limit))
            raise NoReplicaAvailableError(msg, deployment=dep, full={d: 0 for d in at_limit}, at_limit=at_limit)
        if int(res[0]) != 2:
            full = {deployments[int(pos) - 1]: int(seen) for pos, seen in zip(res[1::2], res[2::2])}
            dep, seen = next(iter(full.items()))
            msg = "; ".join(("no live replica of %r is registered" if n == 0 else "every live replica of %r is at capacity")
                            % d for d, n in full.items())
            raise NoReplicaAvailableError(msg, deployment=dep, registered=seen, full=full)
        flat = res[1:]
        return [RouteHop(d, rid, addr) for d, rid, addr in zip(deployments, flat[::2], flat[1::2])]

    async def reserve_route_hops(self, session_id: str, hops: Sequence[RouteHop]) -> RouteReservation:
        """For a new stream of a recorded route: keep (or re-take) this session's slot on every hop still registered;
        report the hops whose replica is gone or full (the caller re-places those)."""
        args: list = [self.namespace, session_id, self._reservation_ms]
        for h in hops:
            self._check_deployment(h.deployment)
            args += [h.deployment, h.replica_id]
        res = await self._reserve_hops(keys=[], args=args)
        ok, gone, full = [], [], []
        for h, status in zip(hops, res):
            {1: ok, 0: gone, 2: full}[int(status)].append(h)
        return RouteReservation(ok, gone, full)

    async def release(self, session_id: str, hops: Sequence[RouteHop]) -> None:
        """Drop this session's reservations on `hops` and its admission on their deployments (session closed or
        admission abandoned)."""
        if not hops:
            return
        async with self._r.pipeline(transaction=False) as p:
            for h in hops:
                p.zrem(self._resv_prefix(h.deployment) + h.replica_id, session_id)
                p.zrem(f"{self.namespace}admitted:{h.deployment}", session_id)
            await p.execute()

    async def touch_admission(self, session_id: str, deployments: Sequence[str], ttl_s: float) -> int:
        """Restart the expiry of this session's admission on `deployments` (while it lives); returns how many
        entries were there."""
        if not deployments:
            return 0
        for d in deployments:
            self._check_deployment(d)
        return int(await self._touch_admission(keys=[], args=[self.namespace, session_id,
                                                                max(1, int(ttl_s * 1000)), *deployments]))

    async def admitted(self, deployment: str) -> int:
        """Sessions admitted on `deployment` and not released (unexpired entries)."""
        self._check_deployment(deployment)
        now_s, now_us = await self._r.time()
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        return int(await self._r.zcount(f"{self.namespace}admitted:{deployment}", now_ms, "+inf"))

    # ------------------------------------------------------------------ routes

    async def record_route(self, session_id: str, hops: Sequence[RouteHop], *, ttl_s: float) -> None:
        """Record a session's route; it expires `ttl_s` after the last `record_route` / `touch_route`."""
        if not hops:
            raise RegistryError(f"route of session {session_id!r} has no hops")
        if ttl_s <= 0:
            raise RegistryError(f"route ttl must be > 0, got {ttl_s}")
        payload = json.dumps([asdict(h) for h in hops])
        if session_id in self._tracked_routes:
            self._tracked_routes[session_id] = (list(hops), ttl_s)
        await self._r.set(self._route_key(session_id), payload, px=max(1, int(ttl_s * 1000)))

    async def get_route(self, session_id: str) -> Optional[list[RouteHop]]:
        raw = await self._r.get(self._route_key(session_id))
        if raw is None:
            return None
        try:
            return [RouteHop(**h) for h in json.loads(raw)]
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"malformed route record for session {session_id!r}: {exc}") from None

    async def touch_route(self, session_id: str, ttl_s: float) -> bool:
        """Restart the route's TTL (while its session streams); False if there is no route."""
        return bool(await self._r.pexpire(self._route_key(session_id), max(1, int(ttl_s * 1000))))

    async def remove_route(self, session_id: str) -> bool:
        self._tracked_routes.pop(session_id, None)
        return bool(await self._r.delete(self._route_key(session_id)))

    # ------------------------------------------------------------------ routes a gateway streams (Redis outages)

    def track_route(self, session_id: str, hops: Sequence[RouteHop], *, ttl_s: float) -> None:
        """Hold the route of a session this gateway streams in memory (kept current by `record_route`), so
        `restore_routes` can write it back after Redis lost it (control/live_sessions.py)."""
        self._tracked_routes[session_id] = (list(hops), ttl_s)

    def untrack_route(self, session_id: str) -> None:
        self._tracked_routes.pop(session_id, None)

    async def restore_routes(self, session_ids: Optional[Sequence[str]] = None) -> int:
        """Write back every tracked route (or those of `session_ids`) that Redis lacks (SET NX, TTL restarted);
        returns how many were missing."""
        sids = [s for s in (self._tracked_routes if session_ids is None else session_ids) if s in self._tracked_routes]
        if not sids:
            return 0
        async with self._r.pipeline(transaction=False) as p:
            for sid in sids:
                hops, ttl_s = self._tracked_routes[sid]
                ttl_ms = max(1, int(ttl_s * 1000))
                p.set(self._route_key(sid), json.dumps([asdict(h) for h in hops]), px=ttl_ms, nx=True)
                p.pexpire(self._route_key(sid), ttl_ms)
            res = await p.execute()
        return sum(1 for ok in res[::2] if ok)


class ReplicaHeartbeat:
    """Background task that keeps one replica's record fresh (every `interval_s`).

    `info` is called at each beat so live_sessions stays current. Every beat writes the whole record (the script
    HSETs every field and re-adds the index entry), so a replica re-registers on its first beat after Redis lost its
    data. An unreachable Redis never stops the beats (nor the replica: its live sessions go on): the outage is logged
    once when it starts and once when it ends (`outage`); `stop()` deregisters the replica.
    """

    def __init__(self, registry: ReplicaRegistry, info: Callable[[], ReplicaInfo], *, interval_s: float) -> None:
        if not 0 < interval_s < registry.ttl_s:
            raise RegistryError(f"heartbeat interval {interval_s}s must be > 0 and below the registry ttl {registry.ttl_s}s")
        self._registry = registry
        self._info = info
        self.interval_s = interval_s
        self._task: Optional[asyncio.Task[None]] = None
        self.beats = 0
        self.failed_beats = 0
        self.reserved = 0  # reservations pending on this replica, as of the last beat
        self.outage = RedisOutage("replica heartbeat", consequence="the replica goes on serving its live sessions "
                                                                   "and re-registers on its first beat once Redis is back")

    async def start(self) -> None:
        """Register once (errors propagate: a replica that cannot register should not go live), then beat."""
        if self._task is not None:
            raise RegistryError("heartbeat already started")
        info = self._info()
        self.outage.who = f"{info.deployment}/{info.replica_id} heartbeat"
        _, self.reserved = await self._registry.heartbeat(info)
        self.beats = 1
        self._task = asyncio.get_running_loop().create_task(self._run(), name="replica-heartbeat")

    async def _run(self) -> None:
        while not cancel_requested():  # stopped by a cancel, which a Redis call may swallow
            await asyncio.sleep(self.interval_s)
            await self.beat()

    async def beat(self) -> bool:
        """One heartbeat (re-registers a record Redis lost). Never raises: False when it did not reach Redis."""
        try:
            _, self.reserved = await self._registry.heartbeat(self._info())
        except RedisUnavailableError as exc:
            self.failed_beats += 1
            self.outage.failed(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - a beat that fails for another reason must not end the beats
            self.failed_beats += 1
            log.warning("%s failed: %s: %s", self.outage.who, type(exc).__name__, exc)
            return False
        self.beats += 1
        self.outage.recovered()
        return True

    async def stop(self, *, deregister: bool = True) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if deregister:
            info = self._info()
            try:
                await self._registry.deregister(info.deployment, info.replica_id)
            except (RedisUnavailableError, RedisError, OSError) as exc:
                log.warning("replica deregistration failed (its record expires with its TTL): %s", exc)
