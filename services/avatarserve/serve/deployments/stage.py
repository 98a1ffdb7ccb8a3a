"""The stage deployments: one Serve deployment per pipeline stage, chained over our own gRPC data plane.

Each replica of a `StageReplica` deployment starts a `StageHost` on a dedicated data-plane thread, then builds its
handler (dataplane/stages.py; the model load: no time limit; its phases are reported to Redis for `avatarserve up`,
control/startup.py), registers `{deployment, replica_id, address, live_sessions, capacity}` in Redis with a TTL
heartbeat, and exposes `status()`. Serve handles are only the control plane here (placement, health, status); blocks
never go through them.

Autoscaling and scale-down: `record_autoscaling_stats` reports the sessions a replica holds (live + reserved) for the
application-level policy (control/autoscale.py). Serve picks scale-down victims without looking at load and drains
only Serve requests, never our data-plane sessions; so when Serve stops a replica (it calls the user class's
`__del__` after its own drain, then kills the actor once `graceful_shutdown_timeout_s` has passed), `__del__` first
deregisters the replica (no new session is placed on it), then waits up to `timeouts.session_drain_s` for its live
sessions to end before stopping the data plane. Deployments must set `graceful_shutdown_timeout_s >=
session_drain_s + margin` (`shutdown_budget_s`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Mapping, Optional

from avatarserve.serve.config import AppConfig, ReplicaTimeouts
from avatarserve.serve.control.admission import replica_capacity
from avatarserve.serve.control.autoscale import CAPACITY_METRIC, HELD_SESSIONS_METRIC, LIVE_SESSIONS_METRIC
from avatarserve.serve.control.registry import ReplicaHeartbeat, ReplicaInfo, ReplicaRegistry
from avatarserve.serve.dataplane.stage_host import BackgroundStageHost, StageHostConfig
from avatarserve.serve.dataplane.stages import StageConfigError, StageSpec, TimedHandler, build_handler, resolve_handler_factory
from avatarserve.serve.dataplane.transport import StageHandler, TransportOptions

__all__ = ["StageReplica", "VaeDecoderReplica", "shutdown_budget_s"]

log = logging.getLogger(__name__)

# Serve's own drain loop runs before our __del__ (one `graceful_shutdown_wait_loop_s`, 2 s by default), and stopping
# the data plane after the drain takes a moment: the Serve budget must cover both around our drain.
SHUTDOWN_MARGIN_S = 10.0


def shutdown_budget_s(drain_timeout_s: float) -> float:
    """`graceful_shutdown_timeout_s` for a stage deployment whose replicas drain sessions for `drain_timeout_s`."""
    if drain_timeout_s < 0:
        raise StageConfigError(f"drain_timeout_s must be >= 0, got {drain_timeout_s}")
    return float(drain_timeout_s) + SHUTDOWN_MARGIN_S


class StageReplica:
    """Body of every stage deployment (wrapped by `serve.deployment` in serve/builder.py)."""

    def __init__(self, spec: Mapping[str, Any], app: AppConfig) -> None:
        from ray import serve

        from avatarserve.serve.ops.metrics import StageMetrics
        from avatarserve.serve.ray_compat import replica_log_file
        from avatarserve.serve.control.startup import StartupReporter

        self.spec = StageSpec.from_dict(spec)
        self.app = AppConfig.parse(app)
        self.timeouts: ReplicaTimeouts = self.app.timeouts.for_deployment(self.spec.deployment)
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_tag
        self.name = f"{self.spec.deployment}#{self.replica_id}"
        self.drain_timeout_s = self.timeouts.session_drain_s
        self.draining = False
        self.metrics = StageMetrics(self.spec.capacity)
        # Startup is observable (phases in Redis, shown by `avatarserve up`) and has no overall time limit: the
        # data-plane server must come up within stage_start_s, the model load takes what it takes.
        self._startup = StartupReporter(self.app.require_redis(), namespace=self.app.registry_prefix,
                                        deployment=self.spec.deployment, replica_id=self.replica_id,
                                        log_file=replica_log_file())
        self._startup.report("starting")
        # The node's IP as Ray sees it (--node-ip-address; the pod IP on Kubernetes): reachable from other nodes.
        bind_host, advertise = self.app.data_plane.addresses(_node_ip())
        host_config = StageHostConfig(
            name=self.name,
            bind_host=bind_host,
            port=0,
            advertise_host=advertise,
            port_range=self.app.data_plane.port_range,
            max_sessions=self.spec.capacity,
            drain_timeout_s=self.timeouts.hop_drain_s,
            resume_hold_s=self.app.recovery.hold_s if self.app.recovery.enabled else 0.0,
            # a reopened pipe replays up to replay_blocks before the first undelivered block plus those in flight
            memo_blocks=self.app.recovery.replay_blocks.most() + self.app.in_flight_limit + 2
            if self.app.recovery.enabled else 0,
            transport=TransportOptions(queue_size=self.spec.queue_size, open_timeout_s=self.timeouts.pipe_open_s),
        )
        self._bg = BackgroundStageHost(self._build_handler, host_config)
        self._heartbeat: Optional[ReplicaHeartbeat] = None
        self._registry: Optional[ReplicaRegistry] = None
        self._metrics_task: Optional[asyncio.Task[None]] = None
        try:
            self.address = self._bg.start_server(self.timeouts.stage_start_s)
            self._startup.report("serving", self.address)
            self._bg.load_handler(self.timeouts.control_call_s)
            self._startup.report("registering")
            self._bg.call(self._start_registry(), timeout_s=self.timeouts.control_call_s)
        except BaseException as exc:
            self._startup.report("failed", error=f"{type(exc).__name__}: {exc}")
            self._startup.close()
            self._bg.stop()
            raise
        self._startup.report("ready", self.address)
        self._startup.close()
        log.info("%s: data plane on %s, registered as %s/%s", self.name, self.address, self.spec.deployment, self.replica_id)

    def _build_handler(self) -> StageHandler:
        self._startup.report("importing", self.spec.handler)
        factory = resolve_handler_factory(self.spec)
        self._startup.report("loading", _describe_model(self.spec.handler_config))
        handler = build_handler(self.spec, factory)
        measure = getattr(handler, "measure_costs", None)
        if measure is not None and self.app.scheduling.admit_by == "measured":
            # Admission uses the measured capacity: know it before the first session (a burst at start-up would
            # otherwise be admitted up to the configured capacity).
            self._startup.report("measuring")
            try:
                measure()
            except Exception as exc:  # noqa: BLE001 - live blocks measure it instead; never a reason not to serve
                log.warning("%s: timing the stage on synthetic sessions failed (%s: %s); its capacity is the "
                            "configured one until its first blocks", self.name, type(exc).__name__, exc)
        return TimedHandler(handler, self.metrics)

    def _info(self) -> ReplicaInfo:
        host = self._bg.host
        return ReplicaInfo(
            deployment=self.spec.deployment,
            replica_id=self.replica_id,
            address=self.address,
            live_sessions=host.live_sessions,
            capacity=self.capacity(),
            session_ids=tuple(host.session_ids()),
        )

    def measured_capacity(self) -> Optional[int]:
        """Real-time sessions by this replica's measured step cost (None before its first block, or for a handler
        without a scheduler)."""
        return getattr(self._bg.host.handler, "realtime_capacity", lambda: None)()

    def capacity(self) -> int:
        """Sessions this replica takes now (registry slots, the autoscaling policy's capacity)."""
        return replica_capacity(self.spec.capacity, self.measured_capacity(), self.app.scheduling.admit_by)

    async def _start_registry(self) -> None:
        # Runs on the data-plane loop: the redis client, the heartbeat and the metrics task live there.
        t = self.timeouts
        self._registry = ReplicaRegistry.from_url(self.app.require_redis(), namespace=self.app.registry_prefix,
                                                  ttl_s=t.registry_ttl_s, reservation_ttl_s=self.app.timeouts.reservation_ttl_s,
                                                  redis_options=self.app.timeouts.redis)
        self._heartbeat = ReplicaHeartbeat(self._registry, self._info, interval_s=t.heartbeat_s)
        await self._heartbeat.start()
        self._metrics_task = asyncio.get_running_loop().create_task(self._publish_metrics(t.heartbeat_s),
                                                                    name="stage-metrics")

    async def _publish_metrics(self, interval_s: float) -> None:
        while True:
            try:
                self.metrics.capacity = self.capacity()
                self.metrics.snapshot(self._bg.host.stats(), self.reserved, self.draining)
                measured = self.measured_capacity()
                if measured is not None:
                    self.metrics.set("avatarserve_replica_realtime_capacity_sessions", measured)
            except Exception as exc:  # noqa: BLE001 - metrics must never take the data plane down
                log.warning("%s: metrics snapshot failed: %s", self.name, exc)
            await asyncio.sleep(interval_s)

    async def _stop_registry(self) -> None:
        if self._heartbeat is not None:
            await self._heartbeat.stop(deregister=True)
        if self._registry is not None:
            await self._registry.close()

    async def _stop_metrics(self) -> None:
        task, self._metrics_task = self._metrics_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @property
    def reserved(self) -> int:
        return self._heartbeat.reserved if self._heartbeat is not None and not self.draining else 0

    async def status(self) -> dict[str, Any]:
        stats = await asyncio.wrap_future(self._bg.submit(self._stats()))
        stats.update(deployment=self.spec.deployment, replica_id=self.replica_id, heartbeats=self._heartbeat.beats if self._heartbeat else 0,
                     reserved=self.reserved, draining=self.draining, measured_capacity=self.measured_capacity(),
                     capacity=self.capacity())
        scheduler = getattr(self._bg.host.handler, "scheduler", None)
        if scheduler is not None:
            stats["scheduler"] = scheduler.snapshot()
        return stats

    async def _stats(self) -> dict[str, Any]:
        return self._bg.host.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        # Sessions per replica is the scaling signal (read across threads: a len() of a dict). Held = live + admitted
        # sessions that reserved a slot here and have not opened their stream yet.
        live = float(self._bg.host.live_sessions)
        return {LIVE_SESSIONS_METRIC: live, HELD_SESSIONS_METRIC: live + float(self.reserved),
                CAPACITY_METRIC: float(self.capacity())}

    def check_health(self) -> None:
        if not self._bg.alive:
            raise RuntimeError(f"{self.name}: data-plane thread is not running")

    def drain(self, timeout_s: float) -> int:
        """Deregister (no new sessions), then wait up to `timeout_s` for live sessions to end. Returns how many were
        still live at the deadline. Blocking: Serve runs it from `__del__` on the replica's user-code thread."""
        bg = self._bg
        self.draining = True
        try:
            bg.call(self._stop_registry(), timeout_s=self.timeouts.control_call_s)
        except Exception as exc:  # the TTL removes the record anyway
            log.warning("%s: deregistration failed: %s", self.name, exc)
        deadline = time.monotonic() + timeout_s
        live = bg.host.live_sessions
        if live:
            log.info("%s: draining %d live session(s) for up to %.0f s", self.name, live, timeout_s)
        while live and time.monotonic() < deadline:
            time.sleep(0.2)
            live = bg.host.live_sessions
        if live:
            log.warning("%s: %d session(s) still live after the %.0f s drain budget; they are cut: %s", self.name, live,
                        timeout_s, bg.host.session_ids())
            self.metrics.inc("avatarserve_replica_sessions_cut", live)
        return live

    def __del__(self) -> None:
        bg = getattr(self, "_bg", None)
        if bg is None or not bg.alive:
            return
        try:
            self.drain(getattr(self, "drain_timeout_s", 0.0))
            bg.call(self._stop_metrics(), timeout_s=self.timeouts.control_call_s)
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("%s: drain failed: %s", getattr(self, "name", "?"), exc)
        bg.stop()


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()  # in a worker: its raylet's --node-ip-address


def _describe_model(handler_config: Mapping[str, Any]) -> str:
    model = handler_config.get("model") or {}
    if not model:
        return ""
    where = model.get("checkpoint") or "embedded weights"
    return f"{model.get('config', '?')} from {where} on {model.get('device', 'cpu')}"


class VaeDecoderReplica(StageReplica):
    """A stage replica that also prepares sessions (reference image + prompt -> sink) for the gateway."""

    async def prepare_session(self, image: bytes, prompt: str, seed: int) -> bytes:
        handler = self._bg.host.handler
        return await asyncio.wrap_future(self._bg.submit(handler.prepare_async(image, prompt, seed)))
