"""API keys and per-key quotas (serve/control/api_keys.py) against a real redis-server, the key check's metadata
parsing (serve/api/auth.py), the launcher's key, and the `avatarserve keys` CLI as a subprocess."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import redis
import redis.asyncio as aioredis

from avatarserve.serve.api.auth import api_key_from_metadata
from avatarserve.serve.control.api_keys import (ApiKeyStore, KeysFile, QuotaExceeded, QuotaLimits, make_record,
                                                parse_key)


@pytest.fixture
async def store(redis_server, redis_namespace):
    s = ApiKeyStore(aioredis.from_url(redis_server.url), namespace=redis_namespace)
    yield s
    await s.close()


def _all_redis_bytes(url: str, ns: str) -> bytes:
    """Every key name and value under `ns`, concatenated (to look for a secret in it)."""
    r = redis.Redis.from_url(url)
    out = b""
    for k in r.scan_iter(match=f"{ns}*"):
        out += k
        t = r.type(k)
        if t == b"hash":
            out += b"".join(a + b for a, b in r.hgetall(k).items())
        elif t == b"string":
            out += r.get(k) or b""
        elif t == b"set":
            out += b"".join(r.smembers(k))
        elif t == b"zset":
            out += b"".join(m for m, _ in r.zrange(k, 0, -1, withscores=True))
    r.close()
    return out


def _session(url: str, ns: str, sid: str, state: str = "CREATED") -> None:
    """A session hash as the session store writes it (only `state` matters to the quota)."""
    r = redis.Redis.from_url(url)
    r.hset(f"{ns}session:{sid}", mapping={"state": state, "token_sha256": "x"})
    r.close()


async def test_keys_are_stored_hashed_and_verified(store, redis_server, redis_namespace):
    rec, key = await store.create("alice", QuotaLimits(max_sessions=3))
    key_id, secret = parse_key(key)
    assert key_id == rec.key_id and key.startswith("avs_")
    assert await store.verify(key) == ("ok", await store.get(key_id))
    stored = _all_redis_bytes(redis_server.url, redis_namespace)
    assert secret.encode() not in stored and key.encode() not in stored
    assert (await store.verify(f"avs_{key_id}_{'x' * 43}"))[0] == "unknown"  # a wrong secret for a known id
    assert (await store.verify("avs_0123456789ab_" + "y" * 43))[0] == "unknown"
    assert (await store.verify("not-a-key"))[0] == "malformed"
    assert (await store.verify(""))[0] == "malformed"
    revoked = await store.revoke(key_id)
    assert revoked.revoked
    assert (await store.verify(key))[0] == "revoked"
    listed = await store.list()
    assert [r.key_id for r in listed] == [key_id]
    assert listed[0].limits.max_sessions == 3 and listed[0].name == "alice"
    assert secret not in json.dumps(listed[0].public())


async def test_concurrent_session_slots(store, redis_server, redis_namespace):
    rec, _ = await store.create("bob", QuotaLimits(max_sessions=2))
    kid = rec.key_id
    a = await store.acquire_pending(kid, 2, ttl_s=60, retry_after_ms=1500)
    b = await store.acquire_pending(kid, 2, ttl_s=60, retry_after_ms=1500)
    with pytest.raises(QuotaExceeded) as err:
        await store.acquire_pending(kid, 2, ttl_s=60, retry_after_ms=1500)
    assert err.value.retry_after_ms == 1500 and err.value.quota == "sessions"
    # a failed CreateSession gives its slot back
    await store.release_pending(kid, b)
    b = await store.acquire_pending(kid, 2, ttl_s=60, retry_after_ms=1500)
    # both succeed: the slots become the sessions'
    _session(redis_server.url, redis_namespace, "s1")
    _session(redis_server.url, redis_namespace, "s2")
    await store.bind_session(kid, a, "s1", ttl_s=60)
    await store.bind_session(kid, b, "s2", ttl_s=60)
    assert await store.session_key("s1") == kid
    assert await store.open_sessions(kid) == 2
    with pytest.raises(QuotaExceeded):
        await store.acquire_pending(kid, 2, ttl_s=60, retry_after_ms=0)
    # CloseSession releases at once
    await store.release_session("s1")
    assert await store.session_key("s1") is None
    c = await store.acquire_pending(kid, 2, ttl_s=60, retry_after_ms=0)
    await store.release_pending(kid, c)
    # a session closed by another path (idle sweep, tombstone) or gone from Redis frees its slot without any hook
    _session(redis_server.url, redis_namespace, "s3")
    await store.bind_session(kid, await store.acquire_pending(kid, 2, ttl_s=60, retry_after_ms=0), "s3", ttl_s=60)
    _session(redis_server.url, redis_namespace, "s2", state="CLOSED")
    d = await store.acquire_pending(kid, 2, ttl_s=60, retry_after_ms=0)
    await store.release_pending(kid, d)
    r = redis.Redis.from_url(redis_server.url)
    r.delete(f"{redis_namespace}session:s3")
    r.close()
    assert await store.open_sessions(kid) == 0
    # a pending CreateSession whose gateway died expires with its TTL (0 here: already expired)
    await store.acquire_pending(kid, 2, ttl_s=0, retry_after_ms=0)
    await store.acquire_pending(kid, 2, ttl_s=0, retry_after_ms=0)
    await store.acquire_pending(kid, 2, ttl_s=60, retry_after_ms=0)
    await store.acquire_pending(kid, 2, ttl_s=60, retry_after_ms=0)
    # no limit: never refused
    for _ in range(5):
        await store.acquire_pending(kid, None, ttl_s=60, retry_after_ms=0)


async def test_touch_keeps_a_streaming_sessions_slot(store, redis_server, redis_namespace):
    rec, _ = await store.create("carol", QuotaLimits(max_sessions=1))
    _session(redis_server.url, redis_namespace, "s1")
    await store.bind_session(rec.key_id, await store.acquire_pending(rec.key_id, 1, 60, 0), "s1", ttl_s=0.001)
    await store.touch_session("s1", ttl_s=60)  # refreshed before it expired: the slot is held again for 60 s
    with pytest.raises(QuotaExceeded):
        await store.acquire_pending(rec.key_id, 1, 60, 0)
    r = redis.Redis.from_url(redis_server.url)
    assert r.pttl(f"{redis_namespace}session-key:s1") > 30_000
    assert r.pttl(f"{redis_namespace}apikey-sessions:{rec.key_id}") > 30_000
    r.close()


async def test_session_seconds_per_period(store):
    rec, _ = await store.create("dave", QuotaLimits(session_seconds=10, period_s=3600))
    kid = rec.key_id
    await store.check_usage(kid, 10, 3600)
    assert await store.charge(kid, 4.0, 3600) == pytest.approx(4.0)
    await store.check_usage(kid, 10, 3600)
    assert await store.charge(kid, 6.5, 3600) == pytest.approx(10.5)
    with pytest.raises(QuotaExceeded) as err:
        await store.check_usage(kid, 10, 3600)
    _, left = ApiKeyStore.window(3600)
    assert err.value.quota == "session_seconds"
    assert 0 < err.value.retry_after_ms <= left * 1000 + 1000
    await store.check_usage(kid, None, 3600)  # no limit
    other, _ = await store.create("erin")
    assert await store.usage(other.key_id, 3600) == 0.0  # usage is per key
    assert ApiKeyStore.window(60, now=125.0) == (2, pytest.approx(55.0))


async def test_keys_file(tmp_path, store, redis_server, redis_namespace):
    path = tmp_path / "keys.jsonl"
    f = KeysFile(path)
    rec, key = make_record("from-file", QuotaLimits(max_sessions=1, session_seconds=5, period_s=60), source="file")
    f.append(rec)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert parse_key(key)[1] not in text
    store.file = KeysFile(path)
    verdict, got = await store.verify(key)
    assert verdict == "ok" and got.source == "file" and got.limits == QuotaLimits(1, 5.0, 60.0)
    path.write_text("# operator comment\n\n" + text)  # comments and blank lines are fine
    assert (await store.verify(key))[0] == "ok"
    f.revoke(rec.key_id)
    assert (await store.verify(key))[0] == "revoked"  # re-read after the change
    path.write_text("{not json\n")
    with pytest.raises(Exception, match="not JSON"):
        await store.verify(key)


def test_api_key_from_metadata():
    assert api_key_from_metadata([("authorization", "Bearer avs_k")]) == "avs_k"
    assert api_key_from_metadata([("Authorization", "bearer   avs_k ")]) == "avs_k"
    assert api_key_from_metadata([("x-api-key", "avs_x")]) == "avs_x"
    assert api_key_from_metadata([("x-api-key", b"avs_b")]) == "avs_b"
    assert api_key_from_metadata([("authorization", "Basic abc"), ("x-api-key", "avs_x")]) == "avs_x"
    assert api_key_from_metadata([("authorization", "Bearer a"), ("x-api-key", "b")]) == "a"
    assert api_key_from_metadata([("application", "avatarserve")]) is None
    assert api_key_from_metadata([]) is None


def test_launcher_key_is_created_once_and_registered_again(tmp_path, redis_server, redis_namespace):
    import asyncio

    from avatarserve.serve.ops.launcher import ensure_launcher_key

    key_file = tmp_path / "state" / "api-key"
    created = ensure_launcher_key(redis_server.url, redis_namespace, key_file)
    assert created and key_file.read_text().strip() == created
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert ensure_launcher_key(redis_server.url, redis_namespace, key_file) is None  # not shown again
    r = redis.Redis.from_url(redis_server.url)
    for k in list(r.scan_iter(match=f"{redis_namespace}*")):
        r.delete(k)  # a fresh redis-server (the local cluster keeps nothing across restarts)
    r.close()
    assert ensure_launcher_key(redis_server.url, redis_namespace, key_file) is None

    async def verify():
        s = ApiKeyStore.from_url(redis_server.url, namespace=redis_namespace)
        try:
            return (await s.verify(created))[0]
        finally:
            await s.close()

    assert asyncio.run(verify()) == "ok"


def _cli(*args: str, env=None) -> subprocess.CompletedProcess:
    # A hang guard only: a cold import of the CLI took over 120 s here while other processes kept both cores busy.
    return subprocess.run([sys.executable, "-m", "avatarserve.cli", "keys", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_keys_cli(tmp_path, redis_server, redis_namespace):
    env = dict(os.environ, AVATARSERVE_STATE_DIR=str(tmp_path / "no-cluster"))
    env.pop("REDIS_URL", None)
    where = ["--redis-url", redis_server.url, "--namespace", redis_namespace]
    made = _cli("create", "--name", "ci", "--max-sessions", "2", "--session-seconds-per-hour", "600", *where, env=env)
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    key, kid = info["api_key"], info["key_id"]
    assert parse_key(key)[0] == kid and info["max_sessions"] == 2 and info["session_seconds"] == 600
    assert info["period_s"] == 3600 and "shown only now" in made.stderr
    listed = _cli("list", "--json", *where, env=env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["key_id"], r["name"], r["revoked"], r["open_sessions"], r["used_session_seconds"]) for r in rows] == \
        [(kid, "ci", False, 0, 0.0)]
    table = _cli("list", *where, env=env)
    assert kid in table.stdout and "ci" in table.stdout
    for out in (listed.stdout, table.stdout, listed.stderr, table.stderr):
        assert key not in out and parse_key(key)[1] not in out
    revoked = _cli("revoke", kid, *where, env=env)
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked"] is True
    assert json.loads(_cli("list", "--json", *where, env=env).stdout)[0]["revoked"] is True
    unknown = _cli("revoke", "0123456789ab", *where, env=env)
    assert unknown.returncode == 2 and "no key" in unknown.stderr
    # without any Redis to talk to: a clear error, not a traceback
    nowhere = _cli("list", env=env)
    assert nowhere.returncode == 2 and "no Redis" in nowhere.stderr

    # keys file mode: a hashed line for a Secret, revoked in the file
    kf = tmp_path / "keys.jsonl"
    made = _cli("create", "--name", "k8s", "--keys-file", str(kf), env=env)
    assert made.returncode == 0, made.stderr
    fkey = json.loads(made.stdout)["api_key"]
    assert parse_key(fkey)[1] not in kf.read_text()
    both = json.loads(_cli("list", "--json", "--keys-file", str(kf), *where, env=env).stdout)
    assert {r["source"] for r in both} == {"redis", "file"}
    assert _cli("revoke", parse_key(fkey)[0], "--keys-file", str(kf), env=env).returncode == 0
    assert json.loads(kf.read_text().strip())["revoked"] is True
