"""Redis schema of the sink-frame cache: everything a replica needs to (re)build a session.

Keys (under `namespace`, default "avatarserve:"):
    session:{sid}        hash   token_sha256, state, width, height, seed, created_ms, options (JSON), counters
    sink:{sid}           string safetensors bytes: reference, motion, text (+ aas once known) latents
    streamlock:{sid}     string the gateway replica whose stream holds the session

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
from dataclasses import dataclass
from typing import Dict, Optional

import redis.asyncio as aioredis
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from avatarserve.engine.sink import SinkState

SESSION_FIELDS = ("audio_samples", "blocks_generated", "blocks_delivered", "frames_delivered", "interrupts",
                  "idle_blocks")


class StoreError(Exception):
    """The sink-frame cache is unreachable or holds unreadable data."""


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

# Delete the stream lock only if this owner holds it. KEYS[1] lock; ARGV[1] owner.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SessionStore:
    def __init__(self, client: aioredis.Redis, *, namespace: str = "avatarserve:", ttl_s: float = 3600.0):
        if ttl_s <= 0:
            raise StoreError(f"session ttl must be > 0, got {ttl_s}")
        self.r = client
        self.ns = namespace
        self.ttl_s = float(ttl_s)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._update = client.register_script(_UPDATE_IF_EXISTS)
        self._release_lock = client.register_script(_RELEASE_LOCK)

    @classmethod
    def from_url(cls, url: str, **kw) -> "SessionStore":
        return cls(aioredis.from_url(url), **kw)

    async def close(self) -> None:
        await self.r.aclose()

    async def ping(self) -> None:
        await self.r.ping()

    async def count_sessions(self) -> int:
        n = 0
        async for _ in self.r.scan_iter(match=f"{self.ns}session:*", count=1000):
            n += 1
        return n

    async def used_memory(self) -> int:
        return int((await self.r.info("memory")).get("used_memory", 0))

    def _k(self, kind: str, sid: str, extra: str = "") -> str:
        return f"{self.ns}{kind}:{sid}" + (f":{extra}" if extra else "")

    # ----- sessions ---------------------------------------------------------------------------------------
    async def create_session(self, sid: str, sink: SinkState, *, width: int, height: int,
                             options: Optional[dict] = None) -> str:
        """Store a new session; returns its (secret) token. Only the token's hash is stored."""
        token = secrets.token_urlsafe(24)
        fields = {"token_sha256": hash_token(token), "state": "CREATED", "width": width, "height": height,
                  "seed": sink.seed, "created_ms": int(time.time() * 1000), "options": json.dumps(options or {})}
        fields.update({f: 0 for f in SESSION_FIELDS})
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self._k("session", sid), mapping=fields)
            p.pexpire(self._k("session", sid), self.ttl_ms)
            p.set(self._k("sink", sid), sink_to_bytes(sink), px=self.ttl_ms)
            await p.execute()
        return token

    async def check_token(self, sid: str, token: str) -> Optional[bool]:
        """None: no such session; False: wrong token; True: ok."""
        stored = await self.r.hget(self._k("session", sid), "token_sha256")
        if stored is None:
            return None
        return hmac.compare_digest(stored.decode(), hash_token(token or ""))

    async def get_session(self, sid: str) -> Optional[SessionRecord]:
        h = await self.r.hgetall(self._k("session", sid))
        if not h:
            return None
        d = {k.decode(): v.decode() for k, v in h.items()}
        return SessionRecord(session_id=sid, state=d.get("state", "UNKNOWN"), width=int(d.get("width", 0)),
                             height=int(d.get("height", 0)), seed=int(d.get("seed", 0)),
                             created_ms=int(d.get("created_ms", 0)),
                             counters={f: int(d.get(f, 0)) for f in SESSION_FIELDS})

    async def get_options(self, sid: str) -> dict:
        raw = await self.r.hget(self._k("session", sid), "options")
        return json.loads(raw) if raw else {}

    async def set_state(self, sid: str, state: str) -> bool:
        """False when the session no longer exists (it is not recreated)."""
        return bool(await self._update(keys=[self._k("session", sid)], args=["set", "state", state]))

    async def incr(self, sid: str, **counters: int) -> bool:
        """Add to the session's counters; False when the session no longer exists (it is not recreated)."""
        pairs = [x for k, v in counters.items() if v for x in (k, int(v))]
        if not pairs:
            return True
        return bool(await self._update(keys=[self._k("session", sid)], args=["incr", *pairs]))

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
