"""Session-driven autoscaling on the local cluster: sessions 1 -> 3 -> 1, replicas follow the policy, and the
scale-down drains a live session on the replica Serve chose to stop without a single session error.

The app runs the tiny model with one denoising step (AudioEncoder, DenoiseStage0, VaeDecoder) and per-stage
capacities 2 / 1 / 4 sessions per replica, so the policy (no headroom, no hysteresis) wants
ceil(D / 2) audio, D denoise (max 3) and 1 VAE replica(s) for D sessions. It is deployed through the declarative path
(`app.deploy`), the only one on which Serve 2.60 attaches the application-level policy.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Dict, List, Optional

import pytest

from avatarserve_client import AvatarClient, EventKind, VideoBlock

from .conftest import png

pytestmark = pytest.mark.integration

APP = "avatarscale"
DEPS = ("AudioEncoder", "DenoiseStage0", "VaeDecoder")


@pytest.fixture(scope="module")
def scale_app(serve_instance, redis_server):
    from ray import serve

    from avatarserve.serve.builder import deploy

    cfg = {"name": APP, "route_prefix": "/avatarscale", "redis_url": redis_server.url, "namespace": "scale:",
           "registry_namespace": "scale:", "auth": {"mode": "disabled"},
           "model": {"config": "tiny", "seed": 0, "stream_overrides": {"num_steps": 1}},
           "capacity": {"audio": 2, "denoise": 1, "vae": 4},
           "scheduling": {"admit_by": "configured"},  # the sizes asserted below follow these capacities exactly
           "autoscaling": {"enabled": True, "min_replicas": {"audio": 1, "denoise": 1, "vae": 1},
                           "max_replicas": {"audio": 2, "denoise": 3, "vae": 1},
                           "headroom_fraction": 0.0, "headroom_sessions": 0, "hysteresis": 0.0,
                           "downscale_stable_s": 3.0, "metrics_interval_s": 0.5, "look_back_period_s": 2.0},
           "timeouts": {"admission_wait_s": 300.0, "session_drain_s": 300.0, "heartbeat_s": 0.5}, "ops": {"enabled": False}}
    deploy(cfg)
    yield {"grpc": serve_instance.grpc_address, "redis_url": redis_server.url}
    serve.delete(APP)


def _serve_counts() -> Dict[str, Dict[str, int]]:
    from ray import serve

    app = serve.status().applications[APP]
    return {d: {str(k).split(".")[-1]: int(v) for k, v in app.deployments[d].replica_states.items()} for d in DEPS}


def _registered(redis_url: str) -> Dict[str, Dict[str, int]]:
    """Live registry view: deployment -> {replica_id: slots in use}."""
    from avatarserve.serve.control.registry import ReplicaRegistry

    async def go():
        async with ReplicaRegistry.from_url(redis_url, namespace="scale:") as reg:
            return {d: {r.replica_id: r.live_sessions for r in await reg.replicas(d)} for d in DEPS}

    return asyncio.run(go())


# Hang guards only: on a busy machine replicas start and drain slowly, which is not a failure.
HANG_S = 600.0


def _wait(pred, timeout: float, what: str, poll: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last}")


class Streamer(threading.Thread):
    """One live session streaming idle video (no audio, fill-silence mode: one block per 0.48 s of wall clock)."""

    def __init__(self, client: AvatarClient, name: str) -> None:
        super().__init__(name=f"stream-{name}", daemon=True)
        self.client, self.label = client, name
        self.session = None
        self.created_at: Optional[float] = None
        self.blocks: List[VideoBlock] = []
        self.error: Optional[BaseException] = None
        self.ended_ok = False
        self.stop_requested = threading.Event()
        self.started_streaming = threading.Event()

    def run(self) -> None:
        try:
            self.session = self.client.session(png(100 + ord(self.label[0])), seed=1, idle_mode="fill_silence",
                                               fill_grace_ms=50)
            self.created_at = time.monotonic()
            ending = False
            with self.session as s:
                for item in s.stream(None, end_of_input=False, include_events=True, timeout=600):
                    if isinstance(item, VideoBlock):
                        self.blocks.append(item)
                        self.started_streaming.set()
                        if self.stop_requested.is_set() and not ending:
                            ending = True
                            s.end_of_input()
                    elif item.kind == EventKind.END_OF_STREAM:
                        self.ended_ok = True
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.started_streaming.set()

    def finish(self, timeout: float = 300) -> None:
        self.stop_requested.set()
        self.join(timeout)
        assert not self.is_alive(), f"session {self.label} did not end"


@pytest.mark.timeout(1800)  # hang guard; each wait inside has its own
def test_sessions_one_to_three_to_one(scale_app):
    counts = _serve_counts()
    assert {d: c.get("RUNNING", 0) for d, c in counts.items()} == dict.fromkeys(DEPS, 1), counts
    report: Dict[str, float] = {}
    with AvatarClient(scale_app["grpc"], application=APP, timeout=300) as client:
        a = Streamer(client, "a")
        a.start()
        assert a.started_streaming.wait(HANG_S) and a.error is None, a.error
        # Surge: two more sessions while every denoise slot is taken. CreateSession parks (the cluster can grow),
        # the policy counts the parked calls, Serve adds replicas, the calls complete.
        surge_at = time.monotonic()
        b, c = Streamer(client, "b"), Streamer(client, "c")
        b.start(), c.start()
        for s in (b, c):
            assert s.started_streaming.wait(HANG_S) and s.error is None, s.error
        report["surge_to_admitted_s"] = max(b.created_at, c.created_at) - surge_at
        report["surge_to_streaming_s"] = time.monotonic() - surge_at
        # The registry is refreshed by heartbeats: wait until it shows the grown cluster (late beats on a busy machine).
        want = {"AudioEncoder": 2, "DenoiseStage0": 3, "VaeDecoder": 1}
        def grown() -> Optional[Dict[str, Dict[str, int]]]:
            r = _registered(scale_app["redis_url"])
            ok = {d: len(x) for d, x in r.items()} == want and sorted(r["DenoiseStage0"].values()) == [1, 1, 1]
            return r if ok else None

        reg = _wait(grown, HANG_S, "the registry to show every new replica with its session")
        counts = _serve_counts()
        assert {d: len(r) for d, r in reg.items()} == want, reg
        assert sorted(reg["DenoiseStage0"].values()) == [1, 1, 1]  # one session per denoise replica
        assert counts["DenoiseStage0"].get("RUNNING") == 3 and counts["AudioEncoder"].get("RUNNING") == 2, counts

        # Back to one session, keeping the one placed last (c): Serve stops the newest replicas, so c's denoise
        # replica is among the victims and must drain c before it exits.
        c_replica = next(iter(_denoise_replica_of(scale_app["redis_url"], c.session.session_id)))
        a.finish(), b.finish()
        down_at = time.monotonic()
        _wait(lambda: c_replica not in _registered(scale_app["redis_url"])["DenoiseStage0"], HANG_S,
              "c's denoise replica to deregister (draining)")
        report["scale_down_decision_s"] = time.monotonic() - down_at
        assert _serve_counts()["DenoiseStage0"].get("STOPPING", 0) >= 1
        blocks_at_drain = len(c.blocks)
        # c keeps streaming from the draining replica: four more blocks arrive (however slow the machine is).
        _wait(lambda: len(c.blocks) >= blocks_at_drain + 4 or c.error is not None or not c.is_alive(), HANG_S,
              "c to keep streaming from its draining replica")
        assert c.is_alive() and c.error is None and len(c.blocks) >= blocks_at_drain + 4, (len(c.blocks), c.error)
        c.finish()
        _wait(lambda: all({k: v for k, v in n.items() if v} == {"RUNNING": 1} for n in _serve_counts().values()), HANG_S,
              "every deployment back to one running replica and none stopping")
        report["scale_down_total_s"] = time.monotonic() - down_at

    for s in (a, b, c):
        assert s.error is None, f"session {s.label}: {s.error!r}"
        assert s.ended_ok, f"session {s.label} did not end with END_OF_STREAM"
        assert [blk.block_index for blk in s.blocks] == list(range(len(s.blocks))), f"session {s.label} has gaps"
    assert {d: len(r) for d, r in _registered(scale_app["redis_url"]).items()} == dict.fromkeys(DEPS, 1)
    report["c_blocks"] = len(c.blocks)
    print("AUTOSCALE_REPORT", json.dumps({k: round(v, 2) for k, v in report.items()}))


def _denoise_replica_of(redis_url: str, session_id: str) -> set:
    from avatarserve.serve.control.registry import ReplicaRegistry

    async def go():
        async with ReplicaRegistry.from_url(redis_url, namespace="scale:") as reg:
            route = await reg.get_route(session_id)
            return {h.replica_id for h in route if h.deployment == "DenoiseStage0"}

    return asyncio.run(go())
