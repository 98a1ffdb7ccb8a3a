"""Stage specs and handler construction: what one stage of the pipeline runs, independent of Ray.

A `StageSpec` names a handler factory ("module:callable"); `build_handler` imports and calls it with the handler
config, and `TimedHandler` wraps the result to time each step for the stage metrics.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional

from avatarserve.serve.config import ray_actor_options
from avatarserve.serve.dataplane.transport import StageError, StageHandler

__all__ = ["StageConfigError", "StageSpec", "TimedHandler", "build_handler", "resolve_handler_factory"]


class StageConfigError(StageError, ValueError):
    """Invalid stage configuration."""


@dataclass(frozen=True)
class StageSpec:
    """One stage deployment of the pipeline: its handler and how many sessions a replica holds."""

    deployment: str  # Serve deployment name, also the registry key (e.g. "DenoiseStage0")
    handler: str  # "package.module:callable", called with `handler_config`, returns a StageHandler
    handler_config: Mapping[str, Any] = field(default_factory=dict)  # passed to the factory
    num_replicas: int = 1
    num_cpus: float = 0.05
    num_gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)  # Ray custom resources (placement)
    accelerator_type: Optional[str] = None
    capacity: int = 16  # sessions per replica
    queue_size: int = 2

    def __post_init__(self) -> None:
        if not self.deployment or ":" in self.deployment or "#" in self.deployment:
            raise StageConfigError(f"deployment name {self.deployment!r} must be non-empty without ':' or '#'")
        if self.num_replicas < 1:
            raise StageConfigError(f"{self.deployment}: num_replicas must be >= 1, got {self.num_replicas}")
        if self.capacity < 1:
            raise StageConfigError(f"{self.deployment}: capacity must be >= 1, got {self.capacity}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise StageConfigError(f"{self.deployment}: num_cpus/num_gpus must be >= 0")

    def actor_options(self) -> dict[str, Any]:
        """`ray_actor_options` of one replica of this stage."""
        return ray_actor_options(self.num_cpus, self.num_gpus, self.resources, self.accelerator_type)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["handler_config"] = dict(self.handler_config)
        d["resources"] = dict(self.resources)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageSpec":
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise StageConfigError(f"unknown stage spec keys {sorted(unknown)}")
        return cls(**d)


def resolve_handler_factory(spec: StageSpec) -> Callable[[Mapping[str, Any]], StageHandler]:
    """The factory named by `spec.handler` ("module:callable"); imports its module."""
    module_name, sep, attr = spec.handler.partition(":")
    if not sep or not module_name or not attr:
        raise StageConfigError(f"handler {spec.handler!r} is not 'module:callable'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise StageConfigError(f"cannot import handler factory {spec.handler!r}: {exc}") from exc


def build_handler(spec: StageSpec, factory: Optional[Callable[[Mapping[str, Any]], StageHandler]] = None) -> StageHandler:
    """Instantiate the stage handler named by `spec` ("module:callable", called with the handler config)."""
    factory = factory or resolve_handler_factory(spec)
    config = {"name": spec.deployment, **dict(spec.handler_config)}
    handler = factory(config)
    if not isinstance(handler, StageHandler):
        raise StageConfigError(f"{spec.handler!r} built a {type(handler).__name__}, which is not a StageHandler")
    return handler


class TimedHandler:
    """Wraps a stage handler to time each step and count blocks and failures (every other attribute is forwarded)."""

    def __init__(self, inner: StageHandler, metrics: Any) -> None:
        self._inner = inner
        self._metrics = metrics
        attach = getattr(inner, "attach_metrics", None)
        if callable(attach):  # the handler's own metrics (batch sizes, deadline slack)
            attach(metrics)

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
