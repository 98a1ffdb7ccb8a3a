"""Redis schema of the sink-frame cache: everything a replica needs to (re)build a session.

Keys (under `namespace`, default "avatarserve:"):
    session:{sid}        hash   token_sha256, state, width, height, seed, created_ms, options (JSON), the session
                                counters (SESSION_FIELDS, totals of all its streams), last_audio_ms, next_block (the
                                session-level index of its next block), error (FAILED), close_req (the reason a
                                CloseSession / the idle sweep asked its open stream to end with)
    sink:{sid}           string safetensors bytes: reference, motion, text (+ aas once known) latents
    streamlock:{sid}     string the stream that holds the session: "<gateway replica id>/<random>"
    closed:{sid}         hash   the tombstone of a closed session: the session hash as it was at close, state
                                CLOSED (or FAILED), closed_ms; its own TTL (`closed_ttl_s`). Closing deletes every other
                                key of the session in the same atomic step.
    idle                 zset   session id -> idle deadline (Unix ms: creation or last audio + its idle timeout); its
                                TTL is kept at least that of the sessions it lists;
                                the gateways' idle sweep claims expired members atomically (ZREM), so several
                                sweepers never close a session twice
    draining             string set while the cluster drains (`avatarserve down`): open streams end with
                                `server_draining`, new sessions and streams are refused; its own short TTL

Every key is written with a TTL (`session_ttl_s`) and no write creates one without it: counters and state change
only a session hash that exists (a session that expired stays gone instead of coming back as a TTL-less stub). The
gateway refreshes every key of a session while its stream is open (`touch`), so a stream never loses its session
however long it runs, and sessions nobody streams are collected by Redis itself `session_ttl_s` after their last
activity. Tensors are stored as safetensors blobs: typed, versioned, and loadable without pickle.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import redis.asyncio as aioredis
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from avatarserve.engine.sink import SinkState
from avatarserve.serve.config import RedisTimeouts
from avatarserve.serve.control.redis_client import RedisUnavailableError, connect, translate_unavailable

# The session counters, named as SessionCounters' fields (api/avatar_service.proto).
SESSION_FIELDS = ("audio_samples_received", "audio_chunks_received", "audio_samples_late", "audio_samples_discarded",
                  "blocks_generated", "blocks_delivered", "idle_blocks_delivered", "frames_delivered", "interrupts",
                  "streams_opened")


class StoreError(Exception):
    """The sink-frame cache is unreachable or holds unreadable data."""


class StoreUnavailableError(StoreError, RedisUnavailableError):
    """Redis is unreachable (every public coroutine method of SessionStore raises this for redis' connection errors
    and timeouts)."""


def tensors_to_bytes(tensors: Dict[str, torch.Tensor], meta: Optional[Dict[str, str]] = None) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta or {})


def tensors_from_bytes(blob: bytes) -> Dict[str, torch.Tensor]:
    return st_load(blob)


def sink_to_bytes(sink: SinkState) -> bytes:
    t = {"reference": sink.reference, "motion": sink.motion, "text": sink.text}
    if sink.aas_latent is not None:
        t["aas_latent"] = sink.aas_latent
    return tensors_to_bytes(t, {"seed": str(sink.seed)})


def sink_from_bytes(blob: bytes) -> SinkState:
    t = tensors_from_bytes(blob)
    seed = int(_metadata(blob).get("seed", "0"))
    return SinkState(reference=t["reference"], motion=t["motion"], text=t["text"], seed=seed,
                     aas_latent=t.get("aas_latent"))


def _metadata(blob: bytes) -> Dict[str, str]:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    return header.get("__metadata__", {}) or {}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class SessionRecord:
    session_id: str
    state: str
    width: int
    height: int
    seed: int
    created_ms: int
    counters: Dict[str, int]
    options: Dict[str, Any] = field(default_factory=dict)
    last_audio_ms: int = 0
    closed_ms: int = 0
    error: str = ""
    next_block: int = 0
    close_req: str = ""
    closed: bool = False  # read from the tombstone: the session is closed (state CLOSED or FAILED)

    @property
    def idle_timeout_ms(self) -> int:
        return int(float(self.options.get("idle_timeout_s", 0)) * 1000)

    @property
    def idle_deadline_ms(self) -> int:
        """Unix ms at which the idle timeout closes the session (0: never)."""
        t = self.idle_timeout_ms
        return (max(self.created_ms, self.last_audio_ms) + t) if t else 0

    @classmethod
    def from_hash(cls, sid: str, h: Dict[bytes, bytes], *, closed: bool = False) -> "SessionRecord":
        d = {k.decode(): v.decode() for k, v in h.items()}
        return cls(session_id=sid, state=d.get("state", "UNKNOWN"), width=int(d.get("width", 0)),
                   height=int(d.get("height", 0)), seed=int(d.get("seed", 0)), created_ms=int(d.get("created_ms", 0)),
                   counters={f: int(d.get(f, 0)) for f in SESSION_FIELDS},
                   options=json.loads(d["options"]) if d.get("options") else {},
                   last_audio_ms=int(d.get("last_audio_ms", 0)), closed_ms=int(d.get("closed_ms", 0)),
                   error=d.get("error", ""), next_block=int(d.get("next_block", 0)), close_req=d.get("close_req", ""),
                   closed=closed)


# HINCRBY / HSET on a session hash only while it exists. KEYS[1] session hash; ARGV field, value pairs.
_UPDATE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local op = ARGV[1]
for i = 2, #ARGV, 2 do
  if op == 'incr' then redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""

# A stream's periodic write. KEYS[1] session hash, KEYS[2] idle zset, KEYS[3] the drain flag. ARGV: sid, idle
# deadline ms (0: unchanged), number of HSET pairs n, n field/value pairs, then HINCRBY field/delta pairs. Returns {0}
# when the session is gone, else {1, reason}: the reason a close was requested with, else 'server_draining' while the
# drain flag is set, else "".
_SYNC_STREAM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
local n = tonumber(ARGV[3])
for i = 4, 3 + 2 * n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 4 + 2 * n, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
if tonumber(ARGV[2]) > 0 then
  redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1])
  local t, cur = redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[2])
  if t > 0 and (cur == -1 or cur < t) then redis.call('PEXPIRE', KEYS[2], t) end
end
local reason = redis.call('HGET', KEYS[1], 'close_req') or ''
if reason == '' and redis.call('EXISTS', KEYS[3]) == 1 then reason = 'server_draining' end
return {1, reason}
"""

# Close a session: its hash becomes the tombstone, every other key goes, all at once. KEYS: session, sink,
# streamlock, tombstone, idle zset. ARGV: sid, closed_ms, tombstone ttl ms. Returns {1, fields...} (closed now),
# {2, fields...} (it was closed already: the tombstone) or {0} (no such session).
_FINALIZE_CLOSE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[5], ARGV[1])
  if redis.call('EXISTS', KEYS[4]) == 1 then
    local out = {2}
    for _, x in ipairs(redis.call('HGETALL', KEYS[4])) do out[#out + 1] = x end
    return out
  end
  return {0}
end
local h = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[4], unpack(h))
if redis.call('HGET', KEYS[4], 'state') ~= 'FAILED' then redis.call('HSET', KEYS[4], 'state', 'CLOSED') end
redis.call('HSET', KEYS[4], 'closed_ms', ARGV[2])
redis.call('HDEL', KEYS[4], 'close_req')
redis.call('PEXPIRE', KEYS[4], ARGV[3])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[5], ARGV[1])
local out = {1}
for _, x in ipairs(redis.call('HGETALL', KEYS[4])) do out[#out + 1] = x end
return out
"""

# Set close_req unless set (the first reason stays), only on an existing session. KEYS[1] session hash; ARGV[1] reason.
_REQUEST_CLOSE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSETNX', KEYS[1], 'close_req', ARGV[1])
return 1
"""

# Add to the idle index and keep the index itself alive at least `ttl` ms (it outlives every session it lists; like
# every key here it has a TTL). KEYS[1] idle zset. ARGV: sid, deadline ms, ttl ms.
_INDEX_IDLE = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local cur = redis.call('PTTL', KEYS[1])
if cur == -1 or cur < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
"""

# Claim up to ARGV[2] sessions whose idle deadline (score) is <= ARGV[1]: removed from the zset as they are
# returned, so each is claimed by exactly one sweeper. KEYS[1] idle zset.
_CLAIM_IDLE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do redis.call('ZREM', KEYS[1], id) end
return ids
"""

# Re-write a session a gateway holds in memory (after a Redis outage). KEYS: session, sink, streamlock, tombstone, idle
# zset. ARGV: sid, ttl ms, lock owner, lock action ("hold" | "release" | ""), sink blob, idle deadline ms (0: none),
# n, n field/value pairs of the whole hash, m, m field/value pairs to set, then field/delta pairs to add. A session
# with a tombstone was closed meanwhile: -1, nothing written. Else 1 (hash re-created from the whole hash) or 0.
_WRITE_BACK = """
if redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
local ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[7])
local m = tonumber(ARGV[8 + 2 * n])
local sets = 9 + 2 * n
local restored = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  restored = 1
  for i = 8, 7 + 2 * n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  if tonumber(ARGV[6]) > 0 then
    redis.call('ZADD', KEYS[5], 'NX', ARGV[6], ARGV[1])
    local cur = redis.call('PTTL', KEYS[5])
    if cur == -1 or cur < ttl then redis.call('PEXPIRE', KEYS[5], ttl) end
  end
else
  for i = sets, sets + 2 * m - 1, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  for i = sets + 2 * m, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('PEXPIRE', KEYS[1], ttl)
if not redis.call('SET', KEYS[2], ARGV[5], 'NX', 'PX', ttl) then redis.call('PEXPIRE', KEYS[2], ttl) end
if ARGV[4] == 'hold' then
  if not redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ttl) and redis.call('GET', KEYS[3]) == ARGV[3] then
    redis.call('PEXPIRE', KEYS[3], ttl)
  end
elseif ARGV[4] == 'release' then
  if redis.call('GET', KEYS[3]) == ARGV[3] then redis.call('DEL', KEYS[3]) end
end
return restored
"""

# Delete the stream lock only if this owner holds it. KEYS[1] lock; ARGV[1] owner.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@translate_unavailable(StoreUnavailableError)
class SessionStore:
    def __init__(self, client: aioredis.Redis, *, namespace: str = "avatarserve:", ttl_s: float = 3600.0,
                 closed_ttl_s: float = 3600.0):
        if ttl_s <= 0:
            raise StoreError(f"session ttl must be > 0, got {ttl_s}")
        if closed_ttl_s <= 0:
            raise StoreError(f"closed-session ttl must be > 0, got {closed_ttl_s}")
        self.r = client
        self.ns = namespace
        self.ttl_s = float(ttl_s)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.closed_ttl_ms = max(1, int(closed_ttl_s * 1000))
        self._update = client.register_script(_UPDATE_IF_EXISTS)
        self._release_lock = client.register_script(_RELEASE_LOCK)
        self._write_back = client.register_script(_WRITE_BACK)
        self._sync_stream = client.register_script(_SYNC_STREAM)
        self._finalize_close = client.register_script(_FINALIZE_CLOSE)
        self._claim_idle = client.register_script(_CLAIM_IDLE)
        self._index_idle = client.register_script(_INDEX_IDLE)
        self._request_close = client.register_script(_REQUEST_CLOSE)

    @classmethod
    def from_url(cls, url: str, *, redis_options: Optional[RedisTimeouts] = None, **kw) -> "SessionStore":
        """A store on its own client (control/redis_client.py `connect`: named timeouts, reconnects at once)."""
        return cls(connect(url, redis_options), **kw)

    async def close(self) -> None:
        await self.r.aclose()

    async def ping(self) -> None:
        await self.r.ping()

    async def _count_keys(self, kind: str) -> int:
        n = 0
        async for _ in self.r.scan_iter(match=f"{self.ns}{kind}:*", count=1000):
            n += 1
        return n

    async def count_sessions(self) -> int:
        return await self._count_keys("session")

    async def used_memory(self) -> int:
        return int((await self.r.info("memory")).get("used_memory", 0))

    def _k(self, kind: str, sid: str, extra: str = "") -> str:
        return f"{self.ns}{kind}:{sid}" + (f":{extra}" if extra else "")

    # ----- sessions ---------------------------------------------------------------------------------------
    @property
    def _idle_key(self) -> str:
        return f"{self.ns}idle"

    @property
    def _drain_key(self) -> str:
        return f"{self.ns}draining"

    async def create_session(self, sid: str, sink: SinkState, *, width: int, height: int,
                             options: Optional[dict] = None) -> str:
        """Store a new session; returns its (secret) token. Only the token's hash is stored. A session with an idle
        timeout (`options["idle_timeout_s"]`) enters the idle index, due that long after creation."""
        token = secrets.token_urlsafe(24)
        created_ms = int(time.time() * 1000)
        fields = {"token_sha256": hash_token(token), "state": "CREATED", "width": width, "height": height,
                  "seed": sink.seed, "created_ms": created_ms, "options": json.dumps(options or {}),
                  "last_audio_ms": 0, "next_block": 0}
        fields.update({f: 0 for f in SESSION_FIELDS})
        idle_ms = int(float((options or {}).get("idle_timeout_s", 0)) * 1000)
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self._k("session", sid), mapping=fields)
            p.pexpire(self._k("session", sid), self.ttl_ms)
            p.set(self._k("sink", sid), sink_to_bytes(sink), px=self.ttl_ms)
            if idle_ms:
                await self._index_idle(keys=[self._idle_key], args=[sid, created_ms + idle_ms, self.ttl_ms], client=p)
            await p.execute()
        return token

    async def check_token(self, sid: str, token: str) -> Optional[bool]:
        """None: no such session (nor its tombstone); False: wrong token; True: ok."""
        stored = await self.r.hget(self._k("session", sid), "token_sha256")
        if stored is None:
            stored = await self.r.hget(self._k("closed", sid), "token_sha256")
        if stored is None:
            return None
        return hmac.compare_digest(stored.decode(), hash_token(token or ""))

    async def get_session(self, sid: str) -> Optional[SessionRecord]:
        """The live session, else its tombstone (`closed` True), else None."""
        h = await self.r.hgetall(self._k("session", sid))
        if h:
            return SessionRecord.from_hash(sid, h)
        h = await self.r.hgetall(self._k("closed", sid))
        return SessionRecord.from_hash(sid, h, closed=True) if h else None

    async def get_options(self, sid: str) -> dict:
        raw = await self.r.hget(self._k("session", sid), "options")
        return json.loads(raw) if raw else {}

    async def set_state(self, sid: str, state: str) -> bool:
        """False when the session no longer exists (it is not recreated)."""
        return bool(await self._update(keys=[self._k("session", sid)], args=["set", "state", state]))

    async def set_fields(self, sid: str, **fields: Any) -> bool:
        """HSET on the live session only; False when it no longer exists."""
        pairs = [x for k, v in fields.items() for x in (k, str(v))]
        if not pairs:
            return True
        return bool(await self._update(keys=[self._k("session", sid)], args=["set", *pairs]))

    async def fail(self, sid: str, error: str) -> bool:
        """Mark the session FAILED with why (SessionInfo.error)."""
        return await self.set_fields(sid, state="FAILED", error=error)

    async def incr(self, sid: str, **counters: int) -> bool:
        """Add to the session's counters; False when the session no longer exists (it is not recreated)."""
        pairs = [x for k, v in counters.items() if v for x in (k, int(v))]
        if not pairs:
            return True
        return bool(await self._update(keys=[self._k("session", sid)], args=["incr", *pairs]))

    async def sync_stream(self, sid: str, *, deltas: Dict[str, int], fields: Optional[Dict[str, Any]] = None,
                          idle_deadline_ms: int = 0) -> Optional[str]:
        """An open stream's periodic write, in one atomic step: add `deltas` to the counters, set `fields`, move the
        session's idle deadline (only while it is in the idle index: a claimed session stays claimed). Returns the
        reason a close was requested with ("" for none; "server_draining" while the cluster drains), or None when
        the session no longer exists."""
        sets = [x for k, v in (fields or {}).items() for x in (k, str(v))]
        incrs = [x for k, v in deltas.items() if v for x in (k, int(v))]
        res = await self._sync_stream(keys=[self._k("session", sid), self._idle_key, self._drain_key],
                                      args=[sid, int(idle_deadline_ms), len(sets) // 2, *sets, *incrs])
        if not int(res[0]):
            return None
        reason = res[1]
        return reason.decode() if isinstance(reason, bytes) else str(reason or "")

    # ----- drain: the whole cluster is going away (`avatarserve down`) ---------------------------------------------
    async def start_draining(self, ttl_s: float) -> None:
        """Every open stream ends with END_OF_STREAM `server_draining` (what it sent is delivered first) at its next
        sync; new sessions and streams are refused with UNAVAILABLE. The flag expires after `ttl_s`, so a drain whose
        caller died does not refuse work forever."""
        await self.r.set(self._drain_key, "1", px=max(1, int(ttl_s * 1000)))

    async def stop_draining(self) -> None:
        await self.r.delete(self._drain_key)

    async def draining_ms(self) -> int:
        """Milliseconds the drain flag still holds (0: not draining)."""
        return max(0, int(await self.r.pttl(self._drain_key)))

    async def open_streams(self) -> int:
        return await self._count_keys("streamlock")

    async def request_close(self, sid: str, reason: str) -> bool:
        """Ask the session's open stream (whichever gateway holds it) to end with END_OF_STREAM `reason`; the first
        request's reason stays. False when the session no longer exists."""
        return bool(await self._request_close(keys=[self._k("session", sid)], args=[reason]))

    async def finalize_close(self, sid: str) -> Optional[tuple[SessionRecord, bool]]:
        """Turn the session into its tombstone (state CLOSED, or FAILED if it failed; closed_ms now) and delete every
        other key of it, atomically. Returns (the tombstone's record, True if this call closed it, False if it was
        closed already), or None when neither the session nor its tombstone exists."""
        keys = [self._k("session", sid), self._k("sink", sid), self._k("streamlock", sid), self._k("closed", sid),
                self._idle_key]
        res = await self._finalize_close(keys=keys, args=[sid, int(time.time() * 1000), self.closed_ttl_ms])
        status = int(res[0])
        if status == 0:
            return None
        flat = res[1:]
        h = dict(zip(flat[::2], flat[1::2]))
        return SessionRecord.from_hash(sid, h, closed=True), status == 1

    async def claim_idle(self, limit: int = 100) -> List[str]:
        """Session ids whose idle deadline passed, each removed from the idle index as it is returned (one claimer
        per session, however many gateways sweep)."""
        ids = await self._claim_idle(keys=[self._idle_key], args=[int(time.time() * 1000), int(limit)])
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def set_idle_deadline(self, sid: str, deadline_ms: int) -> None:
        """(Re-)enter the session into the idle index (a claimed session that turned out not to be idle)."""
        await self._index_idle(keys=[self._idle_key], args=[sid, int(deadline_ms), self.ttl_ms])

    async def stream_open(self, sid: str) -> bool:
        return bool(await self.r.exists(self._k("streamlock", sid)))

    # ----- stream lock: one open stream per session ----------------------------------------------------------
    async def acquire_stream_lock(self, sid: str, owner: str) -> bool:
        return bool(await self.r.set(self._k("streamlock", sid), owner, nx=True, px=self.ttl_ms))

    async def release_stream_lock(self, sid: str, owner: str) -> None:
        await self._release_lock(keys=[self._k("streamlock", sid)], args=[owner])

    async def touch(self, sid: str) -> bool:
        """Restart the TTL of every key of the session (while its stream is open). False if the session is gone."""
        keys = [self._k("session", sid), self._k("sink", sid), self._k("streamlock", sid)]
        async with self.r.pipeline(transaction=False) as p:
            for k in keys:
                p.pexpire(k, self.ttl_ms)
            found = await p.execute()
        return bool(found[0])

    async def delete_session(self, sid: str) -> None:
        await self.r.delete(self._k("session", sid), self._k("sink", sid))

    # ----- sink ------------------------------------------------------------------------------------------
    async def get_sink(self, sid: str) -> SinkState:
        blob = await self.r.get(self._k("sink", sid))
        if blob is None:
            raise StoreError(f"no sink stored for session {sid!r}")
        return sink_from_bytes(blob)

    async def set_aas_latent(self, sid: str, latent: torch.Tensor) -> None:
        sink = await self.get_sink(sid)
        sink.aas_latent = latent.detach().float().cpu()
        await self.r.set(self._k("sink", sid), sink_to_bytes(sink), px=self.ttl_ms)

    # ----- write-back of the sessions a gateway streams (Redis outages; control/live_sessions.py) --------------
    async def server_run_id(self) -> str:
        """The Redis server's run id: it changes when Redis restarts (and may have lost its data)."""
        return str((await self.r.info("server")).get("run_id", ""))

    async def read_session_hash(self, sid: str) -> Dict[str, str]:
        """The session hash as stored (every field, decoded); {} when there is none."""
        return {k.decode(): v.decode() for k, v in (await self.r.hgetall(self._k("session", sid))).items()}

    async def get_sink_blob(self, sid: str) -> Optional[bytes]:
        return await self.r.get(self._k("sink", sid))

    async def sink_tensor_names(self, sid: str) -> Optional[List[str]]:
        """Names of the tensors in the session's sink blob, read from its safetensors header only (two GETRANGEs, not
        the blob); None when there is no sink."""
        key = self._k("sink", sid)
        head = await self.r.getrange(key, 0, 7)
        if len(head) < 8:
            return None
        n = int.from_bytes(head, "little")
        header = json.loads(await self.r.getrange(key, 8, 8 + n - 1))
        return [k for k in header if k != "__metadata__"]

    async def write_back(self, sid: str, *, full: Dict[str, str], sets: Dict[str, str], deltas: Dict[str, int],
                         sink: bytes, lock_owner: str, lock: str, idle_deadline_ms: int = 0) -> Optional[bool]:
        """Re-write a session a gateway holds in memory, idempotently, in one atomic step: the hash from `full`
        when it is missing (else `sets` and `deltas` applied to it), the sink blob and the idle-index entry unless
        present, and the stream lock (`lock`: "hold" keeps/re-takes it for `lock_owner`, "release" deletes it if
        `lock_owner` holds it). TTLs restart. Returns True (hash re-created), False (hash was there) or None (the
        session was closed meanwhile: nothing written)."""
        keys = [self._k("session", sid), self._k("sink", sid), self._k("streamlock", sid), self._k("closed", sid),
                self._idle_key]
        full_pairs = [x for k, v in full.items() for x in (k, str(v))]
        set_pairs = [x for k, v in sets.items() for x in (k, str(v))]
        delta_pairs = [x for k, v in deltas.items() if v for x in (k, int(v))]
        res = await self._write_back(keys=keys, args=[
            sid, self.ttl_ms, lock_owner, lock, sink, int(idle_deadline_ms),
            len(full_pairs) // 2, *full_pairs, len(set_pairs) // 2, *set_pairs, *delta_pairs])
        return None if int(res) < 0 else bool(int(res))
