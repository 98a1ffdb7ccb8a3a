"""SessionStore's lifecycle keys against a real redis-server: live counters, close requests, the tombstone, the idle
index and its atomic claim."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from avatarserve.engine.sink import SinkState
from avatarserve.serve.control.session_store import SESSION_FIELDS, SessionStore

from tests.conftest import RedisServer


@pytest.fixture
async def store(redis_server: RedisServer, redis_namespace: str):
    st = SessionStore.from_url(redis_server.url, namespace=redis_namespace, ttl_s=60.0, closed_ttl_s=30.0)
    yield st
    await st.close()


def sink() -> SinkState:
    return SinkState(reference=torch.zeros(1, 2, 1, 2, 2), motion=torch.zeros(1, 2, 1, 2, 2), text=torch.zeros(1, 3, 4),
                     seed=5)


async def keys(store: SessionStore, sid: str) -> list[str]:
    return sorted([k.decode() async for k in store.r.scan_iter(match=f"{store.ns}*{sid}*")])


async def test_stream_sync_close_request_and_tombstone(store: SessionStore) -> None:
    token = await store.create_session("s1", sink(), width=64, height=64, options={"idle_timeout_s": 30})
    rec = await store.get_session("s1")
    assert rec.state == "CREATED" and rec.counters == {f: 0 for f in SESSION_FIELDS} and rec.idle_deadline_ms > 0
    assert rec.idle_deadline_ms == rec.created_ms + 30_000
    assert await store.sync_stream("s1", deltas={"audio_samples_received": 100, "streams_opened": 1},
                                   fields={"state": "STREAMING", "last_audio_ms": rec.created_ms + 5},
                                   idle_deadline_ms=rec.created_ms + 35_005) == ""
    assert await store.request_close("s1", "closed") and await store.request_close("s1", "idle_timeout")
    assert await store.sync_stream("s1", deltas={"audio_samples_received": 50}) == "closed"  # the first reason
    await store.acquire_stream_lock("s1", "gw")

    closed = await store.finalize_close("s1")
    assert closed is not None
    tomb, now = closed
    assert now and tomb.closed and tomb.state == "CLOSED" and tomb.closed_ms >= tomb.created_ms
    assert tomb.counters["audio_samples_received"] == 150 and tomb.counters["streams_opened"] == 1
    assert tomb.options == {"idle_timeout_s": 30} and tomb.close_req == ""
    assert await keys(store, "s1") == [f"{store.ns}closed:s1"]  # sink, session hash, stream lock: gone
    assert await store.r.zscore(f"{store.ns}idle", "s1") is None
    assert 0 < await store.r.pttl(f"{store.ns}closed:s1") <= 30_000
    again = await store.finalize_close("s1")
    assert again is not None and not again[1] and again[0] == tomb  # idempotent
    assert await store.check_token("s1", token) is True and await store.check_token("s1", "x") is False
    assert (await store.get_session("s1")).state == "CLOSED"
    # A closed session is never recreated by a late write.
    assert await store.sync_stream("s1", deltas={"blocks_delivered": 1}) is None
    assert not await store.request_close("s1", "closed") and not await store.set_state("s1", "IDLE")
    assert await keys(store, "s1") == [f"{store.ns}closed:s1"]
    assert await store.finalize_close("never") is None


async def test_drain_flag_ends_streams_with_server_draining_until_lifted(store: SessionStore) -> None:
    await store.create_session("d1", sink(), width=64, height=64)
    await store.create_session("d2", sink(), width=64, height=64)
    assert await store.draining_ms() == 0
    await store.start_draining(30.0)
    assert 0 < await store.draining_ms() <= 30_000
    assert await store.r.pttl(f"{store.ns}draining") > 0  # like every key: it expires by itself
    assert await store.sync_stream("d1", deltas={}) == "server_draining"
    await store.request_close("d2", "closed")  # a close request says more than the drain: it wins
    assert await store.sync_stream("d2", deltas={}) == "closed"
    await store.acquire_stream_lock("d1", "gw")
    assert await store.open_streams() == 1
    await store.release_stream_lock("d1", "gw")
    assert await store.open_streams() == 0
    await store.stop_draining()
    assert await store.draining_ms() == 0 and await store.sync_stream("d1", deltas={}) == ""


async def test_failed_sessions_keep_their_state_in_the_tombstone(store: SessionStore) -> None:
    await store.create_session("s2", sink(), width=64, height=64, options={})
    assert await store.fail("s2", "pipeline error: boom")
    tomb, _ = await store.finalize_close("s2")
    assert (tomb.state, tomb.error) == ("FAILED", "pipeline error: boom")


async def test_idle_claims_are_exclusive(store: SessionStore) -> None:
    """Expired sessions are claimed once however many sweepers race; unexpired ones stay; a moved deadline counts."""
    for i in range(20):
        await store.create_session(f"i{i}", sink(), width=64, height=64, options={"idle_timeout_s": 1})
    await store.create_session("later", sink(), width=64, height=64, options={"idle_timeout_s": 600})
    rec = await store.get_session("i0")  # audio moves i0's deadline out of reach
    await store.sync_stream("i0", deltas={}, fields={"last_audio_ms": rec.created_ms + 1},
                            idle_deadline_ms=int(time.time() * 1000) + 600_000)
    deadline = time.monotonic() + 30
    while await store.r.zcount(f"{store.ns}idle", "-inf", int(time.time() * 1000)) < 19:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    claims = await asyncio.gather(*(store.claim_idle(limit=7) for _ in range(8)))
    claimed = [sid for c in claims for sid in c]
    assert sorted(claimed) == sorted(f"i{i}" for i in range(1, 20))  # each exactly once
    assert await store.r.zscore(f"{store.ns}idle", "later") is not None
    assert await store.r.zscore(f"{store.ns}idle", "i0") is not None
    # Like every key of the store, the index has a TTL, at least that of the sessions it lists.
    index_ttl, session_ttl = await store.r.pttl(f"{store.ns}idle"), await store.r.pttl(f"{store.ns}session:later")
    assert index_ttl > 0 and index_ttl >= session_ttl - 1000
    await store.set_idle_deadline("i1", int(time.time() * 1000) + 1000)
    assert await store.r.pttl(f"{store.ns}idle") > 0
