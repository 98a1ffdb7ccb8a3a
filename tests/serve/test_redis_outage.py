"""Redis outages against a real redis-server the test owns (killed with SIGKILL, restarted on the same port with its
data kept or lost): the store and registry raise one typed error, the client reconnects at once, heartbeats
re-register, and a gateway's tracked sessions are written behind and written back."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Iterator

import pytest
import redis.asyncio as aioredis
import torch

from avatarserve.engine.sink import SinkState
from avatarserve.serve.config import RedisTimeouts
from avatarserve.serve.control.live_sessions import GatewaySessionStore
from avatarserve.serve.control.redis_client import RedisUnavailableError
from avatarserve.serve.control.registry import (ReplicaHeartbeat, ReplicaInfo, ReplicaRegistry, RegistryUnavailableError,
                                                RouteHop)
from avatarserve.serve.control.session_store import SessionStore, StoreError, StoreUnavailableError, sink_to_bytes
from tests.support.redis_proc import OwnRedis
from tests.support.sessions import tiny_sink

NS = "outage:"
PROBE_S = 0.05
WAIT_S = 20.0  # generous: a busy 2-core machine


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    r = OwnRedis(appendonly=True)
    r.start()
    yield r
    r.close()


async def wait_for(what: str, cond: Callable[[], Awaitable[bool]], timeout_s: float = WAIT_S) -> float:
    """Poll `cond` until true; returns how long it took. Fails naming `what` after `timeout_s`."""
    t0 = time.monotonic()
    while not await cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def warnings_of(caplog, text: str) -> list:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


async def test_typed_errors_and_prompt_reconnect(own_redis: OwnRedis) -> None:
    store = SessionStore.from_url(own_redis.url, namespace=NS)
    reg = ReplicaRegistry.from_url(own_redis.url, namespace=NS)
    try:
        token = await store.create_session("s1", tiny_sink(), width=64, height=64)
        await reg.register(ReplicaInfo("AudioEncoder", "a1", "127.0.0.1:1", capacity=4))
        await asyncio.gather(*(store.get_session("s1") for _ in range(6)))  # several pooled connections
        await asyncio.gather(*(reg.replicas("AudioEncoder") for _ in range(6)))
        own_redis.kill()
        with pytest.raises(StoreUnavailableError, match="Redis is unreachable") as err:
            await store.get_session("s1")
        assert isinstance(err.value, StoreError) and isinstance(err.value, RedisUnavailableError)
        with pytest.raises(RegistryUnavailableError):
            await reg.replicas("AudioEncoder")
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await store.check_token("s1", token)
        assert time.monotonic() - t0 < 1.0  # a refused connection fails at once (one quick retry)
        own_redis.start(keep_data=True)
        # Every pooled connection is a dead socket now; each call retries once on a fresh one: none fails.
        got = await asyncio.gather(*(store.check_token("s1", token) for _ in range(6)))
        assert got == [True] * 6
        assert [len(x) for x in await asyncio.gather(*(reg.replicas("AudioEncoder") for _ in range(6)))] == [1] * 6
    finally:
        await store.close()
        await reg.close()


async def test_heartbeat_rides_out_an_outage_and_re_registers(own_redis: OwnRedis, caplog) -> None:
    caplog.set_level(logging.INFO)
    reg = ReplicaRegistry.from_url(own_redis.url, namespace=NS, ttl_s=2.0)
    hb = ReplicaHeartbeat(reg, lambda: ReplicaInfo("DenoiseStage0", "d1", "127.0.0.1:2", capacity=2,
                                                  live_sessions=1), interval_s=PROBE_S)
    try:
        await hb.start()
        own_redis.kill()
        await wait_for("5 failed beats", lambda: _true(hb.failed_beats >= 5))
        assert not hb._task.done()  # the beats go on
        assert len(warnings_of(caplog, "Redis is unreachable")) == 1  # once per outage, not per beat
        own_redis.start(keep_data=False)  # its data is lost: the record must come back by itself
        took = await wait_for("the replica re-registered", lambda: _listed(reg, "DenoiseStage0", "d1"))
        assert took < 5.0
        assert len(warnings_of(caplog, "Redis is reachable again")) == 1
    finally:
        await hb.stop()
        await reg.close()


async def _true(v: bool) -> bool:
    return v


async def _listed(reg: ReplicaRegistry, dep: str, rid: str) -> bool:
    try:
        return [r.replica_id for r in await reg.replicas(dep)] == [rid]
    except RedisUnavailableError:
        return False


class Gateway:
    """A gateway's store + registry on one loop, with a tracked session streaming (lock held)."""

    def __init__(self, url: str, probe_s: float = PROBE_S) -> None:
        opts = RedisTimeouts(probe_s=probe_s)
        self.store = GatewaySessionStore.from_url(url, namespace=NS, ttl_s=600, redis_options=opts)
        self.registry = ReplicaRegistry.from_url(url, namespace=NS, redis_options=opts)
        self.store.restore_hooks.append(self.registry.restore_routes)
        self.hops = [RouteHop("AudioEncoder", "a1", "127.0.0.1:1"), RouteHop("VaeDecoder", "v1", "127.0.0.1:2")]

    async def open(self, sid: str, sink_state: SinkState) -> str:
        token = await self.store.create_session(sid, sink_state, width=64, height=64, options={"seed": 7})
        await self.registry.record_route(sid, self.hops, ttl_s=600)
        assert await self.store.acquire_stream_lock(sid, "gw1")
        await self.store.set_state(sid, "STREAMING")
        assert await self.store.track(sid, "gw1")
        self.registry.track_route(sid, self.hops, ttl_s=600)
        return token

    async def close(self) -> None:
        await self.store.close()
        await self.registry.close()


async def raw_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url)


@pytest.mark.parametrize("keep_data", [True, False], ids=["data-kept", "data-lost"])
async def test_tracked_session_is_written_behind_and_back(own_redis: OwnRedis, keep_data: bool, caplog) -> None:
    caplog.set_level(logging.INFO)
    gw = Gateway(own_redis.url)
    try:
        token = await gw.open("live", tiny_sink(aas=True))
        idle_token = await gw.store.create_session("idle", tiny_sink(), width=64, height=64)
        await gw.store.incr("live", blocks_generated=3)
        own_redis.kill()
        # Tracked writes never fail while Redis is down; the stream's counters are buffered.
        for _ in range(5):
            assert await gw.store.incr("live", blocks_generated=1, frames_delivered=12) is True
        assert await gw.store.set_state("live", "IDLE") is True
        assert await gw.store.touch("live") is True
        assert gw.store.writing_behind
        # Calls on anything else answer the typed error (the API's UNAVAILABLE).
        with pytest.raises(StoreUnavailableError):
            await gw.store.get_session("live")
        with pytest.raises(StoreUnavailableError):
            await gw.store.check_token("idle", idle_token)
        assert len(warnings_of(caplog, "Redis is unreachable")) == 1
        own_redis.start(keep_data=keep_data)
        await wait_for("write-back done", lambda: _true(not gw.store.writing_behind))
        rec = await gw.store.get_session("live")
        assert rec is not None and rec.state == "IDLE"
        assert rec.counters["blocks_generated"] == 8  # 3 before + 5 buffered, exactly once
        assert rec.counters["frames_delivered"] == 60
        assert await gw.store.check_token("live", token) is True
        assert (await gw.store.get_sink("live")).aas_latent is not None
        assert await gw.registry.get_route("live") == gw.hops
        raw = await raw_client(own_redis.url)
        try:
            assert await raw.get(f"{NS}streamlock:live") == b"gw1"
            assert 0 < await raw.pttl(f"{NS}session:live") <= 600_000
        finally:
            await raw.aclose()
        # A session nobody streamed survives only if Redis kept its data.
        assert (await gw.store.check_token("idle", idle_token)) is (True if keep_data else None)
        assert gw.store.written_back == (0 if keep_data else 1)
        assert len(warnings_of(caplog, "Redis is reachable again")) == 1
        # The stream ends: the lock goes, the session stays (IDLE), tracking stops.
        await gw.store.release_stream_lock("live", "gw1")
        gw.store.untrack("live")
        assert gw.store.tracked == []
        assert not await gw.store.stream_open("live")
    finally:
        await gw.close()


async def test_stream_that_ends_during_the_outage_releases_its_lock_afterwards(own_redis: OwnRedis) -> None:
    gw = Gateway(own_redis.url)
    try:
        await gw.open("s", tiny_sink())
        own_redis.kill()
        await gw.store.incr("s", blocks_generated=2)
        await gw.store.set_state("s", "IDLE")
        await gw.store.release_stream_lock("s", "gw1")  # the stream ended while Redis was down
        gw.store.untrack("s")
        assert gw.store.tracked == ["s"]  # kept until what it wrote is in Redis
        own_redis.start(keep_data=False)
        await wait_for("the ended stream's session written back", lambda: _true(gw.store.tracked == []))
        rec = await gw.store.get_session("s")
        assert rec is not None and rec.state == "IDLE" and rec.counters["blocks_generated"] == 2
        assert not await gw.store.stream_open("s")  # a new stream of it can open
        assert await gw.store.acquire_stream_lock("s", "gw2")
    finally:
        await gw.close()


async def test_restart_that_no_call_noticed_is_written_back_on_the_next_write(own_redis: OwnRedis) -> None:
    gw = Gateway(own_redis.url, probe_s=3600.0)  # the watcher never looks: only the write finds out
    try:
        await gw.open("s", tiny_sink())
        await gw.store.incr("s", blocks_generated=4)
        own_redis.kill()
        own_redis.start(keep_data=False)
        assert await gw.store.incr("s", blocks_generated=1) is True  # missing + new run id: written back
        rec = await gw.store.get_session("s")
        assert rec is not None and rec.counters["blocks_generated"] == 5 and rec.state == "STREAMING"
        assert await gw.registry.get_route("s") == gw.hops
    finally:
        await gw.close()


async def test_deleted_or_closed_sessions_are_not_written_back(own_redis: OwnRedis) -> None:
    gw = Gateway(own_redis.url)
    try:
        await gw.open("gone", tiny_sink())
        await gw.store.delete_session("gone")  # closed on purpose while streaming
        assert gw.store.tracked == []
        assert await gw.store.incr("gone", blocks_generated=1) is False  # not recreated
        await gw.open("s", tiny_sink())
        raw = await raw_client(own_redis.url)
        try:  # a tombstone written by another gateway's CloseSession (session:{sid} gone, closed:{sid} there)
            await raw.delete(f"{NS}session:s")
            await raw.hset(f"{NS}closed:s", mapping={"state": "CLOSED"})
        finally:
            await raw.aclose()
        own_redis.kill()
        await gw.store.incr("s", blocks_generated=1)
        own_redis.start(keep_data=True)
        await wait_for("write-back done", lambda: _true(not gw.store.writing_behind))
        assert gw.store.tracked == [] and gw.store.written_back == 0
        assert await gw.store.read_session_hash("s") == {}
    finally:
        await gw.close()


async def test_sink_copy_follows_the_adaptive_sink_latent(own_redis: OwnRedis) -> None:
    gw = Gateway(own_redis.url)
    try:
        await gw.open("s", tiny_sink(aas=False))
        assert not gw.store.live_session("s").sink_has_aas
        await gw.store.set_aas_latent("s", torch.ones(1, 4, 1, 2, 2))  # the last stage stores it
        await wait_for("the gateway's sink copy has the latent", lambda: _true(gw.store.live_session("s").sink_has_aas))
        own_redis.kill()
        own_redis.start(keep_data=False)
        await wait_for("written back", lambda: _true(gw.store.written_back == 1))
        assert torch.equal((await gw.store.get_sink("s")).aas_latent, torch.ones(1, 4, 1, 2, 2))
    finally:
        await gw.close()


async def test_a_read_of_a_tracked_session_right_after_the_restart_writes_it_back(own_redis: OwnRedis) -> None:
    gw = Gateway(own_redis.url, probe_s=3600.0)  # before the watcher's next look
    try:
        token = await gw.open("s", tiny_sink())
        own_redis.kill()
        with pytest.raises(StoreUnavailableError):
            await gw.store.check_token("s", token)
        own_redis.start(keep_data=False)
        assert await gw.store.check_token("s", token) is True  # not NOT_FOUND: written back on the spot
        assert (await gw.store.get_session("s")).state == "STREAMING"
        assert gw.store.written_back == 1 and not gw.store.writing_behind
    finally:
        await gw.close()


async def test_a_read_right_after_the_outage_sees_the_buffered_counters(own_redis: OwnRedis) -> None:
    gw = Gateway(own_redis.url, probe_s=3600.0)
    try:
        token = await gw.open("s", tiny_sink())
        own_redis.kill()
        await gw.store.incr("s", blocks_delivered=7)
        own_redis.start(keep_data=True)
        assert await gw.store.check_token("s", token) is True
        assert (await gw.store.get_session("s")).counters["blocks_delivered"] == 7
        assert gw.store.written_back == 0 and not gw.store.writing_behind
    finally:
        await gw.close()
