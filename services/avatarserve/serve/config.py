"""Typed, validated serving configuration: the application config and every timeout of the serving layer.

`AppConfig` is the `app:` section of a deployment file (deploy/*.yaml) and the Serve application's args: the
builder, the deployments, the gateway and the launcher take it (or one of its sections), never a raw dict. Every
field has one default, here, and a description. Unknown keys and wrong types fail at `avatarserve up` / deploy time
with the key's path named (`app.timeouts.pipe_open_sx: Extra inputs are not permitted`).

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

import os
from typing import Any, Dict, List, Literal, Mapping, Optional
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["AppConfig", "AuthSection", "ConfigError", "DataPlaneSection", "NODE_IP", "ROLES", "RedisTimeouts",
           "ReplicaTimeouts", "TimeoutsConfig", "TlsSection", "format_validation_error", "ray_actor_options", "resolve_redis_url"]


class ConfigError(ValueError):
    """Invalid serving configuration (the message names the key's path)."""


def format_validation_error(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors():
        path = ".".join([prefix, *(str(p) for p in err["loc"])]) if prefix else ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{path}: {msg}" if path else msg)
    return "; ".join(parts)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def _validate(cls, raw: Any, path: str) -> Any:
        """Validate a mapping; every error names its key's path under `path`."""
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(raw).__name__}")
        try:
            return cls.model_validate(dict(raw or {}))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, path)) from exc


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


class RedisTimeouts(_Strict):
    """How every replica talks to Redis, and how it rides out a Redis outage (control/redis_client.py)."""

    connect_s: float = Field(
        2.0, gt=0,
        description="Connecting to Redis. While Redis is down a refused connection fails at once; this bounds a "
                    "connection attempt that hangs (Redis host unreachable).")
    call_s: float = Field(
        10.0, gt=0,
        description="One Redis command, reply included (a real model's sink blob is megabytes). A command that "
                    "takes longer counts as Redis being unreachable.")
    probe_s: float = Field(
        0.5, gt=0,
        description="While Redis is unreachable, how often a gateway probes it (and, once it answers, re-writes the "
                    "sessions it streams); with live streams, also how often it checks that Redis did not restart "
                    "and lose them. Also how often the last denoise stage retries storing a session's adaptive-sink "
                    "latent that Redis did not take.")
    write_back_grace_s: float = Field(
        30.0, gt=0,
        description="How long the last denoise stage keeps retrying to store a session's adaptive-sink latent while "
                    "Redis answers but lacks the session's sink (after Redis lost its data, the gateway streaming "
                    "the session writes the sink back; a session closed meanwhile never comes back).")
    retry_after_ms: int = Field(
        2000, ge=0,
        description="Hint sent as `retry-after-ms` trailing metadata with UNAVAILABLE while Redis is unreachable.")


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
        description="Lifetime of a session's Redis keys (session, sink, route, stream lock) after its last stream "
                    "activity; refreshed while a stream is open, so a live stream never expires. Also the cap of "
                    "a session's idle timeout (IdleOptions.idle_timeout_s).")
    hello_s: float = Field(
        30.0, gt=0,
        description="How long a new stream waits for its client's first message (Hello) before it ends with "
                    "UNAVAILABLE (retryable: nothing of the session was touched yet; the SDK retries it), with a "
                    "WARNING in the gateway's log. A client sends Hello as soon as the call opens: this bounds a "
                    "stream whose first message never reaches the gateway (a client that opened the call and sent "
                    "nothing, or a request stream lost between Serve's proxy and the gateway replica).")
    stream_sync_s: float = Field(
        0.25, gt=0,
        description="How often an open stream writes its live counters to the session store and checks for a "
                    "close request (CloseSession or the idle sweep, from any gateway replica): bounds how stale "
                    "GetSession's counters are and how long a stream takes to end after CloseSession.")
    pipe_end_s: float = Field(
        10.0, gt=0,
        description="Once a stream's input ended and every block it sent came back, how long the gateway waits for "
                    "its pipeline's end-of-stream (a healthy pipeline sends it right after the last block) before "
                    "it ends the stream itself, with a WARNING in its log.")
    stop_poll_s: float = Field(
        1.0, gt=0,
        description="How often a gateway replica checks whether Serve has begun stopping it (scale-down, a "
                    "redeploy that replaces it, serve.delete). Then it takes no new stream, and each open one "
                    "delivers what its client sent and ends with END_OF_STREAM `server_draining`, so the client "
                    "reopens the stream on the same session (through another replica), instead of being cut when "
                    "Serve's shutdown budget runs out.")
    close_wait_s: float = Field(
        10.0, gt=0,
        description="How long CloseSession (or the idle sweep) waits for the session's open stream, on whichever "
                    "gateway replica holds it, to end before it closes the session regardless.")
    closed_ttl_s: float = Field(
        3600.0, gt=0,
        description="How long a closed session's tombstone (state, closing summary) is remembered: GetSession and a "
                    "repeated CloseSession answer from it until then, NOT_FOUND after.")
    idle_sweep_s: float = Field(
        5.0, gt=0,
        description="How often each gateway replica closes the sessions past their idle timeout (an atomic claim "
                    "in Redis: several replicas sweeping never close a session twice). A session closes at most "
                    "this much after its idle timeout.")
    shutdown_drain_s: float = Field(
        30.0, ge=0,
        description="`avatarserve down`: how long it waits for the open streams to end with END_OF_STREAM "
                    "`server_draining` (each first delivers what its client sent) before it stops the cluster "
                    "regardless. Meanwhile new sessions and streams get UNAVAILABLE.")
    redis_start_s: float = Field(60.0, gt=0, description="`avatarserve up`: redis-server must accept connections "
                                                         "within this time (it fails at once if it exits).")
    ray_start_s: float = Field(600.0, gt=0, description="`avatarserve up`: the Ray head must be up (`ray start` "
                                                        "reports the runtime started) within this time; it fails at "
                                                        "once if `ray start` exits.")
    ray_start_attempts: int = Field(
        3, ge=1,
        description="`avatarserve up`: how often the Ray head is started in all when `ray start` gives up on its "
                    "own raylet (Ray waits a fixed 30 s for it to register and cannot be told to wait longer).")
    deploy_s: Optional[float] = Field(
        None, gt=0,
        description="`avatarserve up`: optional overall limit on deploying the application. Unset (the default): "
                    "wait while replicas start and load; a replica that fails is reported at once.")
    health_s: float = Field(120.0, gt=0, description="`avatarserve up`: the public gRPC endpoint must answer SERVING "
                                                     "within this time once the application is RUNNING.")
    redis: RedisTimeouts = Field(default_factory=RedisTimeouts,
                                 description="Redis connections of every replica, and Redis outages.")
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
        return cls._validate(raw, path)


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
# App keys that moved into another section of `app:` (old key -> new path under `app.`).
MOVED_SECTION_KEYS = {
    "bind_host": "data_plane.bind_host",
    "advertise_host": "data_plane.advertise_host",
}


# --------------------------------------------------------------------------------------------- the application


ROLES = ("audio", "denoise", "vae")
_HANDLER_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


DType = Literal["float32", "float16", "bfloat16"]


class RoleModel(_Strict):
    """Where one role's weights live, when it differs from `model.device` / `model.dtype`."""

    device: Optional[str] = Field(None, description="torch device of this role (default: model.device).")
    dtype: Optional[DType] = Field(None, description="Weights and activations dtype of this role "
                                                     "(default: model.dtype).")


class RoleModels(_Strict):
    audio: RoleModel = Field(default_factory=RoleModel)
    denoise: RoleModel = Field(default_factory=RoleModel)
    vae: RoleModel = Field(default_factory=RoleModel)


class ModelSection(_Strict):
    """Which model every stage replica loads, and on which device."""

    config: str = Field("toy", description="Preset name (model/config.py): `toy` (the embedded default), `tiny` "
                                           "(random weights, tests), `liveavatar-14b` (the real model).")
    checkpoint: Optional[str] = Field(None, description="Local checkpoint folder in the official layout; unset: the "
                                                        "preset's shipped weights (random for tiny).")
    seed: int = Field(0, description="Seed of randomly initialised weights (tiny).")
    device: str = Field("cpu", description="torch device of every role without its own (cpu, cuda, cuda:1, ...).")
    dtype: DType = Field("float32", description="Weights and activations dtype of every role without its own.")
    roles: RoleModels = Field(default_factory=RoleModels,
                              description="Per-role device / dtype (e.g. the audio encoder on cpu in float32).")
    stream_overrides: Dict[str, Any] = Field(default_factory=dict,
                                             description="StreamConfig fields replaced on the preset's (e.g. num_steps).")

    @model_validator(mode="after")
    def _known_preset(self) -> "ModelSection":
        self.stream  # raises for an unknown preset or stream field
        return self

    @property
    def stream(self):
        from avatarserve.model.config import stream_config

        return stream_config(self.config, self.stream_overrides)

    def for_role(self, role: str) -> "ModelSection":
        """This section as one role loads it: its own device and dtype, no per-role table."""
        own: RoleModel = getattr(self.roles, role)
        return self.model_copy(update={"device": own.device or self.device, "dtype": own.dtype or self.dtype,
                                       "roles": RoleModels()})


def ray_actor_options(num_cpus: float, num_gpus: float, resources: Mapping[str, float],
                      accelerator_type: Optional[str]) -> Dict[str, Any]:
    """Ray actor options of a replica: CPUs and GPUs, plus custom resources / accelerator type when set."""
    out: Dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if resources:
        out["resources"] = dict(resources)
    if accelerator_type:
        out["accelerator_type"] = accelerator_type
    return out



class ActorResources(_Strict):
    """Ray actor options of one role's replicas: what each reserves and where it may be placed."""

    num_cpus: float = Field(0.1, ge=0, description="Logical CPUs a replica reserves (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs a replica reserves (fractions share one GPU).")
    resources: Dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources a replica needs (pins the role to the nodes, or "
                                          "Kubernetes worker groups, that offer them through `ray start --resources`).")
    accelerator_type: Optional[str] = Field(None, description="Ray accelerator type (e.g. H100): only nodes with it.")

    @model_validator(mode="after")
    def _positive_resources(self) -> "ActorResources":
        bad = {k: v for k, v in self.resources.items() if not k or v <= 0}
        if bad:
            raise ValueError(f"resources: names must be non-empty and amounts > 0, got {bad}")
        return self

    def actor_options(self) -> Dict[str, Any]:
        """`ray_actor_options` of a replica of this role."""
        return ray_actor_options(self.num_cpus, self.num_gpus, self.resources, self.accelerator_type)


# Roles whose replicas default to less than ActorResources' defaults (light actors: no model).
_LIGHT_ROLE_DEFAULTS: Dict[str, Dict[str, float]] = {"cache": {"num_cpus": 0.05}, "ops": {"num_cpus": 0.05}}


class Resources(_Strict):
    """Ray actor options per role. A role given in part (e.g. only `resources:` to pin it) keeps that role's own
    defaults for the rest."""

    gateway: ActorResources = Field(default_factory=ActorResources)
    audio: ActorResources = Field(default_factory=ActorResources)
    denoise: ActorResources = Field(default_factory=ActorResources)
    vae: ActorResources = Field(default_factory=ActorResources)
    cache: ActorResources = Field(default_factory=lambda: ActorResources(**_LIGHT_ROLE_DEFAULTS["cache"]))
    ops: ActorResources = Field(default_factory=lambda: ActorResources(**_LIGHT_ROLE_DEFAULTS["ops"]))

    @model_validator(mode="before")
    @classmethod
    def _role_defaults_under_partial_values(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            return raw
        out = dict(raw)
        for role, defaults in _LIGHT_ROLE_DEFAULTS.items():
            if isinstance(out.get(role), Mapping):
                out[role] = {**defaults, **out[role]}
        return out


class Replicas(_Strict):
    """Fixed replica counts per role (with autoscaling: the default min/max)."""

    gateway: int = Field(1, ge=1)
    audio: int = Field(1, ge=1)
    denoise: int = Field(1, ge=1)
    vae: int = Field(1, ge=1)


class Capacity(_Strict):
    """Sessions one replica of a role holds (its KV caches / streaming state): the autoscaling unit."""

    audio: int = Field(8, ge=1)
    denoise: int = Field(8, ge=1)
    vae: int = Field(8, ge=1)


class SchedulingSection(_Strict):
    """How a stage replica orders and batches its sessions' blocks (engine/scheduler.py): earliest deadline first (a
    block's deadline is the end of its audio span plus `late_after_s`, on the wall clock), one compute thread."""

    max_batch: int = Field(4, ge=1, description="Most blocks of different sessions a denoise stage runs in one "
                                                "forward, and the VAE decoder decodes as one batch (1: one block at "
                                                "a time). Batched blocks equal blocks run one by one up to float "
                                                "round-off (not bit for bit). An upper bound: each stage batches only "
                                                "as far as its measured cost per block falls (by 5% or more).")
    utilization: float = Field(0.9, gt=0, le=1, description="Share of a block's duration a stage may spend "
                                                            "computing when it estimates the real-time sessions it "
                                                            "can take (metric avatarserve_replica_realtime_capacity).")
    batch_linger_s: float = Field(
        0.02, ge=0, le=1, description="How long a stage's compute thread waits, with fewer blocks ready than the "
                                      "batch size it uses, for the sessions of the batch it just finished to submit "
                                      "their next block (they arrive a moment after their result), so that sessions "
                                      "behind real time are batched instead of alternating single blocks. A session "
                                      "with nothing queued costs the others at most this. 0: never wait.")
    admit_by: Literal["measured", "configured"] = Field(
        "measured", description="Sessions a stage replica takes, for admission and the autoscaling policy. "
                                "'measured': the real-time sessions its measured step cost (timed on synthetic "
                                "sessions at start-up, then on live blocks) and, on CUDA, its free memory allow; at "
                                "least 1, at most capacity.<role>. Beyond them CreateSession waits for a new replica "
                                "or is refused (RESOURCE_EXHAUSTED). 'configured': capacity.<role> as given.")


class RoleCounts(_Strict):
    audio: Optional[int] = Field(None, ge=0)
    denoise: Optional[int] = Field(None, ge=0)
    vae: Optional[int] = Field(None, ge=0)


class AutoscalingSection(_Strict):
    """Session-driven autoscaling (control/autoscale.py): each stage is sized from the sessions it holds plus
    CreateSession calls parked for a slot, ceil(slots / capacity) with slots = max(D * (1 + headroom_fraction),
    D + headroom_sessions); it shrinks only below the band widened by `hysteresis` and after `downscale_stable_s`."""

    enabled: bool = Field(False, description="Off: fixed replica counts (`replicas`).")
    min_replicas: RoleCounts = Field(default_factory=RoleCounts, description="Per role; default `replicas`.")
    max_replicas: RoleCounts = Field(default_factory=RoleCounts, description="Per role; default max(min, replicas).")
    initial_replicas: RoleCounts = Field(default_factory=RoleCounts, description="Per role; default max(1, min).")
    headroom_fraction: float = Field(0.2, ge=0, description="Spare slots as a fraction of demand.")
    headroom_sessions: int = Field(1, ge=0, description="Spare slots at least.")
    hysteresis: float = Field(0.2, ge=0, lt=1, description="Shrink only below demand widened by this fraction.")
    downscale_stable_s: float = Field(30.0, ge=0, description="Demand must stay low this long before a shrink.")
    scale_to_zero: bool = Field(False, description="Allow min_replicas 0 (idle stages release their GPUs).")
    scale_to_zero_after_s: float = Field(300.0, ge=0, description="Idle time before a stage goes to zero.")
    metrics_interval_s: float = Field(1.0, gt=0, description="How often replicas report sessions to Serve.")
    look_back_period_s: float = Field(5.0, gt=0, description="Serve's averaging window; must exceed the interval.")

    @model_validator(mode="after")
    def _window(self) -> "AutoscalingSection":
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"look_back_period_s ({self.look_back_period_s}) must exceed metrics_interval_s "
                             f"({self.metrics_interval_s})")
        return self

    def min_of(self, role: str, fixed: Replicas) -> int:
        v = getattr(self.min_replicas, role)
        return getattr(fixed, role) if v is None else v

    def max_of(self, role: str, fixed: Replicas) -> int:
        v = getattr(self.max_replicas, role)
        return max(self.min_of(role, fixed), getattr(fixed, role)) if v is None else v

    def initial_of(self, role: str, fixed: Replicas) -> int:
        v = getattr(self.initial_replicas, role)
        return max(1, self.min_of(role, fixed)) if v is None else v


class ReplayBlocks(_Strict):
    """Blocks replayed to rebuild a session on the replica that replaces a lost one, per role: what that role's state
    depends on. Exact when the replay reaches block 0."""

    audio: int = Field(8, ge=0, description="AudioEncoder: its left audio context (the toy model's is < 2 s).")
    denoise: int = Field(8, ge=0, description="DenoiseStage: at least the model's KV window (window_blocks); more "
                                              "blocks make the seam smaller.")
    vae: int = Field(8, ge=0, description="VaeDecoder: its causal feature cache (measured on the tiny model: 2 blocks "
                                          "leave a visible seam, mean 1 px / max 35 px; 16 none).")

    def most(self) -> int:
        return max(self.audio, self.denoise, self.vae)


class RecoverySection(_Strict):
    """Session recovery after the loss of a stage replica (serve/dataplane/recovery.py)."""

    enabled: bool = Field(True, description="Re-place a session whose stage replica died and continue its stream; "
                                            "off: the stream ends UNAVAILABLE (the client may reopen it).")
    replay_blocks: ReplayBlocks = Field(
        default_factory=ReplayBlocks,
        description="Blocks before the first undelivered one that are replayed through the new route, per role of the "
                    "lost replica, so its replacement rebuilds its state (outputs dropped; surviving hops answer "
                    "from memory). The gateway keeps the audio of the most of these per stream.")
    max_recoveries: int = Field(
        3, ge=0, description="Losses in a row a stream rides out (the count restarts once video comes through again "
                             "after a recovery); one more ends it UNAVAILABLE.")
    hold_s: float = Field(
        30.0, ge=0, description="How long a stage replica keeps a session whose pipe broke (another hop was lost), "
                                "with its last results, so the reopened pipe continues it exactly instead of "
                                "rebuilding it. 0: free it at once.")
    close_drain_s: float = Field(
        10.0, ge=0, description="A stream that ends early (client gone, CloseSession, error) ends its pipe cleanly: "
                                "its blocks in flight finish within this time (results dropped) and every replica "
                                "frees the session at once; after it the pipe is cancelled and replicas free the "
                                "session after `hold_s`.")
    stall_s: float = Field(
        120.0, gt=0, description="A stream whose pipe returns no result for this long while blocks are in flight is "
                                 "reopened on the same route, like a lost replica (a hop is stuck; the reopen "
                                 "supersedes its pipe). Far above a block's latency on the real model under load.")
    probe_timeout_s: float = Field(
        1.0, gt=0, description="TCP connect to the lost hop's address that tells a dead replica (refused or silent: "
                               "removed from the registry, the session moves) from a broken stream (it answers: "
                               "the session reopens on it).")


class OpsSection(_Strict):
    """The built-in ops page at `{route_prefix}/ops/` (ops/dashboard.py)."""

    enabled: bool = Field(True)
    sample_interval_s: float = Field(5.0, gt=0, description="How often the page's metrics are scraped.")
    window_s: float = Field(30.0, gt=0, description="Rates and quantiles over this window.")
    history_s: float = Field(900.0, gt=0, description="How much history the charts keep.")
    title: str = Field("AvatarServe operations")
    refresh_ms: Optional[int] = Field(None, ge=100, description="Page refresh; default the sample interval.")
    metrics_urls: List[str] = Field(default_factory=list, description="Prometheus exposition URLs to scrape; "
                                                                      "default: every Ray node's metrics agent.")


NODE_IP = "node-ip"
_WILDCARDS = ("0.0.0.0", "::", "[::]")


class DataPlaneSection(_Strict):
    """Where stage replicas serve their data-plane gRPC (the hops between stages) and what they register."""

    bind_host: str = Field(
        NODE_IP, min_length=1,
        description="Address a stage replica binds. `node-ip`: the IP of the Ray node it runs on (the pod IP on "
                    "Kubernetes, 127.0.0.1 on a local cluster); `0.0.0.0` / `::`: every interface; or a literal "
                    "address.")
    advertise_host: Optional[str] = Field(
        None, min_length=1,
        description="Address registered for the other hops. Default: the bound address, or the Ray node's IP for a "
                    "wildcard bind.")
    port_min: Optional[int] = Field(None, ge=1, le=65535, description="First port of a fixed data-plane port "
                                                                       "range (clusters with NetworkPolicies).")
    port_max: Optional[int] = Field(None, ge=1, le=65535, description="Last port of that range (inclusive). Unset "
                                                                       "(both): an ephemeral port.")

    @model_validator(mode="after")
    def _range(self) -> "DataPlaneSection":
        if (self.port_min is None) != (self.port_max is None):
            raise ValueError("port_min and port_max go together (both set, or neither)")
        if self.port_min is not None and self.port_min > self.port_max:
            raise ValueError(f"port_min ({self.port_min}) must be <= port_max ({self.port_max})")
        return self

    @property
    def port_range(self) -> Optional[tuple]:
        return None if self.port_min is None else (self.port_min, self.port_max)

    def addresses(self, node_ip: str) -> tuple:
        """(bind host, advertised host) of a replica on the Ray node with IP `node_ip`."""
        bind = node_ip if self.bind_host == NODE_IP else self.bind_host
        if self.advertise_host:
            return bind, self.advertise_host
        return bind, (node_ip if bind in _WILDCARDS else bind)


def resolve_redis_url(url: Optional[str], env: Optional[Mapping[str, str]] = None) -> str:
    """The Redis URL a process connects to: `url`, else the REDIS_URL environment variable; a password from
    REDIS_PASSWORD (e.g. a Kubernetes Secret) goes into a URL that has none, so it never sits in the Serve config."""
    env = os.environ if env is None else env
    url = url or env.get("REDIS_URL")
    if not url:
        raise ConfigError("app.redis_url is not set and neither is REDIS_URL (`avatarserve up` sets it)")
    password = env.get("REDIS_PASSWORD")
    if password:
        parts = urlsplit(url)
        if parts.password is None:
            user = quote(parts.username, safe="") if parts.username else ""
            url = urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{parts.netloc}"))
    return url


class Handlers(_Strict):
    """Replace a role's stage handler factory ("module:callable"): custom handlers, start-up tests."""

    audio: Optional[str] = Field(None, pattern=_HANDLER_PATH)
    denoise: Optional[str] = Field(None, pattern=_HANDLER_PATH)
    vae: Optional[str] = Field(None, pattern=_HANDLER_PATH)


class AuthSection(_Strict):
    """Who may create sessions (serve/api/auth.py, serve/control/api_keys.py). CreateSession needs an API key in its
    metadata (`authorization: Bearer <key>` or `x-api-key: <key>`); the session-scoped RPCs keep using the session
    token. Keys are stored hashed, in Redis under `namespace` (`avatarserve keys create`) and/or in `keys_file`."""

    mode: Literal["required", "disabled"] = Field(
        "required", description="`required`: CreateSession without a known, unrevoked API key fails (UNAUTHENTICATED "
                                "/ PERMISSION_DENIED). `disabled`: anyone who reaches the port may create sessions "
                                "(no keys, no per-key quotas).")
    keys_file: Optional[str] = Field(
        None, description="Optional file of hashed keys the operator manages (e.g. a Kubernetes Secret mounted as a "
                          "file): one JSON object per line, as `avatarserve keys create --keys-file` writes it. Read "
                          "again whenever it changes; keys in Redis are accepted as well.")
    quota_period_s: float = Field(
        3600.0, gt=0, description="Default quota period of a key without its own: session-seconds are counted per "
                                  "fixed window of this length.")
    default_max_sessions: Optional[int] = Field(
        None, ge=0, description="Concurrent open sessions of a key without its own limit (unset: unlimited).")
    default_session_seconds: Optional[float] = Field(
        None, ge=0, description="Streaming seconds per quota period of a key without its own limit (unset: "
                                "unlimited).")
    usage_flush_s: float = Field(
        5.0, gt=0, description="How often a gateway adds the streaming time of its open streams to their keys' "
                               "usage (a crashed gateway loses at most this much of it).")


class TlsSection(_Strict):
    """TLS on the public gRPC port. Ray Serve 2.60's gRPC proxy serves plaintext only, so `avatarserve up` runs a
    TLS-terminating front (serve/api/tls_front.py) that forwards every AvatarService and health call to it."""

    cert_file: Optional[str] = Field(None, description="PEM certificate chain of the public port (unset: no TLS).")
    key_file: Optional[str] = Field(None, description="PEM private key of `cert_file`.")
    host: str = Field("0.0.0.0", min_length=1, description="Address the TLS front binds.")
    port: int = Field(0, ge=0, le=65535, description="Port of the TLS front (0: a free port, printed by `up`).")

    @model_validator(mode="after")
    def _pair(self) -> "TlsSection":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (both set, or neither)")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class AppConfig(_Strict):
    """The `app:` section of a deployment file (deploy/*.yaml), equal to the Serve application's args."""

    name: str = Field("avatarserve", description="Serve application name (gRPC clients send it as metadata).")
    route_prefix: str = Field("/avatarserve", description="Route prefix; gRPC needs one, the ops page lives under it.")
    redis_url: Optional[str] = Field(None, description="Redis of the session store and the replica registry. "
                                                       "Unset: REDIS_URL in each process's environment (`avatarserve "
                                                       "up` fills it in); a password comes from REDIS_PASSWORD.")
    namespace: str = Field("avatarserve:", description="Key prefix of the session store.")
    registry_namespace: Optional[str] = Field(
        None, description="Key prefix of the replica registry and startup records. Unset: `<RAY_CLUSTER_NAME>:` "
                          "when that variable is set (KubeRay sets it in every Ray container), so two clusters "
                          "sharing one Redis never route sessions into each other; else empty.")
    data_plane: DataPlaneSection = Field(default_factory=DataPlaneSection)
    model: ModelSection = Field(default_factory=ModelSection)
    torch_threads: int = Field(1, ge=1, description="torch threads per stage replica. On CPU keep 1 where replicas "
                                                    "share cores: OpenMP's spinning threads made a 2-thread toy VAE "
                                                    "decode 14x slower beside one busy process (1.5x faster alone).")
    resources: Resources = Field(default_factory=Resources)
    replicas: Replicas = Field(default_factory=Replicas)
    capacity: Capacity = Field(default_factory=Capacity)
    scheduling: SchedulingSection = Field(default_factory=SchedulingSection)
    queue_size: int = Field(2, ge=1, description="Blocks queued per hop per session (back-pressure depth).")
    max_in_flight: Optional[int] = Field(None, ge=1, description="Blocks a session has in the pipeline at once; "
                                                                 "default: stages + 2 (keeps TPP full).")
    gateway_max_ongoing: int = Field(256, ge=1, description="Concurrent requests (streams) per gateway replica.")
    graceful_shutdown_timeout_s: Optional[float] = Field(None, gt=0, description="Override Serve's shutdown budget; "
                                                         "default: timeouts.session_drain_s + 10 s.")
    retry_after_ms: int = Field(2000, ge=0, description="Hint sent with RESOURCE_EXHAUSTED.")
    admission_poll_s: float = Field(0.1, gt=0, description="How often a parked CreateSession retries.")
    late_after_s: float = Field(3.0, ge=0, description="A frame delivered later than this after its audio is late "
                                                       "(counted in metrics; the stream gets a WARNING "
                                                       "`behind_realtime`).")
    warning_interval_s: float = Field(5.0, gt=0, description="Least time between two WARNING events of the same code "
                                                             "on one stream (`audio_late`, `behind_realtime`).")
    fps_window_s: float = Field(5.0, gt=0, description="Window of the per-session FPS metrics.")
    fps_sample_s: float = Field(1.0, gt=0, description="How often per-session FPS is sampled.")
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    autoscaling: AutoscalingSection = Field(default_factory=AutoscalingSection)
    ops: OpsSection = Field(default_factory=OpsSection)
    recovery: RecoverySection = Field(default_factory=RecoverySection)
    handlers: Handlers = Field(default_factory=Handlers)
    auth: AuthSection = Field(default_factory=AuthSection)
    tls: TlsSection = Field(default_factory=TlsSection)

    @model_validator(mode="after")
    def _consistent(self) -> "AppConfig":
        self.timeouts.check_deployments(self.stage_deployments)
        for role in ROLES:
            device = self.model.for_role(role).device
            if device.startswith("cuda") and getattr(self.resources, role).num_gpus <= 0:
                where = f"model.roles.{role}.device" if getattr(self.model.roles, role).device else "model.device"
                raise ValueError(f"{where} is {device!r} but resources.{role}.num_gpus is 0: a replica of this role "
                                 f"would load onto a GPU Ray did not reserve for it (set resources.{role}.num_gpus, "
                                 f"or model.roles.{role}.device: cpu)")
        for role in ROLES:
            lo, hi = self.autoscaling.min_of(role, self.replicas), self.autoscaling.max_of(role, self.replicas)
            if lo < 0 or hi < 1 or lo > hi:
                raise ValueError(f"autoscaling {role}: need 0 <= min_replicas ({lo}) <= max_replicas ({hi}), max >= 1")
            if lo == 0 and self.autoscaling.enabled and not self.autoscaling.scale_to_zero:
                raise ValueError(f"autoscaling {role}: min_replicas 0 needs scale_to_zero: true")
        return self

    @property
    def stream(self):
        return self.model.stream

    @property
    def stage_deployments(self) -> List[str]:
        """The pipeline's stage deployments in route order."""
        return ["AudioEncoder", *(f"DenoiseStage{k}" for k in range(self.stream.num_steps)), "VaeDecoder"]

    @staticmethod
    def role_of(deployment: str) -> str:
        return {"AudioEncoder": "audio", "VaeDecoder": "vae"}.get(deployment, "denoise")

    @property
    def in_flight_limit(self) -> int:
        return self.max_in_flight or len(self.stage_deployments) + 2

    def require_redis(self) -> str:
        """The Redis URL this process connects to (resolve_redis_url: the key, else REDIS_URL / REDIS_PASSWORD)."""
        return resolve_redis_url(self.redis_url)

    @property
    def registry_prefix(self) -> str:
        """The replica registry's key prefix in this process (see `registry_namespace`)."""
        if self.registry_namespace is not None:
            return self.registry_namespace
        cluster = os.environ.get("RAY_CLUSTER_NAME", "")
        return f"{cluster}:" if cluster else ""

    @classmethod
    def parse(cls, raw: Any, path: str = "app") -> "AppConfig":
        """Validate a mapping (YAML `app:` section, Serve args); errors name the key's path."""
        if isinstance(raw, AppConfig):
            return raw
        if isinstance(raw, Mapping):
            moved = [f"{path}.{k} moved to {path}.timeouts.{MOVED_KEYS[k]}" for k in sorted(MOVED_KEYS) if k in raw]
            moved += [f"{path}.{k} moved to {path}.{MOVED_SECTION_KEYS[k]}" for k in sorted(MOVED_SECTION_KEYS)
                      if k in raw]
            if moved:
                raise ConfigError("; ".join(moved))
        return cls._validate(raw, path)
