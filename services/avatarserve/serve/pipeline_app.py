"""Ray Serve wiring of the TPP data plane: one deployment per stage, chained over our gRPC.

Each replica of a `StageReplica` deployment starts a `StageHost` on a dedicated data-plane thread, then builds its
handler from a plain config dict (the model load: no time limit; its phases are reported to Redis for `avatarserve
up`, serve/startup.py), registers `{deployment, replica_id, address,
live_sessions, capacity}` in Redis with a TTL heartbeat, and exposes `status()`. Serve handles are
only the control plane here (placement, health, status); blocks never go through them.

Autoscaling and scale-down: `record_autoscaling_stats` reports the sessions a replica holds (live +
reserved) for the application-level policy (serve/autoscale.py). Serve picks scale-down victims
without looking at load and drains only Serve requests, never our data-plane sessions; so when Serve
stops a replica (it calls the user class's `__del__` after its own drain, then kills the actor once
`graceful_shutdown_timeout_s` has passed), `__del__` first deregisters the replica (no new session is
placed on it), then waits up to `timeouts.session_drain_s` for its live sessions to end before stopping the
data plane. Deployments must set `graceful_shutdown_timeout_s >= session_drain_s + margin`
(`shutdown_budget_s`). Every timeout comes from the typed `TimeoutsConfig` (serve/config.py).

`build_pipeline_app(config)` returns one Serve application: a small `PipelineDirectory` ingress
bound to every stage deployment, so one `serve.run` deploys all stages in parallel.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from avatarserve.serve.autoscale import HELD_SESSIONS_METRIC, LIVE_SESSIONS_METRIC
from avatarserve.serve.config import ReplicaTimeouts, TimeoutsConfig
from avatarserve.serve.registry import ReplicaHeartbeat, ReplicaInfo, ReplicaRegistry
from avatarserve.serve.stage_host import BackgroundStageHost, StageHostConfig
from avatarserve.serve.synthetic import SyntheticStage
from avatarserve.serve.transport import StageError, StageHandler, TransportOptions

__all__ = [
    "HANDLER_FACTORIES",
    "PipelineAppConfig",
    "PipelineDirectory",
    "StageReplica",
    "StageSpec",
    "build_handler",
    "build_pipeline_app",
    "shutdown_budget_s",
]

log = logging.getLogger(__name__)

# Short names for handler factories; anything else is a "package.module:callable" path.
HANDLER_FACTORIES: dict[str, Callable[[Mapping[str, Any]], StageHandler]] = {
    "synthetic": SyntheticStage.from_config,
}


class PipelineConfigError(StageError, ValueError):
    """Invalid pipeline/stage configuration."""


# Serve's own drain loop runs before our __del__ (one `graceful_shutdown_wait_loop_s`, 2 s by default), and stopping
# the data plane after the drain takes a moment: the Serve budget must cover both around our drain.
SHUTDOWN_MARGIN_S = 10.0


def shutdown_budget_s(drain_timeout_s: float) -> float:
    """`graceful_shutdown_timeout_s` for a stage deployment whose replicas drain sessions for `drain_timeout_s`."""
    if drain_timeout_s < 0:
        raise PipelineConfigError(f"drain_timeout_s must be >= 0, got {drain_timeout_s}")
    return float(drain_timeout_s) + SHUTDOWN_MARGIN_S


@dataclass(frozen=True)
class StageSpec:
    deployment: str  # Serve deployment name, also the registry key (e.g. "DenoiseStage0")
    handler: str = "synthetic"  # HANDLER_FACTORIES key or "package.module:callable"
    handler_config: Mapping[str, Any] = field(default_factory=dict)  # passed to the factory
    num_replicas: int = 1
    num_cpus: float = 0.05
    num_gpus: float = 0.0
    capacity: int = 16  # sessions per replica
    queue_size: int = 2

    def __post_init__(self) -> None:
        if not self.deployment or ":" in self.deployment or "#" in self.deployment:
            raise PipelineConfigError(f"deployment name {self.deployment!r} must be non-empty without ':' or '#'")
        if self.num_replicas < 1:
            raise PipelineConfigError(f"{self.deployment}: num_replicas must be >= 1, got {self.num_replicas}")
        if self.capacity < 1:
            raise PipelineConfigError(f"{self.deployment}: capacity must be >= 1, got {self.capacity}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise PipelineConfigError(f"{self.deployment}: num_cpus/num_gpus must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["handler_config"] = dict(self.handler_config)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageSpec":
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise PipelineConfigError(f"unknown stage spec keys {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class PipelineAppConfig:
    stages: Sequence[StageSpec]
    redis_url: str
    namespace: str = ""  # registry key prefix
    bind_host: str = "127.0.0.1"  # data-plane bind address in each replica
    advertise_host: Optional[str] = None  # default: bind_host, or the Ray node IP for 0.0.0.0
    name: str = "tpp"
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)

    def __post_init__(self) -> None:
        if not self.stages:
            raise PipelineConfigError("a pipeline needs at least one stage")
        names = [s.deployment for s in self.stages]
        if len(set(names)) != len(names):
            raise PipelineConfigError(f"duplicate stage deployment names in {names}")
        self.timeouts.check_deployments(names)

    @property
    def deployments(self) -> list[str]:
        return [s.deployment for s in self.stages]

    def common(self) -> dict[str, Any]:
        """What every stage replica of this pipeline is built with (JSON-serializable: it travels in Serve args)."""
        return {
            "redis_url": self.redis_url,
            "namespace": self.namespace,
            "bind_host": self.bind_host,
            "advertise_host": self.advertise_host,
            "timeouts": self.timeouts.model_dump(),
        }


def resolve_handler_factory(spec: StageSpec) -> Callable[[Mapping[str, Any]], StageHandler]:
    """The factory named by `spec.handler` (a registered short name or "module:callable"); imports its module."""
    factory = HANDLER_FACTORIES.get(spec.handler)
    if factory is not None:
        return factory
    module_name, sep, attr = spec.handler.partition(":")
    if not sep or not module_name or not attr:
        raise PipelineConfigError(f"handler {spec.handler!r} is neither one of {sorted(HANDLER_FACTORIES)} nor 'module:callable'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PipelineConfigError(f"cannot import handler factory {spec.handler!r}: {exc}") from exc


def build_handler(spec: StageSpec, replica_name: str, factory: Optional[Callable[[Mapping[str, Any]], StageHandler]] = None) -> StageHandler:
    """Instantiate the stage handler named by `spec` (a registered short name or an import path)."""
    factory = factory or resolve_handler_factory(spec)
    config = dict(spec.handler_config)
    if spec.handler == "synthetic":
        config.setdefault("name", spec.deployment)
    handler = factory(config)
    if not isinstance(handler, StageHandler):
        raise PipelineConfigError(f"{spec.handler!r} built a {type(handler).__name__}, which is not a StageHandler")
    return handler


class _TimedHandler:
    """Wraps a stage handler to time each step and count blocks and failures (every other attribute is forwarded)."""

    def __init__(self, inner: StageHandler, metrics: Any) -> None:
        self._inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def open_session(self, session_id: str, config: bytes) -> None:
        await self._inner.open_session(session_id, config)

    async def process(self, session_id: str, item: Any) -> list:
        t0 = time.perf_counter()
        try:
            out = await self._inner.process(session_id, item)
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._metrics.inc("avatarserve_stage_errors")
            raise
        self._metrics.observe("avatarserve_stage_step_seconds", time.perf_counter() - t0)
        self._metrics.inc("avatarserve_stage_blocks")
        return out

    async def close_session(self, session_id: str) -> None:
        await self._inner.close_session(session_id)


class StageReplica:
    """Body of every stage deployment (wrapped by `serve.deployment` in `build_pipeline_app`)."""

    def __init__(self, spec: Mapping[str, Any], common: Mapping[str, Any]) -> None:
        from ray import serve

        from avatarserve.serve.metrics import StageMetrics
        from avatarserve.serve.ray_compat import replica_log_file
        from avatarserve.serve.startup import StartupReporter

        self.spec = StageSpec.from_dict(spec)
        self.timeouts: ReplicaTimeouts = TimeoutsConfig.parse(common.get("timeouts")).for_deployment(self.spec.deployment)
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_tag
        self.name = f"{self.spec.deployment}#{self.replica_id}"
        self.drain_timeout_s = self.timeouts.session_drain_s
        self.draining = False
        self.metrics = StageMetrics(self.spec.capacity)
        # Startup is observable (phases in Redis, shown by `avatarserve up`) and has no overall time limit: the
        # data-plane server must come up within stage_start_s, the model load takes what it takes.
        self._startup = StartupReporter(common["redis_url"], namespace=common.get("namespace", ""),
                                        deployment=self.spec.deployment, replica_id=self.replica_id,
                                        log_file=replica_log_file())
        self._startup.report("starting")
        bind_host = common["bind_host"]
        advertise = common.get("advertise_host")
        if not advertise and bind_host in ("0.0.0.0", "::", ""):
            import ray

            advertise = ray.util.get_node_ip_address()
        host_config = StageHostConfig(
            name=self.name,
            bind_host=bind_host,
            port=0,
            advertise_host=advertise,
            max_sessions=self.spec.capacity,
            drain_timeout_s=self.timeouts.hop_drain_s,
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
            self._bg.call(self._start_registry(common), timeout_s=self.timeouts.control_call_s)
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
        return _TimedHandler(build_handler(self.spec, self.name, factory), self.metrics)

    def _info(self) -> ReplicaInfo:
        host = self._bg.host
        return ReplicaInfo(
            deployment=self.spec.deployment,
            replica_id=self.replica_id,
            address=self.address,
            live_sessions=host.live_sessions,
            capacity=self.spec.capacity,
            session_ids=tuple(host.session_ids()),
        )

    async def _start_registry(self, common: Mapping[str, Any]) -> None:
        # Runs on the data-plane loop: the redis client, the heartbeat and the metrics task live there.
        t = self.timeouts
        reservation_ttl_s = TimeoutsConfig.parse(common.get("timeouts")).reservation_ttl_s
        self._registry = ReplicaRegistry.from_url(common["redis_url"], namespace=common.get("namespace", ""),
                                                  ttl_s=t.registry_ttl_s, reservation_ttl_s=reservation_ttl_s)
        self._heartbeat = ReplicaHeartbeat(self._registry, self._info, interval_s=t.heartbeat_s)
        await self._heartbeat.start()
        self._metrics_task = asyncio.get_running_loop().create_task(self._publish_metrics(t.heartbeat_s),
                                                                    name="stage-metrics")

    async def _publish_metrics(self, interval_s: float) -> None:
        while True:
            try:
                self.metrics.snapshot(self._bg.host.stats(), self.reserved, self.draining)
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
                     reserved=self.reserved, draining=self.draining)
        return stats

    async def _stats(self) -> dict[str, Any]:
        return self._bg.host.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        # Sessions per replica is the scaling signal (read across threads: a len() of a dict). Held = live + admitted
        # sessions that reserved a slot here and have not opened their stream yet.
        live = float(self._bg.host.live_sessions)
        return {LIVE_SESSIONS_METRIC: live, HELD_SESSIONS_METRIC: live + float(self.reserved)}

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


def _describe_model(handler_config: Mapping[str, Any]) -> str:
    model = handler_config.get("model") or {}
    if not model:
        return ""
    where = model.get("checkpoint") or "embedded weights"
    return f"{model.get('config', '?')} from {where} on {model.get('device', 'cpu')}"


class PipelineDirectory:
    """Ingress of the pipeline app: knows every stage deployment, aggregates their status."""

    def __init__(self, deployments: Sequence[str], *stage_handles: Any) -> None:
        self.deployments = list(deployments)
        self._handles = dict(zip(self.deployments, stage_handles))

    async def status(self) -> dict[str, Any]:
        """Status of one replica per stage deployment (all of them when each has one replica)."""
        names = list(self._handles)
        results = await asyncio.gather(*(self._handles[n].status.remote() for n in names))
        return dict(zip(names, results))


def build_pipeline_app(config: PipelineAppConfig) -> Any:
    """One Serve application holding every stage deployment plus the directory ingress."""
    from ray import serve

    common = config.common()
    bound = []
    for spec in config.stages:
        dep = serve.deployment(StageReplica).options(
            name=spec.deployment,
            num_replicas=spec.num_replicas,
            ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
            # Long-lived sessions must drain before a replica goes away (see StageReplica.drain).
            graceful_shutdown_timeout_s=shutdown_budget_s(config.timeouts.for_deployment(spec.deployment).session_drain_s),
        )
        bound.append(dep.bind(spec.to_dict(), common))
    directory = serve.deployment(PipelineDirectory).options(name=f"{config.name}-directory", num_replicas=1, ray_actor_options={"num_cpus": 0.01})
    return directory.bind(config.deployments, *bound)
