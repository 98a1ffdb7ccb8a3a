"""Admission never admits more sessions on a stage than its maximum size allows (max replicas x capacity), against a
real redis-server: sessions that went live and ended (IDLE: held by no replica's count) still count until closed."""

from __future__ import annotations

import asyncio
import time

import pytest

from avatarserve.serve.config import AppConfig
from avatarserve.serve.control.admission import Admission, AdmissionRefused, replica_capacity
from avatarserve.serve.control.registry import ReplicaInfo, ReplicaRegistry

from tests.conftest import RedisServer

CAPACITY = 8
MAX_REPLICAS = 2
LIMIT = CAPACITY * MAX_REPLICAS


def app_config(redis_url: str, ns: str) -> AppConfig:
    return AppConfig.parse({
        "redis_url": redis_url, "namespace": ns, "registry_namespace": ns, "model": {"config": "tiny"},
        "capacity": {"audio": CAPACITY, "denoise": CAPACITY, "vae": CAPACITY},
        "autoscaling": {"enabled": True, "min_replicas": {"audio": 1, "denoise": 1, "vae": 1},
                        "max_replicas": {"audio": MAX_REPLICAS, "denoise": MAX_REPLICAS, "vae": MAX_REPLICAS}},
        # a refusal that is not the admission limit would park this long (the cluster "can grow")
        "timeouts": {"admission_wait_s": 60.0},
        "admission_poll_s": 0.05})


@pytest.fixture
async def setup(redis_server: RedisServer, redis_namespace: str):
    app = app_config(redis_server.url, redis_namespace)
    registry = ReplicaRegistry.from_url(redis_server.url, namespace=redis_namespace, ttl_s=60.0)
    yield app, registry, Admission(app)
    await registry.close()


async def register(registry: ReplicaRegistry, app: AppConfig, replicas: int, capacity: int,
                   live: dict | None = None) -> None:
    """`replicas` replicas of every stage; `live` replica id -> session ids live on it (heartbeat)."""
    for dep in app.stage_deployments:
        for r in range(replicas):
            rid = f"r{r}"
            ids = tuple((live or {}).get(rid, ()))
            await registry.heartbeat(ReplicaInfo(dep, rid, f"127.0.0.1:{6000 + r}", live_sessions=len(ids),
                                                 capacity=capacity, session_ids=ids))


async def test_the_limit_is_max_replicas_times_capacity(setup) -> None:
    app, _, admission = setup
    assert set(admission.limits.values()) == {LIMIT}
    assert set(admission.limits) == set(app.stage_deployments)


async def test_sessions_that_streamed_and_went_idle_still_count(setup) -> None:
    """One replica registered (the cluster could grow to two) that claims 32 free slots: 16 sessions are admitted,
    go live (their reservations become live sessions) and end their streams (counted nowhere per replica). The 17th
    is refused at once, not parked (more replicas would not help); closing one frees exactly one admission."""
    app, registry, admission = setup
    await register(registry, app, replicas=1, capacity=2 * LIMIT)
    sids = [f"s{i:02d}" for i in range(LIMIT)]
    routes = {sid: await admission.reserve_route(registry, sid) for sid in sids}
    await register(registry, app, replicas=1, capacity=2 * LIMIT, live={"r0": sids})  # streaming
    await register(registry, app, replicas=1, capacity=2 * LIMIT)  # streams ended: IDLE sessions
    for dep in app.stage_deployments:
        assert (await registry.replicas(dep))[0].live_sessions == 0  # the replicas see free slots...
        assert await registry.admitted(dep) == LIMIT  # ...the admission limit does not

    started = time.monotonic()
    with pytest.raises(AdmissionRefused) as refused:
        await admission.reserve_route(registry, "s-extra")
    assert time.monotonic() - started < 10.0  # refused at once, not after admission_wait_s (60 s)
    assert f"maximum of {LIMIT} sessions" in str(refused.value) and refused.value.retry_after_ms == app.retry_after_ms
    assert admission.waiting == 0

    await registry.release(sids[0], routes[sids[0]])  # CloseSession / idle timeout
    await admission.reserve_route(registry, "s-extra")
    with pytest.raises(AdmissionRefused):
        await admission.reserve_route(registry, "s-extra-2")


async def test_concurrent_creates_never_exceed_the_limit(setup) -> None:
    """24 CreateSession at once on two full-size replicas of capacity 8: exactly 16 are admitted."""
    app, registry, admission = setup
    await register(registry, app, replicas=MAX_REPLICAS, capacity=CAPACITY)

    async def create(i: int) -> bool:
        try:
            await admission.reserve_route(registry, f"c{i:02d}")
            return True
        except AdmissionRefused:
            return False

    admitted = await asyncio.wait_for(asyncio.gather(*(create(i) for i in range(24))), 60)
    assert sum(admitted) == LIMIT
    for dep in app.stage_deployments:
        assert await registry.admitted(dep) == LIMIT


async def test_touch_keeps_an_admission_and_expiry_drops_it(setup) -> None:
    """An admission lives as long as its session: `touch_admission` restarts its expiry; one nobody touches (a
    gateway that died) expires and frees its place."""
    app, registry, admission = setup
    await register(registry, app, replicas=MAX_REPLICAS, capacity=CAPACITY)
    await registry.reserve_route(app.stage_deployments, "short", limits=admission.limits, admitted_ttl_s=0.3)
    assert await registry.touch_admission("short", app.stage_deployments, 600.0) == len(app.stage_deployments)
    await registry.reserve_route(app.stage_deployments, "expiring", limits=admission.limits, admitted_ttl_s=0.2)
    dep = app.stage_deployments[0]
    assert await registry.admitted(dep) == 2
    deadline = time.monotonic() + 30
    while await registry.admitted(dep) != 1:  # "expiring" lapses on the Redis clock; "short" was touched
        assert time.monotonic() < deadline, "an untouched admission never expired"
        await asyncio.sleep(0.05)


def test_a_replica_takes_its_measured_real_time_sessions_within_one_and_the_configured_capacity() -> None:
    assert replica_capacity(8, None, "measured") == 8  # nothing measured yet
    assert replica_capacity(8, 3, "measured") == 3
    assert replica_capacity(8, 0, "measured") == 1  # slower than real time even alone: still serves one
    assert replica_capacity(8, 4096, "measured") == 8  # the configured number is the upper bound
    assert replica_capacity(8, 3, "configured") == 8
