"""Typed, validated serving configuration: every timeout and lifetime of the serving layer in one place.

`TimeoutsConfig` is the `timeouts:` section of a deployment file's `app:` block (deploy/*.yaml) and of the Serve
application's args. Defaults are sized for the real model (Wan2.2-S2V-14B, weights read from a slow network disk,
nine replicas starting at once on a busy node), not for the CPU toy: a timeout that fires while a machine is merely
slow is a bug. Model loading has no limit at all: a replica that is loading weights is not failing (Serve shows it
STARTING and `avatarserve up` shows what it is doing); what does fail is reported as it happens.

Per-replica keys can be overridden for one deployment:

    timeouts:
      pipe_open_s: 120
      deployments:
        VaeDecoder: {pipe_open_s: 300}

Unknown keys and wrong types fail when the application is built, naming the key's path.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["ConfigError", "ReplicaTimeouts", "TimeoutsConfig", "format_validation_error"]


class ConfigError(ValueError):
    """Invalid serving configuration (the message names the key's path)."""


def format_validation_error(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors():
        path = ".".join([prefix, *(str(p) for p in err["loc"])]) if prefix else ".".join(str(p) for p in err["loc"])
        parts.append(f"{path}: {err['msg']}")
    return "; ".join(parts)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReplicaTimeouts(_Strict):
    """Timeouts one stage replica applies to itself (overridable per deployment)."""

    stage_start_s: float = Field(
        120.0, gt=0,
        description="A stage replica's data-plane gRPC server must be listening within this time after its thread "
                    "starts. Model loading is not included: it has no time limit.")
    pipe_open_s: float = Field(
        300.0, gt=0,
        description="Opening a session's pipe, per hop: the hop opens the session (reads its sink from Redis, "
                    "allocates KV caches, prefills the sink) and every hop after it answers.")
    hop_drain_s: float = Field(
        60.0, gt=0,
        description="After a hop fails, how long it lets blocks it already passed on finish downstream before it "
                    "reports the error upstream.")
    session_drain_s: float = Field(
        600.0, ge=0,
        description="On scale-down, how long a stopping stage replica waits for its live sessions to end; Serve's "
                    "graceful_shutdown_timeout_s is derived from it. A session longer than this is cut.")
    aas_wait_s: float = Field(
        300.0, gt=0,
        description="How long a denoise stage waits for the adaptive-sink latent from the last stage before it "
                    "fails the session (the last stage produces it after block 0 has passed every step).")
    control_call_s: float = Field(
        120.0, gt=0,
        description="Calls into a replica's data-plane thread that only talk to Redis or read counters "
                    "(registration, status, deregistration).")
    heartbeat_s: float = Field(1.0, gt=0, description="How often a stage replica refreshes its registry record.")
    registry_ttl_s: float = Field(
        10.0, gt=0,
        description="A replica whose heartbeat is older than this is gone for placement. Must exceed heartbeat_s; "
                    "size it for a busy node where a heartbeat can be late.")

    @model_validator(mode="after")
    def _heartbeat_below_ttl(self) -> "ReplicaTimeouts":
        if self.heartbeat_s >= self.registry_ttl_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be below registry_ttl_s ({self.registry_ttl_s})")
        return self


class _ReplicaOverrides(_Strict):
    """Optional per-deployment values of `ReplicaTimeouts` (unset: the application-wide value)."""

    stage_start_s: Optional[float] = Field(None, gt=0)
    pipe_open_s: Optional[float] = Field(None, gt=0)
    hop_drain_s: Optional[float] = Field(None, gt=0)
    session_drain_s: Optional[float] = Field(None, ge=0)
    aas_wait_s: Optional[float] = Field(None, gt=0)
    control_call_s: Optional[float] = Field(None, gt=0)
    heartbeat_s: Optional[float] = Field(None, gt=0)
    registry_ttl_s: Optional[float] = Field(None, gt=0)


class TimeoutsConfig(ReplicaTimeouts):
    """Every timeout and lifetime of the serving layer: replicas, gateway and launcher."""

    prepare_session_s: float = Field(
        600.0, gt=0,
        description="CreateSession's call to a VaeDecoder replica that turns the reference image and prompt into "
                    "the session's sink (text encoder + VAE encode), including waiting for a free replica.")
    admission_wait_s: float = Field(
        20.0, ge=0,
        description="While a full stage can still grow (autoscaling), how long CreateSession waits for a slot "
                    "before it fails with RESOURCE_EXHAUSTED.")
    reservation_ttl_s: float = Field(
        60.0, gt=0,
        description="How long an admitted session holds its slots on every stage before its stream opens.")
    session_ttl_s: float = Field(
        3600.0, gt=0,
        description="Lifetime of a session's Redis keys (session, sink, route, replay log) after its last stream "
                    "activity; refreshed while a stream is open, so a live stream never expires.")
    redis_start_s: float = Field(60.0, gt=0, description="`avatarserve up`: redis-server must accept connections "
                                                         "within this time (it fails at once if it exits).")
    ray_start_s: float = Field(600.0, gt=0, description="`avatarserve up`: the Ray head must listen within this time "
                                                        "(it fails at once if `ray start` exits).")
    deploy_s: Optional[float] = Field(
        None, gt=0,
        description="`avatarserve up`: optional overall limit on deploying the application. Unset (the default): "
                    "wait while replicas start and load; a replica that fails is reported at once.")
    health_s: float = Field(120.0, gt=0, description="`avatarserve up`: the public gRPC endpoint must answer SERVING "
                                                     "within this time once the application is RUNNING.")
    deployments: Dict[str, _ReplicaOverrides] = Field(
        default_factory=dict, description="Per-deployment overrides of the replica timeouts, by deployment name.")

    def for_deployment(self, name: str) -> ReplicaTimeouts:
        """The replica timeouts that apply to deployment `name`."""
        values = {k: getattr(self, k) for k in ReplicaTimeouts.model_fields}
        override = self.deployments.get(name)
        if override is not None:
            values.update(override.model_dump(exclude_none=True))
        try:
            return ReplicaTimeouts(**values)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, f"timeouts.deployments.{name}")) from exc

    def check_deployments(self, known: Any) -> None:
        unknown = sorted(set(self.deployments) - set(known))
        if unknown:
            raise ConfigError(f"timeouts.deployments: unknown deployment(s) {unknown}; deployments are {sorted(known)}")
        for name in self.deployments:
            self.for_deployment(name)

    @classmethod
    def parse(cls, raw: Optional[Mapping[str, Any]], path: str = "app.timeouts") -> "TimeoutsConfig":
        if isinstance(raw, TimeoutsConfig):
            return raw
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(raw).__name__}")
        try:
            return cls.model_validate(dict(raw or {}))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, path)) from exc


# App keys that used to sit at the top of `app:` and now live in `app.timeouts` (a clear error, not a silent default).
MOVED_KEYS = {
    "drain_timeout_s": "session_drain_s",
    "reservation_ttl_s": "reservation_ttl_s",
    "admission_wait_s": "admission_wait_s",
    "startup_timeout_s": "deploy_s",
    "heartbeat_s": "heartbeat_s",
    "registry_ttl_s": "registry_ttl_s",
    "session_ttl_s": "session_ttl_s",
}


def check_moved_keys(app_cfg: Mapping[str, Any], path: str = "app") -> None:
    moved = {k: v for k, v in MOVED_KEYS.items() if k in app_cfg}
    if moved:
        raise ConfigError("; ".join(f"{path}.{old} moved to {path}.timeouts.{new}" for old, new in sorted(moved.items())))
