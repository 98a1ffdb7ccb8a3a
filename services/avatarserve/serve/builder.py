"""Typed application config -> Ray Serve application (the one builder).

`AppConfig` (serve/config.py) -> Gateway (ingress) + AudioEncoder + DenoiseStage0..N-1 + VaeDecoder + SinkFrameCache
(+ OpsDashboard). Stage replicas (serve/deployments/stage.py) run the engine handlers (serve/dataplane/handlers.py)
behind their own gRPC data plane.

Deployment paths:
- `serve.run(build_app(cfg))`: imperative; fixed replica counts (or, with `autoscaling.enabled`, a per-deployment
  fallback policy that sees only its own sessions).
- `deploy(cfg)`: declarative (`ServeDeploySchema`), the only path through which Ray Serve 2.60 attaches an
  application-level `autoscaling_policy` (`serve.run` has no such parameter). The launcher and the autoscaling tests
  use it. Caveat of that path: applying a config replaces every application deployed declaratively before.

The ops dashboard (serve/ops/dashboard.py) is a deployment of the same application, reached over HTTP through the
Gateway's `__call__` at `{route_prefix}/ops/` (`ops.enabled`, default on). It is not a second application on purpose:
with two applications, gRPC clients would have to send `application` metadata on every call.

Scale-down: `timeouts.session_drain_s` is how long a stopping stage replica waits for its live sessions, and the
stage deployments' `graceful_shutdown_timeout_s` is derived from it (a session longer than that is cut on
scale-down: size it to the longest session you promise).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, HTTPOptions, gRPCOptions

from avatarserve.serve.config import AppConfig, ConfigError
from avatarserve.serve.control.autoscale import PolicyParams
from avatarserve.serve.dataplane.stages import StageSpec
from avatarserve.serve.deployments.cache import SinkFrameCache
from avatarserve.serve.deployments.gateway import GatewayDeployment
from avatarserve.serve.deployments.stage import StageReplica, VaeDecoderReplica, shutdown_budget_s
from avatarserve.serve.ops.dashboard import OpsDashboard
from avatarserve.serve.ops.progress import DeploymentProgress, wait_running
from avatarserve.serve.ray_compat import deploy_apps

__all__ = ["AppConfigError", "build_app", "deploy", "grpc_options", "http_options", "policy_kwargs", "serve_config",
           "stage_specs"]

# Tolerant request parsing: a corrupt request gets INVALID_ARGUMENT, not grpcio's UNKNOWN (api/grpc_service.py).
AVATAR_SERVICER = "avatarserve.serve.api.grpc_service.add_AvatarServiceServicer_to_server"
HEALTH_SERVICER = "avatarserve.serve.api.grpc_service.add_HealthServicer_to_server"
HANDLERS = "avatarserve.serve.dataplane.handlers"
FACTORIES = {"audio": "audio_encoder", "denoise": "denoise_stage", "vae": "vae_decoder"}

POLICY_PATH = "avatarserve.serve.control.autoscale:SessionAutoscalingPolicy"
FALLBACK_POLICY_PATH = "avatarserve.serve.control.autoscale:DeploymentSessionPolicy"
APP_BUILDER = "avatarserve.serve.builder:build_app"

AppConfigError = ConfigError  # kept as the builder's name for an invalid application config


def grpc_options(port: int) -> gRPCOptions:
    return gRPCOptions(port=port, grpc_servicer_functions=[AVATAR_SERVICER, HEALTH_SERVICER], enable_reflection=True)


def http_options(port: int) -> HTTPOptions:
    return HTTPOptions(host="127.0.0.1", port=port)


def stage_specs(app: AppConfig) -> List[Tuple[str, StageSpec]]:
    """(role, spec) of every stage deployment, in route order."""
    base = {"redis_url": app.redis_url, "namespace": app.namespace, "session_ttl_s": app.timeouts.session_ttl_s,
            "redis": app.timeouts.redis.model_dump(),
            "torch_threads": app.torch_threads, "utilization": app.scheduling.utilization,
            "batch_linger_s": app.scheduling.batch_linger_s}
    out = []
    for dep in app.stage_deployments:
        role = app.role_of(dep)
        config: Dict[str, Any] = {**base, "model": app.model.for_role(role).model_dump(), "name": dep,
                                  "max_batch": app.scheduling.max_batch if role in ("denoise", "vae") else 1}
        if role == "denoise":
            config.update(step=int(dep[len("DenoiseStage"):]), aas_wait_s=app.timeouts.for_deployment(dep).aas_wait_s)
        resources = getattr(app.resources, role)
        out.append((role, StageSpec(deployment=dep, handler=getattr(app.handlers, role) or f"{HANDLERS}:{FACTORIES[role]}",
                                    handler_config=config, num_replicas=getattr(app.replicas, role),
                                    num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                                    resources=dict(resources.resources), accelerator_type=resources.accelerator_type,
                                    capacity=getattr(app.capacity, role), queue_size=app.queue_size)))
    return out


def policy_kwargs(app: AppConfig) -> Dict[str, Any]:
    """Explicit parameters of the session autoscaling policy for this config (JSON-serializable)."""
    return dataclasses.asdict(PolicyParams.for_app(app))


def _shutdown_budget(app: AppConfig, deployment: Optional[str] = None) -> float:
    if app.graceful_shutdown_timeout_s is not None:
        return app.graceful_shutdown_timeout_s
    drain = app.timeouts.for_deployment(deployment).session_drain_s if deployment else app.timeouts.session_drain_s
    return shutdown_budget_s(drain)


def build_app(cfg: Union[AppConfig, Mapping[str, Any]]):
    """The Serve application for `cfg` (an `AppConfig` or its mapping: Serve calls this with the YAML's args)."""
    app = AppConfig.parse(cfg)
    app.require_redis()
    auto = app.autoscaling
    role_specs = stage_specs(app)
    fallback = policy_kwargs(app) if auto.enabled else None

    def scaling(min_r: int, max_r: int, initial: int, policy: bool = True) -> AutoscalingConfig:
        # Delays 0: the session policy owns the timing (immediate upscale, its own stable window for downscale).
        extra = dict(policy=AutoscalingPolicy(policy_function=FALLBACK_POLICY_PATH, policy_kwargs=fallback),
                     aggregation_function="max", downscale_to_zero_delay_s=0.0) if policy else {}
        return AutoscalingConfig(min_replicas=min_r, max_replicas=max_r, initial_replicas=initial, upscale_delay_s=0.0,
                                 downscale_delay_s=0.0, metrics_interval_s=auto.metrics_interval_s,
                                 look_back_period_s=auto.look_back_period_s, **extra)

    bound = {}
    for role, s in role_specs:
        options: Dict[str, Any] = dict(
            name=s.deployment, ray_actor_options=s.actor_options(),
            graceful_shutdown_timeout_s=_shutdown_budget(app, s.deployment), health_check_period_s=5)
        if auto.enabled:
            options.update(num_replicas="auto", autoscaling_config=scaling(
                auto.min_of(role, app.replicas), auto.max_of(role, app.replicas), auto.initial_of(role, app.replicas)))
        else:
            options.update(num_replicas=s.num_replicas)
        cls = VaeDecoderReplica if s.deployment == "VaeDecoder" else StageReplica
        bound[s.deployment] = serve.deployment(cls).options(**options).bind(s.to_dict(), app)
    cache = serve.deployment(SinkFrameCache).options(
        name="SinkFrameCache", num_replicas=1, ray_actor_options=app.resources.cache.actor_options()).bind(app)
    n_gw = app.replicas.gateway
    gw_options: Dict[str, Any] = dict(
        name="Gateway", ray_actor_options=app.resources.gateway.actor_options(), max_ongoing_requests=app.gateway_max_ongoing,
        # A gateway replica carries whole streams: let them end before it goes away.
        graceful_shutdown_timeout_s=_shutdown_budget(app))
    if auto.enabled:
        # Fixed size (the policy leaves it alone), but autoscaling-enabled so that Serve collects its custom metric
        # (waiting_sessions), which the application-level policy reads.
        gw_options.update(num_replicas="auto", autoscaling_config=scaling(n_gw, n_gw, n_gw, policy=False))
    else:
        gw_options.update(num_replicas=n_gw)
    gateway = serve.deployment(GatewayDeployment).options(**gw_options)
    others = [bound[s.deployment] for _, s in role_specs if s.deployment != "VaeDecoder"]
    ops = None
    if app.ops.enabled:
        ops = serve.deployment(OpsDashboard).options(
            name="OpsDashboard", num_replicas=1, ray_actor_options=app.resources.ops.actor_options()
        ).bind(app.ops, float(app.stream.fps))
    return gateway.bind(app, bound["VaeDecoder"], cache, *others, ops=ops)


def serve_config(cfg: Union[AppConfig, Mapping[str, Any]]) -> Dict[str, Any]:
    """Declarative Serve config (`ServeDeploySchema` as a dict) for this app config, with the application-level
    autoscaling policy when autoscaling is enabled. The whole config is validated first."""
    app = AppConfig.parse(cfg)
    args = app.model_dump(mode="json", exclude={"name", "route_prefix"})
    out: Dict[str, Any] = {"name": app.name, "route_prefix": app.route_prefix, "import_path": APP_BUILDER, "args": args}
    if app.autoscaling.enabled:
        # The policy reads the application's own args (control/autoscale.py PolicyParams.for_app).
        out["autoscaling_policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": {"app": args}}
    return {"applications": [out]}


def deploy(cfg: Union[AppConfig, Mapping[str, Any]], *, timeout_s: Optional[float] = None,
           on_progress: Optional[Callable[[List[DeploymentProgress]], None]] = None) -> Dict[str, Any]:
    """Deploy `serve_config(cfg)` on the running Serve instance (started with `serve.start`) and wait until every
    application is RUNNING (ops/progress.py `wait_running`: no time limit unless `timeout_s`). Returns the applied
    config."""
    from ray.serve.schema import ServeDeploySchema

    app = AppConfig.parse(cfg)
    config = serve_config(app)
    deploy_apps(ServeDeploySchema.model_validate(config))
    wait_running([a["name"] for a in config["applications"]], app.require_redis(), app.registry_prefix,
                 timeout_s=timeout_s, on_progress=on_progress)
    return config
