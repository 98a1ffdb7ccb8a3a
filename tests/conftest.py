"""Shared fixtures for serve-layer tests.

- `redis_server` (session): a real `redis-server` on a free loopback port, no persistence.
- `redis_namespace` (function): a unique key prefix; its keys are deleted after the test.
- `ray_cluster` (session): one local Ray cluster per test session, its head started as
  `avatarserve up` starts one (auth disabled on purpose, dashboard off, dynamic ports, metrics
  exported on `metrics_export_port` every second); stopped at the end.
- `serve_instance` (session): Ray Serve started on `ray_cluster` with one HTTP proxy on a free
  loopback port and no gRPC proxy (extend `SERVE_GRPC_SERVICER_FUNCTIONS` to get one).
- `synthetic_chain` (function): async factory of in-process StageHosts running SyntheticStage.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator, Optional, Sequence

import pytest

from avatarserve.serve.dataplane.stage_host import StageHost, StageHostConfig
from tests.support.synthetic import SinkRole, SyntheticStage
from avatarserve.serve.dataplane.transport import TransportOptions
from avatarserve.serve.ops.launcher import free_port  # re-exported: the tests' ports come from the launcher's choice

# Servicer adders for the Serve gRPC proxy (module:function strings). One Serve instance per test session
# serves the public API, so it is registered from the start (gRPC options cannot change while Serve runs).
SERVE_GRPC_SERVICER_FUNCTIONS: list[str] = [
    "avatarserve.serve.api.grpc_service.add_AvatarServiceServicer_to_server",  # tolerant parsing (INVALID_ARGUMENT)
    "avatarserve.serve.api.grpc_service.add_HealthServicer_to_server",
]


# ------------------------------------------------------------------------------------ redis


@dataclass(frozen=True)
class RedisServer:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    import redis

    for _attempt in range(3):  # the free port can be taken between probe and bind
        port = free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        if proc.poll() is None:
            break
    else:
        pytest.fail(f"redis-server did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
    try:
        yield RedisServer("127.0.0.1", port)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
def redis_namespace(redis_server: RedisServer) -> Iterator[str]:
    import redis

    ns = f"test-{uuid.uuid4().hex[:8]}:"
    yield ns
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    keys = list(client.scan_iter(match=f"{ns}*"))
    if keys:
        client.delete(*keys)
    client.close()


# ------------------------------------------------------------------------------------ ray


@dataclass(frozen=True)
class RayCluster:
    address: str
    num_cpus: int
    metrics_export_port: int = 0  # Prometheus exposition of Ray's metrics agent: http://127.0.0.1:<port>/metrics


# Keep every Ray port of the test session's cluster on 127.0.0.1 (Ray otherwise advertises the host's routable
# address). Set when this conftest is imported: Ray reads it once, when `ray` is first imported (by collection).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """The head is started as `avatarserve up` starts it (`ray start --block` in a process session of its own, started
    again when Ray gives up on its raylet), not by `ray.init()` inside this many-threaded pytest process; the tests
    connect to it as a driver."""
    from avatarserve.serve.ops.launcher import _kill_group, connect_driver, start_ray_head

    # Token auth is on by default for local clusters since Ray 2.59; tests run a private,
    # loopback-only cluster, so disable it deliberately (inherited by every Ray process).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    num_cpus = 4  # logical CPUs: replicas ask for fractions
    metrics_port = free_port()
    # Replicas push their metrics to the node's agent every second (Ray's default is 10 s), so metric tests see
    # fresh values quickly.
    cluster = {"num_cpus": num_cpus, "dashboard": False, "object_store_memory": 150 * 1024 * 1024,
               "metrics_report_interval_ms": 1000}
    # Ray's socket paths must fit AF_UNIX's 107 bytes: a short directory of its own, not pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="avs-ray-", dir="/tmp"))
    pgid, address = start_ray_head({"cluster": cluster}, temp_dir, metrics_port)
    try:
        connect_driver(address, f"avatarserve-tests-{uuid.uuid4().hex[:6]}")
        try:
            yield RayCluster(address=address, num_cpus=num_cpus, metrics_export_port=metrics_port)
        finally:
            try:
                from ray import serve

                serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        _kill_group(pgid)
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class ServeInstance:
    grpc_address: str
    http_address: str


@pytest.fixture(scope="session")
def serve_instance(ray_cluster: RayCluster) -> Iterator[ServeInstance]:
    from avatarserve.serve.ray_compat import start_serve

    grpc_port, http_port = free_port(), free_port()
    grpc_options = {"port": grpc_port, "grpc_servicer_functions": SERVE_GRPC_SERVICER_FUNCTIONS}
    start_serve(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=grpc_options)
    yield ServeInstance(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}")  # ray_cluster's teardown shuts Serve down


# ------------------------------------------------------------------------------------ chains


@dataclass
class Chain:
    hosts: list[StageHost]
    handlers: list[SyntheticStage]

    @property
    def route(self) -> list[str]:
        return [h.address for h in self.hosts]

    def live_sessions(self) -> list[int]:
        return [h.live_sessions for h in self.hosts]

    async def wait_closed(self, session_id: Optional[str] = None, timeout_s: float = 5.0) -> None:
        """Wait until no hop (or no hop for `session_id`) holds session state."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            if session_id is None:
                held = [h.name for h in self.hosts if h.live_sessions] + [s.name for s in self.handlers if s.sessions or s.board.sessions()]
            else:
                held = [h.name for h in self.hosts if session_id in h.session_ids()] + [
                    s.name for s in self.handlers if session_id in s.sessions or session_id in s.board.sessions()
                ]
            if not held:
                return
            if asyncio.get_running_loop().time() > deadline:
                detail = {h.name: h.stats()["sessions"] for h in self.hosts if h.live_sessions}
                raise AssertionError(f"session state still held at {held}; hop sessions: {detail}")
            await asyncio.sleep(0.02)


ChainFactory = Callable[..., Awaitable[Chain]]


@pytest.fixture
async def synthetic_chain() -> AsyncIterator[ChainFactory]:
    started: list[StageHost] = []

    async def make(
        n: int = 5,
        hold_s: float = 0.0,
        *,
        queue_size: int = 2,
        roles: Optional[Sequence[SinkRole]] = None,
        drain_timeout_s: float = 10.0,
    ) -> Chain:
        hosts, handlers = [], []
        for i in range(n):
            handler = SyntheticStage(hold_s, name=f"stage{i}", sink_role=roles[i] if roles else "none", sink_timeout_s=10.0)
            cfg = StageHostConfig(name=f"stage{i}", drain_timeout_s=drain_timeout_s, transport=TransportOptions(queue_size=queue_size, open_timeout_s=5.0))
            host = StageHost(handler, cfg)
            await host.start()
            started.append(host)
            hosts.append(host)
            handlers.append(handler)
        return Chain(hosts, handlers)

    yield make
    for host in reversed(started):
        await host.stop(grace_s=0.5)
