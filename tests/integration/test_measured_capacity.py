"""Admission by measured capacity (`scheduling.admit_by: measured`) on a real cluster: a stage replica times itself
on synthetic sessions while it starts and registers the real-time sessions its measured step cost allows, before any
session exists; CreateSession beyond them is refused with RESOURCE_EXHAUSTED and a retry hint (autoscaling is off
here, so waiting cannot help), while an admitted session streams. Closing sessions frees their slots.

The app lets a stage compute for 0.1% of a block's duration (`scheduling.utilization`), so a replica of the tiny
model measures a real-time capacity below its configured 4 on any machine (the assertions use what each replica
reports, not a fixed number)."""

from __future__ import annotations

import asyncio
import time
from typing import Dict

import numpy as np
import pytest

from avatarserve_client import AvatarClient, CapacityExhausted, chunk_pcm

from .conftest import png

pytestmark = pytest.mark.integration

APP = "avatarmeasured"
CONFIGURED = 4
HEARTBEAT_S = 0.5
REGISTRY_WAIT_S = 120.0  # a heartbeat every 0.5 s; a busy machine delays it, a broken one never gets there


@pytest.fixture(scope="module")
def measured_app(serve_instance, redis_server):
    from ray import serve

    from avatarserve.serve.builder import deploy

    cfg = {"name": APP, "route_prefix": "/avatarmeasured", "redis_url": redis_server.url, "namespace": "measured:",
           "registry_namespace": "measured:", "auth": {"mode": "disabled"},
           "model": {"config": "tiny", "seed": 0, "stream_overrides": {"num_steps": 1}},
           "capacity": {"audio": CONFIGURED, "denoise": CONFIGURED, "vae": CONFIGURED},
           "scheduling": {"admit_by": "measured", "utilization": 0.001},
           "autoscaling": {"enabled": False}, "retry_after_ms": 700,
           "timeouts": {"heartbeat_s": HEARTBEAT_S}, "ops": {"enabled": False}}
    deploy(cfg)
    yield {"grpc": serve_instance.grpc_address, "redis_url": redis_server.url,
           "stages": ["AudioEncoder", "DenoiseStage0", "VaeDecoder"]}
    serve.delete(APP)


def _status(deployment: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=APP).status.remote().result(timeout_s=60)


def _registered(redis_url: str, stages) -> Dict[str, int]:
    """Capacity each stage's (single) replica has registered."""
    from avatarserve.serve.control.registry import ReplicaRegistry

    async def read() -> Dict[str, int]:
        async with ReplicaRegistry.from_url(redis_url, namespace="measured:") as reg:
            return {dep: [r.capacity for r in await reg.replicas(dep)] for dep in stages}

    return {dep: caps[0] for dep, caps in asyncio.run(read()).items() if len(caps) == 1}


def _speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.4 * np.sin(2 * np.pi * 200 * t) * (np.sin(2 * np.pi * 3 * t) > 0) * 32767).astype(np.int16)


def test_admission_follows_the_measured_real_time_capacity(measured_app):
    stages = measured_app["stages"]
    # Each replica timed itself on synthetic sessions while it started: measured before any session exists.
    measured = {dep: _status(dep) for dep in stages}
    for dep, s in measured.items():
        assert s["measured_capacity"] is not None and s["scheduler"]["blocks_done"] == 0, (dep, s)
        assert s["capacity"] == max(1, min(CONFIGURED, s["measured_capacity"])), (dep, s)
    expected = {dep: s["capacity"] for dep, s in measured.items()}
    assert min(expected.values()) < CONFIGURED, measured  # 0.1% of a block is less than any forward

    deadline = time.monotonic() + REGISTRY_WAIT_S
    while _registered(measured_app["redis_url"], stages) != expected and time.monotonic() < deadline:
        time.sleep(HEARTBEAT_S / 2)
    assert _registered(measured_app["redis_url"], stages) == expected

    with AvatarClient(measured_app["grpc"], application=APP, timeout=300) as client:
        # Fill the smallest stage; one more session is refused at once with the retry hint.
        held = [client.session(png(40 + i), seed=10 + i) for i in range(min(expected.values()))]
        t0 = time.monotonic()
        with pytest.raises(CapacityExhausted) as refused:
            client.create_session(png(50), seed=50)
        refusal_s = time.monotonic() - t0
        assert refused.value.retry_after_s == pytest.approx(0.7)
        assert "capacity" in str(refused.value)
        print(f"\n[measured capacity] per stage {expected} (configured {CONFIGURED}); refused in {refusal_s:.3f} s")

        # An admitted session streams; live blocks refine the measurement (and the capacity stays measured).
        assert list(held[0].stream(chunk_pcm(_speech(2.0), chunk_ms=200), timeout=300))
        after = {dep: _status(dep) for dep in stages}
        for dep, s in after.items():
            assert s["scheduler"]["blocks_done"] > 0, (dep, s)
            assert s["capacity"] == max(1, min(CONFIGURED, s["measured_capacity"])), (dep, s)

        # Closing the sessions that hold the slots frees them: a new session is admitted and streams. A replica
        # reports a stream's end at its next heartbeat, so a create right after may still be refused: a client
        # retries after the hint, as this one does.
        for s in held:
            s.close()
        deadline = time.monotonic() + REGISTRY_WAIT_S
        while True:
            try:
                again = client.session(png(51), seed=51)
                break
            except CapacityExhausted as exc:
                if time.monotonic() > deadline:
                    raise
                time.sleep(exc.retry_after_s)
        assert list(again.stream(chunk_pcm(_speech(1.0), chunk_ms=200), timeout=300))
        again.close()
