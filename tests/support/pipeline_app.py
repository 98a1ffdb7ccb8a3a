"""A pipeline of synthetic stages deployed with Ray Serve, for tests and bench/tpp.py (not the serving path).

`build_pipeline_app(config)` returns one Serve application: a small `PipelineDirectory` ingress bound to every stage
deployment, so one `serve.run` deploys all stages in parallel.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Sequence

from avatarserve.serve.config import AppConfig, DataPlaneSection, TimeoutsConfig
from avatarserve.serve.dataplane.stages import StageConfigError, StageSpec
from avatarserve.serve.deployments.stage import StageReplica, shutdown_budget_s

SYNTHETIC = "tests.support.synthetic:synthetic_stage"


@dataclass(frozen=True)
class PipelineAppConfig:
    stages: Sequence[StageSpec]
    redis_url: str
    namespace: str = ""  # registry key prefix
    data_plane: DataPlaneSection = field(default_factory=DataPlaneSection)  # bind/advertise/ports of each replica
    name: str = "tpp"
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)

    def __post_init__(self) -> None:
        if not self.stages:
            raise StageConfigError("a pipeline needs at least one stage")
        names = [s.deployment for s in self.stages]
        if len(set(names)) != len(names):
            raise StageConfigError(f"duplicate stage deployment names in {names}")

    @property
    def deployments(self) -> list[str]:
        return [s.deployment for s in self.stages]

    def app(self) -> AppConfig:
        """The application settings every stage replica of this pipeline is built with."""
        return AppConfig(redis_url=self.redis_url, registry_namespace=self.namespace, data_plane=self.data_plane,
                         timeouts=self.timeouts)


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

    app = config.app()
    bound = []
    for spec in config.stages:
        dep = serve.deployment(StageReplica).options(
            name=spec.deployment,
            num_replicas=spec.num_replicas,
            ray_actor_options=spec.actor_options(),
            # Long-lived sessions must drain before a replica goes away (see StageReplica.drain).
            graceful_shutdown_timeout_s=shutdown_budget_s(config.timeouts.session_drain_s),
        )
        bound.append(dep.bind(spec.to_dict(), app))
    directory = serve.deployment(PipelineDirectory).options(name=f"{config.name}-directory", num_replicas=1, ray_actor_options={"num_cpus": 0.01})
    return directory.bind(config.deployments, *bound)
