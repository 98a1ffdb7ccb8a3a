"""ReplicaRegistry against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from avatarserve.serve.control.registry import (
    NoReplicaAvailableError,
    RegistryError,
    ReplicaHeartbeat,
    ReplicaInfo,
    ReplicaRegistry,
    RouteHop,
)

from tests.conftest import RedisServer


@pytest.fixture
async def registry(redis_server: RedisServer, redis_namespace: str):
    reg = ReplicaRegistry.from_url(redis_server.url, namespace=redis_namespace, ttl_s=5.0)
    yield reg
    await reg.close()


def info(rid: str, live: int, cap: int, dep: str = "DenoiseStage0") -> ReplicaInfo:
    return ReplicaInfo(dep, rid, f"127.0.0.1:{5000 + int(rid[-1])}", live_sessions=live, capacity=cap)


async def test_register_list_and_pick_least_loaded(registry: ReplicaRegistry) -> None:
    for r in (info("r1", 3, 4), info("r2", 1, 4), info("r3", 2, 8), info("r9", 0, 2, dep="VaeDecoder")):
        await registry.register(r)
    listed = await registry.replicas("DenoiseStage0")
    assert [(r.replica_id, r.live_sessions, r.capacity) for r in listed] == [("r1", 3, 4), ("r2", 1, 4), ("r3", 2, 8)]
    assert all(r.updated_ms > 0 for r in listed)

    # Loads 0.75 / 0.25 / 0.25: tie on load goes to fewer live sessions (r2), and the pick reserves a slot.
    first = await registry.pick_least_loaded("DenoiseStage0")
    assert (first.replica_id, first.live_sessions, first.address) == ("r2", 2, "127.0.0.1:5002")
    second = await registry.pick_least_loaded("DenoiseStage0")
    assert (second.replica_id, second.live_sessions) == ("r3", 3)  # r2 now at 0.5 > r3 0.25
    peek = await registry.pick_least_loaded("DenoiseStage0", reserve=False)
    assert (peek.replica_id, peek.live_sessions) == ("r3", 3)
    assert {r.replica_id: r.live_sessions for r in await registry.replicas("DenoiseStage0")} == {"r1": 3, "r2": 2, "r3": 3}
    assert (await registry.pick_least_loaded("VaeDecoder")).replica_id == "r9"


async def test_concurrent_picks_never_exceed_capacity(registry: ReplicaRegistry) -> None:
    await registry.register(info("r1", 0, 3))
    await registry.register(info("r2", 0, 2))
    results = await asyncio.gather(*(registry.pick_least_loaded("DenoiseStage0") for _ in range(7)), return_exceptions=True)
    picked = [r.replica_id for r in results if isinstance(r, ReplicaInfo)]
    assert sorted(picked) == ["r1", "r1", "r1", "r2", "r2"]
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 2 and all(isinstance(e, NoReplicaAvailableError) and "at capacity" in str(e) for e in errors)


async def test_no_replica_and_expiry(redis_server: RedisServer, redis_namespace: str) -> None:
    async with ReplicaRegistry.from_url(redis_server.url, namespace=redis_namespace, ttl_s=0.3) as reg:
        with pytest.raises(NoReplicaAvailableError, match="no live replica of 'AudioEncoder'"):
            await reg.pick_least_loaded("AudioEncoder")
        await reg.register(info("r1", 0, 1, dep="AudioEncoder"))
        assert [r.replica_id for r in await reg.replicas("AudioEncoder")] == ["r1"]
        await asyncio.sleep(0.45)  # no heartbeat: the record and its index entry expire
        assert await reg.replicas("AudioEncoder") == []
        with pytest.raises(NoReplicaAvailableError, match="no live replica"):
            await reg.pick_least_loaded("AudioEncoder")


async def test_heartbeat_keeps_replica_alive_and_deregisters(redis_server: RedisServer, redis_namespace: str) -> None:
    live = {"n": 0}
    async with ReplicaRegistry.from_url(redis_server.url, namespace=redis_namespace, ttl_s=0.3) as reg:
        hb = ReplicaHeartbeat(reg, lambda: info("r1", live["n"], 4), interval_s=0.08)
        await hb.start()
        live["n"] = 2
        await asyncio.sleep(0.5)  # longer than the ttl: only heartbeats keep it
        (rec,) = await reg.replicas("DenoiseStage0")
        assert rec.live_sessions == 2 and hb.beats >= 4
        await hb.stop()
        assert await reg.replicas("DenoiseStage0") == []
        with pytest.raises(RegistryError, match="below the registry ttl"):
            ReplicaHeartbeat(reg, lambda: info("r1", 0, 1), interval_s=1.0)


async def test_routes_are_recorded_and_removed(registry: ReplicaRegistry, redis_server: RedisServer, redis_namespace: str) -> None:
    hops = [RouteHop("AudioEncoder", "a1", "10.0.0.1:4000"), RouteHop("DenoiseStage0", "d1", "10.0.0.2:4001")]
    await registry.record_route("sess-1", hops, ttl_s=60)
    assert await registry.get_route("sess-1") == hops
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert await raw.exists(f"{redis_namespace}route:sess-1") == 1
        await raw.set(f"{redis_namespace}route:bad", "[{\"nope\": 1}]")
        with pytest.raises(RegistryError, match="malformed route record"):
            await registry.get_route("bad")
    finally:
        await raw.aclose()
    assert await registry.remove_route("sess-1") is True
    assert await registry.get_route("sess-1") is None
    assert await registry.remove_route("sess-1") is False
    with pytest.raises(RegistryError, match="no hops"):
        await registry.record_route("sess-2", [], ttl_s=60)


def test_replica_info_validation() -> None:
    with pytest.raises(RegistryError, match="address must be host:port"):
        ReplicaInfo("D", "r", "nowhere")
    with pytest.raises(RegistryError, match="capacity must be >= 1"):
        ReplicaInfo("D", "r", "h:1", capacity=0)
    with pytest.raises(RegistryError, match="without ':'"):
        ReplicaInfo("D:x", "r", "h:1")
