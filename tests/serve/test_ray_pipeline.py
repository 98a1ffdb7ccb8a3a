"""The synthetic TPP chain deployed with Ray Serve on a real local Ray cluster (one test: Ray is slow)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from avatarserve.serve.config import TimeoutsConfig
from avatarserve.serve.dataplane.stages import StageSpec
from tests.support.pipeline_app import SYNTHETIC, PipelineAppConfig, build_pipeline_app
from avatarserve.serve.control.registry import ReplicaRegistry, RouteHop
from avatarserve.serve.dataplane.transport import BlockItem, PipelineClient, WireTensor

from tests.conftest import RedisServer

pytestmark = pytest.mark.integration

STAGES = ["AudioEncoder", "DenoiseStage0", "DenoiseStage1", "DenoiseStage2", "DenoiseStage3", "VaeDecoder"]


def test_synthetic_chain_streams_through_ray_serve(serve_instance, redis_server: RedisServer, redis_namespace: str) -> None:
    from ray import serve

    config = PipelineAppConfig(
        stages=[StageSpec(name, SYNTHETIC, handler_config={"hold_ms": 10}, num_cpus=0.05, capacity=4) for name in STAGES],
        redis_url=redis_server.url,
        namespace=redis_namespace,
        timeouts=TimeoutsConfig(heartbeat_s=0.5, registry_ttl_s=3.0),
        name="tpp-test",
    )
    handle = serve.run(build_pipeline_app(config), name="tpp-test", route_prefix=None)
    try:
        lat = WireTensor.from_numpy(np.arange(16 * 3 * 48 * 88, dtype=np.int16).reshape(16, 3, 48, 88))

        def status() -> dict:
            return handle.status.remote().result(timeout_s=30)

        async def scenario() -> tuple[list[BlockItem], dict, dict]:
            async with ReplicaRegistry.from_url(redis_server.url, namespace=redis_namespace, ttl_s=3.0) as reg:
                picks = [await reg.pick_least_loaded(name) for name in STAGES]
                route = [RouteHop(p.deployment, p.replica_id, p.address) for p in picks]
                await reg.record_route("ray-s1", route, ttl_s=60)
                async with PipelineClient() as client:
                    session = await client.open("ray-s1", [h.address for h in route])
                    items = []
                    for i in range(10):
                        await session.send(BlockItem(i, {"latent": lat}, pts_ms=480 * i))
                        if i >= 2:  # keep a few blocks in flight
                            items.append(await session.receive())
                    during = await asyncio.to_thread(status)
                    await session.end()
                    items += [it async for it in session]
                assert await reg.get_route("ray-s1") == route
                await reg.remove_route("ray-s1")
                assert await reg.get_route("ray-s1") is None
            for _ in range(100):  # the last hops free the session right after end-of-stream
                after = await asyncio.to_thread(status)
                if all(s["live_sessions"] == 0 for s in after.values()):
                    break
                await asyncio.sleep(0.05)
            return items, during, after

        items, during, after = asyncio.run(scenario())
        assert [it.block_index for it in items] == list(range(10))
        assert all(it.metadata["trace"] == ",".join(STAGES) for it in items)
        assert all(it.tensor("latent") == lat for it in items)
        assert [s.hop.split("#")[0] for s in items[0].stamps] == ["client", *STAGES]
        assert {name: s["live_sessions"] for name, s in during.items()} == dict.fromkeys(STAGES, 1)
        assert {name: (s["live_sessions"], s["sessions_closed"]) for name, s in after.items()} == dict.fromkeys(STAGES, (0, 1))
        assert all(s["heartbeats"] >= 1 for s in after.values()), after
        assert all(s["address"].startswith("127.0.0.1:") for s in after.values()), after
    finally:
        serve.delete("tpp-test")
