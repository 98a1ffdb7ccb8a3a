"""API keys and per-key quotas: who may create sessions, and how much they may use.

A key is `avs_<key id>_<secret>`: the key id (12 hex digits) is public (CLI listings, logs, per-key metrics may show
it), the secret never leaves the client and the CLI's one-time print. Only a salted hash is stored:
`sha256(salt || key id || ":" || secret)` with a random 16-byte salt per key, compared in constant time
(`hmac.compare_digest`). Keys are long random strings, so one SHA-256 is enough (no password stretching).

Redis schema (under the application's `namespace`, default "avatarserve:"):
    apikey:{id}                 hash    name, salt, sha256, created_ms, revoked_ms (0: live), max_sessions,
                                        session_seconds, period_s ("" = no own limit)
    apikeys                     set     every key id (the listing)
    apikey-sessions:{id}        zset    the key's open sessions: member session id (or `pending:<uuid>` while a
                                        CreateSession is under way), score = when the member expires (ms)
    apikey-usage:{id}:{window}  string  streaming seconds in quota window `window` (= floor(now / period_s)),
                                        expires 2 periods after it was last written
    session-key:{sid}           string  the key that created session `sid` (TTL = the session's)

Key records are operator-managed credentials and have no TTL; everything else does. A key is revoked by setting
`revoked_ms` (the record stays, so a revoked key gets PERMISSION_DENIED rather than UNAUTHENTICATED).

Concurrent sessions are counted robustly (nothing leaks when a gateway crashes): before a slot is given, the
Lua script drops members whose score passed (a pending CreateSession that never finished; a session whose keys
expired without anybody refreshing it) and members whose session hash `session:{sid}` is gone or CLOSED / FAILED
(closed by any path: CloseSession, an idle sweep, Redis expiry). A gateway refreshes its sessions' members with their
keys (`touch_session`).

Alternatively (or as well) keys come from a file the operator manages (`auth.keys_file`, e.g. a Kubernetes Secret
mounted as a file): one JSON object per line with the same fields as the hash (`id`, `name`, `salt`, `sha256`,
`max_sessions`, `session_seconds`, `period_s`, `revoked`), blank lines and `#` comments allowed;
`avatarserve keys create --keys-file F` appends such a line. The file is read again whenever it changes (mtime, size,
inode: a Secret update swaps a symlink). Usage of file keys is counted in Redis like any other.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import redis.asyncio as aioredis

from avatarserve.serve.control.redis_client import RedisUnavailableError, connect, translate_unavailable

__all__ = ["ApiKeyError", "ApiKeyRecord", "ApiKeyStore", "KEY_PREFIX", "KeysFile", "QuotaExceeded", "QuotaLimits",
           "format_key", "hash_secret", "new_key", "parse_key"]

KEY_PREFIX = "avs"
_ID_HEX = 12
_KEY_RE = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{{_ID_HEX}}})_([A-Za-z0-9_-]{{20,200}})$")
PENDING_PREFIX = "pending:"


class ApiKeyError(Exception):
    """The key store cannot do what was asked (unknown key id, unreadable keys file, ...)."""


class QuotaExceeded(Exception):
    """A key is over one of its quotas; `retry_after_ms` says when trying again may succeed."""

    def __init__(self, message: str, retry_after_ms: int, quota: str):
        super().__init__(message)
        self.retry_after_ms = max(0, int(retry_after_ms))
        self.quota = quota  # "sessions" | "session_seconds"


def new_key() -> Tuple[str, str]:
    """A fresh (key id, secret)."""
    return secrets.token_hex(_ID_HEX // 2), secrets.token_urlsafe(32)


def format_key(key_id: str, secret: str) -> str:
    return f"{KEY_PREFIX}_{key_id}_{secret}"


def parse_key(key: str) -> Optional[Tuple[str, str]]:
    """(key id, secret) of a well-formed key, else None."""
    m = _KEY_RE.match(key or "")
    return (m.group(1), m.group(2)) if m else None


def hash_secret(salt_hex: str, key_id: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt_hex) + f"{key_id}:{secret}".encode()).hexdigest()


@dataclass(frozen=True)
class QuotaLimits:
    """A key's limits; None = no limit of its own (the application's `auth.default_*` apply)."""

    max_sessions: Optional[int] = None
    session_seconds: Optional[float] = None
    period_s: Optional[float] = None


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    name: str
    salt: str
    sha256: str
    created_ms: int = 0
    revoked_ms: int = 0
    limits: QuotaLimits = field(default_factory=QuotaLimits)
    source: str = "redis"  # "redis" | "file"

    @property
    def revoked(self) -> bool:
        return self.revoked_ms > 0

    def matches(self, secret: str) -> bool:
        """Constant-time check of a presented secret against the stored hash."""
        return hmac.compare_digest(hash_secret(self.salt, self.key_id, secret), self.sha256)

    def to_file_entry(self) -> Dict[str, Any]:
        """The keys-file line of this record (no plain key in it)."""
        return {"id": self.key_id, "name": self.name, "salt": self.salt, "sha256": self.sha256,
                "created_ms": self.created_ms, "revoked": self.revoked, "max_sessions": self.limits.max_sessions,
                "session_seconds": self.limits.session_seconds, "period_s": self.limits.period_s}

    def public(self) -> Dict[str, Any]:
        """What a listing shows: never the key, never its hash."""
        return {"key_id": self.key_id, "name": self.name, "source": self.source, "created_ms": self.created_ms,
                "revoked": self.revoked, **asdict(self.limits)}


def make_record(name: str = "", limits: QuotaLimits = QuotaLimits(), *, source: str = "redis",
                key_id: Optional[str] = None, secret: Optional[str] = None) -> Tuple[ApiKeyRecord, str]:
    """A new key: (its record, the plain key). Give `key_id` and `secret` to register an existing key."""
    if (key_id is None) != (secret is None):
        raise ApiKeyError("key_id and secret go together")
    if key_id is None:
        key_id, secret = new_key()
    salt = secrets.token_hex(16)
    rec = ApiKeyRecord(key_id=key_id, name=name, salt=salt, sha256=hash_secret(salt, key_id, secret),
                       created_ms=int(time.time() * 1000), limits=limits, source=source)
    return rec, format_key(key_id, secret)


def _opt_int(v: Any) -> Optional[int]:
    return None if v in (None, "", b"") else int(v)


def _opt_float(v: Any) -> Optional[float]:
    return None if v in (None, "", b"") else float(v)


def _record_from_entry(entry: Dict[str, Any], where: str) -> ApiKeyRecord:
    try:
        key_id, salt, digest = str(entry["id"]), str(entry["salt"]), str(entry["sha256"])
        bytes.fromhex(salt)
        if not re.fullmatch(rf"[0-9a-f]{{{_ID_HEX}}}", key_id) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("id must be 12 hex digits and sha256 64")
        limits = QuotaLimits(_opt_int(entry.get("max_sessions")), _opt_float(entry.get("session_seconds")),
                             _opt_float(entry.get("period_s")))
        return ApiKeyRecord(key_id=key_id, name=str(entry.get("name") or ""), salt=salt, sha256=digest,
                            created_ms=int(entry.get("created_ms") or 0),
                            revoked_ms=1 if entry.get("revoked") else 0, limits=limits, source="file")
    except (KeyError, TypeError, ValueError) as exc:
        raise ApiKeyError(f"{where}: not a key entry ({type(exc).__name__}: {exc})") from exc


class KeysFile:
    """Hashed keys in a file the operator manages, re-read whenever it changes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stamp: Optional[tuple] = None
        self._records: Dict[str, ApiKeyRecord] = {}

    def records(self) -> Dict[str, ApiKeyRecord]:
        try:
            st = self.path.stat()
        except FileNotFoundError as exc:
            raise ApiKeyError(f"keys file {self.path} does not exist (auth.keys_file)") from exc
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self._records = self.parse(self.path.read_text(), str(self.path))
            self._stamp = stamp
        return self._records

    def get(self, key_id: str) -> Optional[ApiKeyRecord]:
        return self.records().get(key_id)

    @staticmethod
    def parse(text: str, where: str = "keys file") -> Dict[str, ApiKeyRecord]:
        out: Dict[str, ApiKeyRecord] = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ApiKeyError(f"{where}:{n}: not JSON ({exc.msg})") from exc
            if not isinstance(entry, dict):
                raise ApiKeyError(f"{where}:{n}: expected a JSON object")
            rec = _record_from_entry(entry, f"{where}:{n}")
            out[rec.key_id] = rec
        return out

    # ----- operator side (`avatarserve keys ... --keys-file`) --------------------------------------------
    def append(self, rec: ApiKeyRecord) -> None:
        existing = self.records() if self.path.exists() else {}
        if rec.key_id in existing:
            raise ApiKeyError(f"key {rec.key_id} is already in {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(json.dumps(rec.to_file_entry(), sort_keys=True) + "\n")

    def revoke(self, key_id: str) -> ApiKeyRecord:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        found: Optional[ApiKeyRecord] = None
        for i, line in enumerate(lines):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            entry = json.loads(s)
            if entry.get("id") == key_id:
                entry["revoked"] = True
                lines[i] = json.dumps(entry, sort_keys=True)
                found = _record_from_entry(entry, str(self.path))
        if found is None:
            raise ApiKeyError(f"no key {key_id!r} in {self.path}")
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, self.path)
        return found


# Take a concurrent-session slot for `member` if the key is under its limit.
# KEYS[1] apikey-sessions:{id}. ARGV: now_ms, member, member expiry ms, limit (-1: none), session key prefix.
# Returns {1, count} when taken, {0, count} when the key is at its limit.
_ACQUIRE = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, m in ipairs(members) do
  if string.sub(m, 1, 8) ~= 'pending:' then
    local state = redis.call('HGET', ARGV[5] .. m, 'state')
    if (not state) or state == 'CLOSED' or state == 'FAILED' then redis.call('ZREM', KEYS[1], m) end
  end
end
local n = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[4])
if limit >= 0 and n >= limit then return {0, n} end
redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), ARGV[2])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], math.max(tonumber(ARGV[3]), tonumber(last[2] or ARGV[3])))
return {1, n + 1}
"""


class ApiKeyStoreUnavailableError(RedisUnavailableError):
    """Redis is unreachable (the API answers UNAVAILABLE with retry-after-ms, api/errors.py)."""


@translate_unavailable(ApiKeyStoreUnavailableError)
class ApiKeyStore:
    """Keys, sessions per key and usage per key in Redis (plus an optional keys file). One per event loop."""

    def __init__(self, client: aioredis.Redis, *, namespace: str = "avatarserve:",
                 keys_file: Optional[str | os.PathLike] = None):
        self.r = client
        self.ns = namespace
        self.file = KeysFile(keys_file) if keys_file else None
        self._acquire = client.register_script(_ACQUIRE)

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> "ApiKeyStore":
        return cls(connect(url), **kw)  # control/redis_client.py: named timeouts, reconnects at once

    async def close(self) -> None:
        await self.r.aclose()

    def _k(self, *parts: str) -> str:
        return self.ns + ":".join(parts)

    # ----- keys ------------------------------------------------------------------------------------------
    async def create(self, name: str = "", limits: QuotaLimits = QuotaLimits()) -> Tuple[ApiKeyRecord, str]:
        """A new key stored (hashed) in Redis: (its record, the plain key, which is not stored anywhere)."""
        rec, key = make_record(name, limits)
        await self.put(rec)
        return rec, key

    async def put(self, rec: ApiKeyRecord, *, only_if_new: bool = False) -> bool:
        """Store a record; with `only_if_new`, leave an existing record of that id alone (False then)."""
        if only_if_new and await self.r.exists(self._k("apikey", rec.key_id)):
            return False
        lim = rec.limits
        fields = {"name": rec.name, "salt": rec.salt, "sha256": rec.sha256, "created_ms": rec.created_ms,
                  "revoked_ms": rec.revoked_ms,
                  "max_sessions": "" if lim.max_sessions is None else lim.max_sessions,
                  "session_seconds": "" if lim.session_seconds is None else lim.session_seconds,
                  "period_s": "" if lim.period_s is None else lim.period_s}
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self._k("apikey", rec.key_id), mapping=fields)
            p.sadd(self._k("apikeys"), rec.key_id)
            await p.execute()
        return True

    async def get(self, key_id: str) -> Optional[ApiKeyRecord]:
        """The key's record: Redis first, then the keys file."""
        h = await self.r.hgetall(self._k("apikey", key_id))
        if h:
            d = {k.decode(): v.decode() for k, v in h.items()}
            return ApiKeyRecord(key_id=key_id, name=d.get("name", ""), salt=d["salt"], sha256=d["sha256"],
                                created_ms=int(d.get("created_ms") or 0), revoked_ms=int(d.get("revoked_ms") or 0),
                                limits=QuotaLimits(_opt_int(d.get("max_sessions")),
                                                   _opt_float(d.get("session_seconds")),
                                                   _opt_float(d.get("period_s"))))
        return self.file.get(key_id) if self.file is not None else None

    async def list(self) -> List[ApiKeyRecord]:
        ids = sorted(m.decode() for m in await self.r.smembers(self._k("apikeys")))
        out = [rec for rec in [await self.get(i) for i in ids] if rec is not None and rec.source == "redis"]
        if self.file is not None and self.file.path.exists():
            seen = {r.key_id for r in out}
            out += [r for i, r in sorted(self.file.records().items()) if i not in seen]
        return out

    async def revoke(self, key_id: str) -> ApiKeyRecord:
        rec = await self.get(key_id)
        if rec is None or rec.source != "redis":
            raise ApiKeyError(f"no key {key_id!r} in Redis (namespace {self.ns!r})"
                              + ("; keys of a keys file are revoked in the file" if rec is not None else ""))
        revoked_ms = rec.revoked_ms or int(time.time() * 1000)
        await self.r.hset(self._k("apikey", key_id), "revoked_ms", revoked_ms)
        return replace(rec, revoked_ms=revoked_ms)

    async def verify(self, key: str) -> Tuple[str, Optional[ApiKeyRecord]]:
        """("ok" | "malformed" | "unknown" | "revoked", record). A wrong secret for a known id is "unknown"."""
        parsed = parse_key(key)
        if parsed is None:
            return "malformed", None
        key_id, secret = parsed
        rec = await self.get(key_id)
        if rec is None or not rec.matches(secret):
            return "unknown", None
        return ("revoked" if rec.revoked else "ok"), rec

    # ----- concurrent sessions ---------------------------------------------------------------------------
    async def acquire_pending(self, key_id: str, limit: Optional[int], ttl_s: float, retry_after_ms: int) -> str:
        """Hold a slot for a CreateSession under way (expires after `ttl_s`); returns its member name."""
        member = f"{PENDING_PREFIX}{uuid.uuid4().hex}"
        now = int(time.time() * 1000)
        ok, n = await self._acquire(keys=[self._k("apikey-sessions", key_id)],
                                    args=[now, member, now + int(ttl_s * 1000), -1 if limit is None else int(limit),
                                          self._k("session", "")])
        if not ok:
            raise QuotaExceeded(f"API key {key_id} has {n} open sessions, its limit (close one first)",
                                retry_after_ms, "sessions")
        return member

    async def bind_session(self, key_id: str, member: str, sid: str, ttl_s: float) -> None:
        """The CreateSession of `member` created session `sid`: the slot is now the session's (same TTL as its
        keys), and the session remembers its key."""
        ttl_ms = int(ttl_s * 1000)
        expiry = int(time.time() * 1000) + ttl_ms
        zkey = self._k("apikey-sessions", key_id)
        async with self.r.pipeline(transaction=True) as p:
            p.zrem(zkey, member)
            p.zadd(zkey, {sid: expiry})
            p.pexpire(zkey, ttl_ms)  # >= every member's expiry: each is at most now + ttl
            p.set(self._k("session-key", sid), key_id, px=ttl_ms)
            await p.execute()

    async def release_pending(self, key_id: str, member: str) -> None:
        await self.r.zrem(self._k("apikey-sessions", key_id), member)

    async def session_key(self, sid: str) -> Optional[str]:
        v = await self.r.get(self._k("session-key", sid))
        return v.decode() if v is not None else None

    async def touch_session(self, sid: str, ttl_s: float) -> None:
        """Restart the TTL of the session's slot (with its other keys, while its stream is open)."""
        key_id = await self.session_key(sid)
        if key_id is None:
            return
        ttl_ms = int(ttl_s * 1000)
        zkey = self._k("apikey-sessions", key_id)
        async with self.r.pipeline(transaction=True) as p:
            p.pexpire(self._k("session-key", sid), ttl_ms)
            p.zadd(zkey, {sid: int(time.time() * 1000) + ttl_ms}, xx=True)
            p.pexpire(zkey, ttl_ms)  # >= every member's expiry: each is at most now + ttl
            await p.execute()

    async def release_session(self, sid: str) -> None:
        """The session is closed: its slot goes back at once."""
        key_id = await self.session_key(sid)
        if key_id is None:
            return
        async with self.r.pipeline(transaction=True) as p:
            p.zrem(self._k("apikey-sessions", key_id), sid)
            p.delete(self._k("session-key", sid))
            await p.execute()

    async def open_sessions(self, key_id: str) -> int:
        """Open sessions of the key now (expired / closed members are not counted)."""
        zkey = self._k("apikey-sessions", key_id)
        now = int(time.time() * 1000)
        n = 0
        for m, _ in await self.r.zrangebyscore(zkey, now, "+inf", withscores=True):
            m = m.decode()
            if m.startswith(PENDING_PREFIX):
                n += 1
                continue
            state = await self.r.hget(self._k("session", m), "state")
            if state is not None and state.decode() not in ("CLOSED", "FAILED"):
                n += 1
        return n

    # ----- session-seconds per period --------------------------------------------------------------------
    @staticmethod
    def window(period_s: float, now: Optional[float] = None) -> Tuple[int, float]:
        """(index of the current quota window, seconds until it ends)."""
        now = time.time() if now is None else now
        w = math.floor(now / period_s)
        return w, (w + 1) * period_s - now

    async def charge(self, key_id: str, seconds: float, period_s: float) -> float:
        """Add streaming seconds to the key's current window; returns the window's total."""
        if seconds <= 0:
            return await self.usage(key_id, period_s)
        w, _ = self.window(period_s)
        k = self._k("apikey-usage", key_id, str(w))
        async with self.r.pipeline(transaction=True) as p:
            p.incrbyfloat(k, seconds)
            p.pexpire(k, int(2 * period_s * 1000))
            total, _ = await p.execute()
        return float(total)

    async def usage(self, key_id: str, period_s: float) -> float:
        w, _ = self.window(period_s)
        v = await self.r.get(self._k("apikey-usage", key_id, str(w)))
        return float(v) if v is not None else 0.0

    async def check_usage(self, key_id: str, limit: Optional[float], period_s: float) -> None:
        """QuotaExceeded when the key used its streaming seconds of the current window."""
        if limit is None:
            return
        used = await self.usage(key_id, period_s)
        if used >= limit:
            _, left = self.window(period_s)
            raise QuotaExceeded(f"API key {key_id} used {used:.1f} of its {limit:g} session-seconds per "
                                f"{period_s:g} s", int(math.ceil(left * 1000)), "session_seconds")
