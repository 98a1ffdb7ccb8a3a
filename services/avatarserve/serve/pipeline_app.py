"""Ray Serve wiring of the TPP data plane: one deployment per stage, chained over our gRPC.

Each replica of a `StageReplica` deployment builds its handler from a plain config dict, starts a
`StageHost` on a dedicated data-plane thread, registers `{deployment, replica_id, address,
live_sessions, capacity}` in Redis with a TTL heartbeat, and exposes `status()`. Serve handles are
only the control plane here (placement, health, status); blocks never go through them.

`build_pipeline_app(config)` returns one Serve application: a small `PipelineDirectory` ingress
bound to every stage deployment, so one `serve.run` deploys all stages in parallel.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

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
]

log = logging.getLogger(__name__)

# Short names for handler factories; anything else is a "package.module:callable" path.
HANDLER_FACTORIES: dict[str, Callable[[Mapping[str, Any]], StageHandler]] = {
    "synthetic": SyntheticStage.from_config,
}


class PipelineConfigError(StageError, ValueError):
    """Invalid pipeline/stage configuration."""


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
    heartbeat_s: float = 1.0
    ttl_s: float = 5.0
    name: str = "tpp"

    def __post_init__(self) -> None:
        if not self.stages:
            raise PipelineConfigError("a pipeline needs at least one stage")
        names = [s.deployment for s in self.stages]
        if len(set(names)) != len(names):
            raise PipelineConfigError(f"duplicate stage deployment names in {names}")
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise PipelineConfigError(f"heartbeat_s ({self.heartbeat_s}) must be > 0 and below ttl_s ({self.ttl_s})")

    @property
    def deployments(self) -> list[str]:
        return [s.deployment for s in self.stages]

    def common(self) -> dict[str, Any]:
        return {
            "redis_url": self.redis_url,
            "namespace": self.namespace,
            "bind_host": self.bind_host,
            "advertise_host": self.advertise_host,
            "heartbeat_s": self.heartbeat_s,
            "ttl_s": self.ttl_s,
        }


def build_handler(spec: StageSpec, replica_name: str) -> StageHandler:
    """Instantiate the stage handler named by `spec` (a registered short name or an import path)."""
    factory = HANDLER_FACTORIES.get(spec.handler)
    if factory is None:
        module_name, sep, attr = spec.handler.partition(":")
        if not sep or not module_name or not attr:
            raise PipelineConfigError(f"handler {spec.handler!r} is neither one of {sorted(HANDLER_FACTORIES)} nor 'module:callable'")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise PipelineConfigError(f"cannot import handler factory {spec.handler!r}: {exc}") from exc
    config = dict(spec.handler_config)
    if spec.handler == "synthetic":
        config.setdefault("name", spec.deployment)
    handler = factory(config)
    if not isinstance(handler, StageHandler):
        raise PipelineConfigError(f"{spec.handler!r} built a {type(handler).__name__}, which is not a StageHandler")
    return handler


class StageReplica:
    """Body of every stage deployment (wrapped by `serve.deployment` in `build_pipeline_app`)."""

    def __init__(self, spec: Mapping[str, Any], common: Mapping[str, Any]) -> None:
        from ray import serve

        self.spec = StageSpec.from_dict(spec)
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_tag
        self.name = f"{self.spec.deployment}#{self.replica_id}"
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
            transport=TransportOptions(queue_size=self.spec.queue_size),
        )
        self._bg = BackgroundStageHost(lambda: build_handler(self.spec, self.name), host_config)
        self.address = self._bg.start()
        self._heartbeat: Optional[ReplicaHeartbeat] = None
        self._registry: Optional[ReplicaRegistry] = None
        try:
            self._bg.call(self._start_registry(common), timeout_s=30)
        except BaseException:
            self._bg.stop()
            raise
        log.info("%s: data plane on %s, registered as %s/%s", self.name, self.address, self.spec.deployment, self.replica_id)

    def _info(self) -> ReplicaInfo:
        return ReplicaInfo(
            deployment=self.spec.deployment,
            replica_id=self.replica_id,
            address=self.address,
            live_sessions=self._bg.host.live_sessions,
            capacity=self.spec.capacity,
        )

    async def _start_registry(self, common: Mapping[str, Any]) -> None:
        # Runs on the data-plane loop: the redis client and heartbeat task live there.
        self._registry = ReplicaRegistry.from_url(common["redis_url"], namespace=common.get("namespace", ""), ttl_s=common["ttl_s"])
        self._heartbeat = ReplicaHeartbeat(self._registry, self._info, interval_s=common["heartbeat_s"])
        await self._heartbeat.start()

    async def _stop_registry(self) -> None:
        if self._heartbeat is not None:
            await self._heartbeat.stop(deregister=True)
        if self._registry is not None:
            await self._registry.close()

    async def status(self) -> dict[str, Any]:
        stats = await asyncio.wrap_future(self._bg.submit(self._stats()))
        stats.update(deployment=self.spec.deployment, replica_id=self.replica_id, heartbeats=self._heartbeat.beats if self._heartbeat else 0)
        return stats

    async def _stats(self) -> dict[str, Any]:
        return self._bg.host.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        # Sessions per replica is the scaling signal (read across threads: a len() of a dict).
        return {"live_sessions": float(self._bg.host.live_sessions)}

    def check_health(self) -> None:
        if not self._bg.alive:
            raise RuntimeError(f"{self.name}: data-plane thread is not running")

    def __del__(self) -> None:
        bg = getattr(self, "_bg", None)
        if bg is None or not bg.alive:
            return
        try:
            bg.call(self._stop_registry(), timeout_s=5)
        except Exception as exc:  # shutting down anyway; the TTL removes the record
            log.warning("%s: deregistration failed: %s", getattr(self, "name", "?"), exc)
        bg.stop()


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
            # Long-lived sessions must drain before a replica goes away.
            graceful_shutdown_timeout_s=30,
        )
        bound.append(dep.bind(spec.to_dict(), common))
    directory = serve.deployment(PipelineDirectory).options(name=f"{config.name}-directory", num_replicas=1, ray_actor_options={"num_cpus": 0.01})
    return directory.bind(config.deployments, *bound)
