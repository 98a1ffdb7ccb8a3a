"""Typed app config -> Ray Serve application: Gateway (ingress) + AudioEncoder + DenoiseStage0..N-1 + VaeDecoder
+ SinkFrameCache. Stage replicas are `StageReplica`s (serve/pipeline_app.py) running the engine handlers
(serve/handlers.py) behind their own gRPC data plane.

Deployment paths:
- `serve.run(build_app(cfg))`: imperative; fixed replica counts (or, with `autoscaling.enabled`, a per-deployment
  fallback policy that sees only its own sessions).
- `deploy(cfg)`: declarative (`ServeDeploySchema`), the only path through which Ray Serve 2.60 attaches an
  application-level `autoscaling_policy` (`serve.run` has no such parameter). The launcher and the autoscaling tests
  use it. Caveat of that path: applying a config replaces every application deployed declaratively before.

The ops dashboard (serve/dashboard.py) is a deployment of the same application, reached over HTTP through the
Gateway's `__call__` at `{route_prefix}/ops/` (`ops.enabled`, default on). It is not a second application on purpose:
with two applications, gRPC clients would have to send `application` metadata on every call.

Autoscaling config (`cfg["autoscaling"]`, see deploy/local.yaml): `enabled`, per-role `min_replicas`/`max_replicas`/
`initial_replicas` (roles: audio, denoise, vae), the policy's `headroom_fraction`, `headroom_sessions`, `hysteresis`,
`downscale_stable_s`, `scale_to_zero`, `scale_to_zero_after_s`, and Serve's metric cadence `metrics_interval_s` /
`look_back_period_s`. Per-replica session capacity per role is `cfg["capacity"]`. Timeouts and lifetimes are
`cfg["timeouts"]` (serve/config.py); `timeouts.session_drain_s` is how long a stopping stage replica waits for its
live sessions, and the stage deployments' `graceful_shutdown_timeout_s` is derived from it (a session longer than
that is cut on scale-down: size it to the longest session you promise). `cfg["handlers"]` optionally replaces a
role's handler factory ("module:callable"; roles audio, denoise, vae).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, gRPCOptions, HTTPOptions

from ..model.config import get_preset
from .config import ConfigError, TimeoutsConfig, check_moved_keys
from .dashboard import OpsDashboard
from .gateway import Gateway
from .pipeline_app import PipelineAppConfig, StageReplica, StageSpec, shutdown_budget_s
from .ray_compat import deploy_apps

AVATAR_SERVICER = "avatarserve.v1.avatar_service_pb2_grpc.add_AvatarServiceServicer_to_server"
HEALTH_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
HANDLERS = "avatarserve.serve.handlers"

POLICY_PATH = "avatarserve.serve.autoscale:SessionAutoscalingPolicy"
FALLBACK_POLICY_PATH = "avatarserve.serve.autoscale:DeploymentSessionPolicy"
APP_BUILDER = "avatarserve.serve.app:build_app"
ROLES = ("audio", "denoise", "vae")


class AppConfigError(ConfigError):
    """Invalid application config."""


DEFAULT_RESOURCES = {  # local CPU config: fractional CPUs, no GPU
    "gateway": {"num_cpus": 0.1},
    "audio": {"num_cpus": 0.1},
    "denoise": {"num_cpus": 0.1},
    "vae": {"num_cpus": 0.1},
    "cache": {"num_cpus": 0.05},
}


def grpc_options(port: int) -> gRPCOptions:
    return gRPCOptions(port=port, grpc_servicer_functions=[AVATAR_SERVICER, HEALTH_SERVICER], enable_reflection=True)


def http_options(port: int) -> HTTPOptions:
    return HTTPOptions(host="127.0.0.1", port=port)


class VaeDecoderReplica(StageReplica):
    """A stage replica that also prepares sessions (reference image + prompt -> sink) for the gateway."""

    async def prepare_session(self, image: bytes, prompt: str, seed: int) -> bytes:
        handler = self._bg.host.handler
        return await asyncio.wrap_future(self._bg.submit(handler.prepare_async(image, prompt, seed)))


class SinkFrameCache:
    """Owner of the Redis sink-frame cache. The data path talks to Redis directly (one hop less); this deployment
    answers for the cache's health and size, so a Redis outage shows up as an unhealthy deployment."""

    def __init__(self, redis_url: str, namespace: str = "avatarserve:"):
        import redis.asyncio as aioredis

        self.url = redis_url
        self.namespace = namespace
        self._r = None
        self._aioredis = aioredis

    def _client(self):
        if self._r is None:
            self._r = self._aioredis.from_url(self.url)
        return self._r

    async def check_health(self) -> None:
        await self._client().ping()

    async def stats(self) -> Dict[str, Any]:
        r = self._client()
        sessions = 0
        async for _ in r.scan_iter(match=f"{self.namespace}session:*", count=1000):
            sessions += 1
        mem = await r.info("memory")
        return {"sessions": sessions, "used_memory_bytes": int(mem.get("used_memory", 0))}


def _stage_config(base: Dict[str, Any], name: str, **extra: Any) -> Dict[str, Any]:
    cfg = dict(base)
    cfg["name"] = name
    cfg.update(extra)
    return cfg


@dataclass(frozen=True)
class AutoscalingSettings:
    enabled: bool = False
    min_replicas: Dict[str, int] = field(default_factory=dict)  # role -> n
    max_replicas: Dict[str, int] = field(default_factory=dict)
    initial_replicas: Dict[str, int] = field(default_factory=dict)
    headroom_fraction: float = 0.2
    headroom_sessions: int = 1
    hysteresis: float = 0.2
    downscale_stable_s: float = 30.0
    scale_to_zero: bool = False
    scale_to_zero_after_s: float = 300.0
    metrics_interval_s: float = 1.0
    look_back_period_s: float = 5.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "AutoscalingSettings":
        a = dict(cfg.get("autoscaling") or {})
        unknown = set(a) - set(cls.__dataclass_fields__)
        if unknown:
            raise AppConfigError(f"unknown autoscaling keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        fixed = cfg.get("replicas") or {}
        for key in ("min_replicas", "max_replicas", "initial_replicas"):
            bad = set(a.get(key) or {}) - set(ROLES)
            if bad:
                raise AppConfigError(f"autoscaling.{key}: unknown roles {sorted(bad)}; roles are {list(ROLES)}")
        st = cls(**{**a, **{k: {r: int(v) for r, v in (a.get(k) or {}).items()}
                            for k in ("min_replicas", "max_replicas", "initial_replicas")}})
        for role in ROLES:
            lo, hi = st.min_of(role, fixed), st.max_of(role, fixed)
            if lo < 0 or hi < 1 or lo > hi:
                raise AppConfigError(f"autoscaling {role}: need 0 <= min_replicas ({lo}) <= max_replicas ({hi}), max >= 1")
            if lo == 0 and st.enabled and not st.scale_to_zero:
                raise AppConfigError(f"autoscaling {role}: min_replicas 0 needs scale_to_zero: true")
        if st.look_back_period_s <= st.metrics_interval_s:
            raise AppConfigError(f"autoscaling: look_back_period_s ({st.look_back_period_s}) must exceed "
                                 f"metrics_interval_s ({st.metrics_interval_s})")
        return st

    def min_of(self, role: str, fixed: Mapping[str, Any]) -> int:
        return int(self.min_replicas.get(role, fixed.get(role, 1)))

    def max_of(self, role: str, fixed: Mapping[str, Any]) -> int:
        return int(self.max_replicas.get(role, max(self.min_of(role, fixed), int(fixed.get(role, 1)))))

    def initial_of(self, role: str, fixed: Mapping[str, Any]) -> int:
        return int(self.initial_replicas.get(role, max(1, self.min_of(role, fixed))))


def _plan(cfg: Mapping[str, Any]) -> tuple:
    """Stage specs (with roles) and shared settings derived from the config."""
    check_moved_keys(cfg)
    model = dict(cfg.get("model") or {"config": "tiny"})
    preset = get_preset(model.get("config", "tiny"))
    stream = preset.stream.replace(**(model.get("stream_overrides") or {}))
    redis_url = cfg["redis_url"]
    namespace = cfg.get("namespace", "avatarserve:")
    resources = {**DEFAULT_RESOURCES, **(cfg.get("resources") or {})}
    replicas = cfg.get("replicas") or {}
    capacity = cfg.get("capacity") or {}
    timeouts = TimeoutsConfig.parse(cfg.get("timeouts"))
    handlers = dict(cfg.get("handlers") or {})
    unknown = set(handlers) - set(ROLES)
    if unknown:
        raise AppConfigError(f"app.handlers: unknown roles {sorted(unknown)}; roles are {list(ROLES)}")
    base = {"model": model, "redis_url": redis_url, "namespace": namespace,
            "torch_threads": int(cfg.get("torch_threads", 1))}
    specs: List[tuple] = []

    def spec(dep: str, role: str, factory: str, **extra: Any) -> tuple:
        r = resources[role]
        if role == "denoise":
            extra.setdefault("aas_wait_s", timeouts.for_deployment(dep).aas_wait_s)
        return role, StageSpec(deployment=dep, handler=handlers.get(role, f"{HANDLERS}:{factory}"),
                               handler_config=_stage_config(base, dep, **extra),
                               num_replicas=int(replicas.get(role, 1)), num_cpus=float(r.get("num_cpus", 0.1)),
                               num_gpus=float(r.get("num_gpus", 0)), capacity=int(capacity.get(role, 8)),
                               queue_size=int(cfg.get("queue_size", 2)))

    specs.append(spec("AudioEncoder", "audio", "audio_encoder"))
    for k in range(stream.num_steps):
        specs.append(spec(f"DenoiseStage{k}", "denoise", "denoise_stage", step=k))
    specs.append(spec("VaeDecoder", "vae", "vae_decoder"))
    try:
        timeouts.check_deployments([s.deployment for _, s in specs])
    except ConfigError as exc:
        raise AppConfigError(f"app.{exc}") from exc
    return model, stream, resources, specs


def policy_kwargs(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """`policy_kwargs` of the application-level autoscaling policy for this config (JSON-serializable)."""
    st = AutoscalingSettings.from_config(cfg)
    _, _, _, specs = _plan(cfg)
    return {"capacity": {s.deployment: s.capacity for _, s in specs}, "headroom_fraction": st.headroom_fraction,
            "headroom_sessions": st.headroom_sessions, "hysteresis": st.hysteresis,
            "downscale_stable_s": st.downscale_stable_s, "scale_to_zero": st.scale_to_zero,
            "scale_to_zero_after_s": st.scale_to_zero_after_s, "gateway": "Gateway"}


def build_app(cfg: Mapping[str, Any]):
    cfg = dict(cfg)
    model, stream, resources, role_specs = _plan(cfg)
    redis_url = cfg["redis_url"]
    namespace = cfg.get("namespace", "avatarserve:")
    replicas = cfg.get("replicas") or {}
    auto = AutoscalingSettings.from_config(cfg)
    timeouts = TimeoutsConfig.parse(cfg.get("timeouts"))
    specs = [s for _, s in role_specs]
    pipeline = PipelineAppConfig(stages=specs, redis_url=redis_url, namespace=cfg.get("registry_namespace", ""),
                                 timeouts=timeouts)
    common = pipeline.common()
    fallback = policy_kwargs(cfg) if auto.enabled else None

    def scaling(min_r: int, max_r: int, initial: int) -> AutoscalingConfig:
        # Delays 0: the session policy owns the timing (immediate upscale, its own stable window for downscale).
        return AutoscalingConfig(
            min_replicas=min_r, max_replicas=max_r, initial_replicas=initial, upscale_delay_s=0.0,
            downscale_delay_s=0.0, downscale_to_zero_delay_s=0.0, metrics_interval_s=auto.metrics_interval_s,
            look_back_period_s=auto.look_back_period_s, aggregation_function="max",
            policy=AutoscalingPolicy(policy_function=FALLBACK_POLICY_PATH, policy_kwargs=fallback))

    bound = {}
    for role, s in role_specs:
        options: Dict[str, Any] = dict(
            name=s.deployment, ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
            graceful_shutdown_timeout_s=float(cfg.get("graceful_shutdown_timeout_s", shutdown_budget_s(
                timeouts.for_deployment(s.deployment).session_drain_s))),
            health_check_period_s=5)
        if auto.enabled:
            options.update(num_replicas="auto", autoscaling_config=scaling(
                auto.min_of(role, replicas), auto.max_of(role, replicas), auto.initial_of(role, replicas)))
        else:
            options.update(num_replicas=s.num_replicas)
        cls = VaeDecoderReplica if s.deployment == "VaeDecoder" else StageReplica
        bound[s.deployment] = serve.deployment(cls).options(**options).bind(s.to_dict(), common)
    cache = serve.deployment(SinkFrameCache).options(
        name="SinkFrameCache", num_replicas=1, ray_actor_options=dict(resources["cache"])).bind(redis_url, namespace)
    max_replicas = {s.deployment: (auto.max_of(role, replicas) if auto.enabled else s.num_replicas) for role, s in role_specs}
    min_replicas = {s.deployment: (auto.min_of(role, replicas) if auto.enabled else s.num_replicas) for role, s in role_specs}
    gw_cfg = {"model": model, "redis_url": redis_url, "namespace": namespace,
              "registry_namespace": cfg.get("registry_namespace", ""), "deployments": [s.deployment for s in specs],
              "max_in_flight": int(cfg.get("max_in_flight", len(specs) + 2)),
              "queue_size": int(cfg.get("queue_size", 2)), "retry_after_ms": int(cfg.get("retry_after_ms", 2000)),
              "autoscaling": auto.enabled, "max_replicas": max_replicas, "min_replicas": min_replicas,
              "timeouts": timeouts.model_dump(),
              "late_after_s": float(cfg.get("late_after_s", 3.0)), "fps_window_s": float(cfg.get("fps_window_s", 5.0)),
              "fps_sample_s": float(cfg.get("fps_sample_s", 1.0))}
    n_gw = int(replicas.get("gateway", 1))
    gw_options: Dict[str, Any] = dict(
        name="Gateway", ray_actor_options=dict(resources["gateway"]), max_ongoing_requests=int(cfg.get("gateway_max_ongoing", 256)),
        # A gateway replica carries whole streams: let them end before it goes away.
        graceful_shutdown_timeout_s=float(cfg.get("graceful_shutdown_timeout_s", shutdown_budget_s(timeouts.session_drain_s))))
    if auto.enabled:
        # Fixed size (the policy leaves it alone), but autoscaling-enabled so that Serve collects its custom metric
        # (waiting_sessions), which the application-level policy reads.
        gw_options.update(num_replicas="auto", autoscaling_config=AutoscalingConfig(
            min_replicas=n_gw, max_replicas=n_gw, initial_replicas=n_gw, metrics_interval_s=auto.metrics_interval_s,
            look_back_period_s=auto.look_back_period_s, upscale_delay_s=0.0, downscale_delay_s=0.0))
    else:
        gw_options.update(num_replicas=n_gw)
    gateway = serve.deployment(GatewayDeployment).options(**gw_options)
    others = [bound[s.deployment] for s in specs if s.deployment != "VaeDecoder"]
    ops_cfg = dict(cfg.get("ops") or {})
    ops = None
    if ops_cfg.pop("enabled", True):
        ops_cfg.setdefault("fps", stream.fps)
        ops = serve.deployment(OpsDashboard).options(
            name="OpsDashboard", num_replicas=1,
            ray_actor_options={"num_cpus": float(ops_cfg.pop("num_cpus", 0.05))}).bind(ops_cfg)
    return gateway.bind(gw_cfg, bound["VaeDecoder"], cache, *others, ops=ops)


def serve_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Declarative Serve config (`ServeDeploySchema` as a dict) for this app config, with the application-level
    autoscaling policy when autoscaling is enabled."""
    cfg = dict(cfg)
    _plan(cfg)  # validates the whole config before anything is deployed
    name = cfg.get("name", "avatarserve")
    args = {k: v for k, v in cfg.items() if k not in ("name", "route_prefix")}
    app: Dict[str, Any] = {"name": name, "route_prefix": cfg.get("route_prefix", "/avatarserve"),
                           "import_path": APP_BUILDER, "args": args}
    if AutoscalingSettings.from_config(cfg).enabled:
        app["autoscaling_policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": policy_kwargs(cfg)}
    return {"applications": [app]}


@dataclass(frozen=True)
class DeploymentProgress:
    """One deployment while the application deploys: Serve's view plus what each replica reports (serve/startup.py)."""

    name: str
    status: str
    running: int
    replica_states: Dict[str, int]
    message: str
    replicas: tuple  # StartupRecord, one per replica that has reported

    @property
    def total(self) -> int:
        return sum(n for state, n in self.replica_states.items() if state not in ("STOPPING", "STOPPED"))


def deployment_progress(app_name: str, startup_client: Any = None, namespace: str = "") -> List[DeploymentProgress]:
    """Snapshot of every deployment of `app_name` (Serve status + startup records, when a Redis client is given)."""
    from .startup import read_startup_records

    app = serve.status().applications.get(app_name)
    if app is None:
        return []
    records: Dict[str, list] = {}
    if startup_client is not None:
        try:
            for rec in read_startup_records(startup_client, namespace):
                records.setdefault(rec.deployment, []).append(rec)
        except Exception:  # noqa: BLE001 - progress is best effort; Serve's status still decides
            pass
    out = []
    for name, dep in app.deployments.items():
        states = {str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()}
        out.append(DeploymentProgress(name=name, status=str(getattr(dep.status, "value", dep.status)),
                                      running=states.get("RUNNING", 0), replica_states=states,
                                      message=str(dep.message or ""), replicas=tuple(records.get(name, ()))))
    return out


def _failure_report(app_name: str, serve_message: str, progress: List[DeploymentProgress]) -> str:
    failed = [r for p in progress for r in p.replicas if r.phase == "failed"]
    lines = [f"Serve application {app_name!r} failed to deploy."]
    for r in failed:
        lines.append(f"  replica {r.deployment}#{r.replica_id} failed: {r.error}"
                     + (f"\n    log: {r.log_file}" if r.log_file else ""))
    if not failed:
        for p in progress:
            if p.status == "DEPLOY_FAILED" or "fail" in p.message.lower():
                lines.append(f"  {p.name}: {p.message.strip().splitlines()[-1] if p.message.strip() else p.status}")
    tail = "\n".join(serve_message.strip().splitlines()[-6:])
    if tail:
        lines.append("  Serve says: " + tail.replace("\n", "\n    "))
    return "\n".join(lines)


def deploy(cfg: Mapping[str, Any], *, timeout_s: Optional[float] = None,
           on_progress: Optional[Callable[[List[DeploymentProgress]], None]] = None) -> Dict[str, Any]:
    """Deploy `serve_config(cfg)` on the running Serve instance (started with `serve.start`) and wait until every
    application is RUNNING (`wait_running`). Returns the config that was applied."""
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(cfg)
    schema = ServeDeploySchema.model_validate(config)
    deploy_apps(schema)
    wait_running([a["name"] for a in config["applications"]], cfg["redis_url"], cfg.get("registry_namespace", ""),
                 timeout_s=timeout_s, on_progress=on_progress)
    return config


def wait_running(app_names: List[str], redis_url: str, registry_namespace: str = "", *,
                 timeout_s: Optional[float] = None,
                 on_progress: Optional[Callable[[List[DeploymentProgress]], None]] = None,
                 poll_s: float = 0.5) -> None:
    """Wait until every application in `app_names` is RUNNING.

    No time limit by default (`timeouts.deploy_s`): replicas that load a model are slow, not failing. When Serve gives
    up on an application, raises `AppConfigError` naming the failed replica, its exception and its log file (from the
    replicas' startup records in Redis). `on_progress` receives a `DeploymentProgress` list at every poll."""
    import redis as redis_sync

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    startup_client = redis_sync.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
    last: Dict[str, Any] = {}
    try:
        while deadline is None or time.monotonic() < deadline:
            apps = serve.status().applications
            last = {n: (str(apps[n].status) if n in apps else "MISSING") for n in app_names}
            progress = [p for n in app_names for p in deployment_progress(n, startup_client, registry_namespace)]
            if on_progress is not None:
                on_progress(progress)
            failed = [n for n in app_names if n in apps and str(apps[n].status).endswith("DEPLOY_FAILED")]
            if failed:
                raise AppConfigError("\n".join(_failure_report(n, str(apps[n].message), progress) for n in failed))
            if all(v.endswith("RUNNING") for v in last.values()):
                return
            time.sleep(poll_s)
    finally:
        startup_client.close()
    raise TimeoutError(f"Serve applications not RUNNING after {timeout_s:.0f} s (timeouts.deploy_s): {last}")


class GatewayDeployment(Gateway):
    """Gateway as the Serve ingress; the extra handles are bound only so Serve deploys the whole graph."""

    def __init__(self, config: Mapping[str, Any], vae_handle: Any, cache_handle: Any, *stage_handles: Any,
                 ops: Any = None):
        super().__init__(config, vae_handle)
        self.cache = cache_handle
        self.stage_handles = stage_handles
        self.ops = ops

    async def __call__(self, request: Any) -> Any:
        """HTTP on the application's route prefix: the ops dashboard under `{route_prefix}/ops/`."""
        from starlette.responses import PlainTextResponse, Response

        path = request.url.path
        at = path.find("/ops")
        if self.ops is None or at < 0 or path[at + 4:at + 5] not in ("", "/"):
            return PlainTextResponse("not found: the ops dashboard is at <route_prefix>/ops/ (when ops.enabled)",
                                     status_code=404)
        status, media_type, body = await self.ops.handle.remote(path[at + 4:])
        return Response(body, status_code=status, media_type=media_type)
