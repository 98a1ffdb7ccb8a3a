"""Typed app config -> Ray Serve application: Gateway (ingress) + AudioEncoder + DenoiseStage0..N-1 + VaeDecoder
+ SinkFrameCache. Stage replicas are `StageReplica`s (serve/pipeline_app.py) running the engine handlers
(serve/handlers.py) behind their own gRPC data plane.
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Mapping

from ray import serve
from ray.serve.config import gRPCOptions, HTTPOptions

from ..model.config import get_preset
from .gateway import Gateway
from .pipeline_app import PipelineAppConfig, StageReplica, StageSpec

AVATAR_SERVICER = "avatarserve.v1.avatar_service_pb2_grpc.add_AvatarServiceServicer_to_server"
HEALTH_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
HANDLERS = "avatarserve.serve.handlers"

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


def build_app(cfg: Mapping[str, Any]):
    cfg = dict(cfg)
    model = dict(cfg.get("model") or {"config": "tiny"})
    preset = get_preset(model.get("config", "tiny"))
    stream = preset.stream.replace(**(model.get("stream_overrides") or {}))
    redis_url = cfg["redis_url"]
    namespace = cfg.get("namespace", "avatarserve:")
    resources = {**DEFAULT_RESOURCES, **(cfg.get("resources") or {})}
    replicas = cfg.get("replicas") or {}
    capacity = cfg.get("capacity") or {}
    base = {"model": model, "redis_url": redis_url, "namespace": namespace,
            "torch_threads": int(cfg.get("torch_threads", 1))}

    specs: List[StageSpec] = []

    def spec(dep: str, role: str, factory: str, **extra: Any) -> StageSpec:
        r = resources[role]
        return StageSpec(deployment=dep, handler=f"{HANDLERS}:{factory}", handler_config=_stage_config(base, dep, **extra),
                         num_replicas=int(replicas.get(role, 1)), num_cpus=float(r.get("num_cpus", 0.1)),
                         num_gpus=float(r.get("num_gpus", 0)), capacity=int(capacity.get(role, 8)),
                         queue_size=int(cfg.get("queue_size", 2)))

    specs.append(spec("AudioEncoder", "audio", "audio_encoder"))
    for k in range(stream.num_steps):
        specs.append(spec(f"DenoiseStage{k}", "denoise", "denoise_stage", step=k))
    specs.append(spec("VaeDecoder", "vae", "vae_decoder"))
    pipeline = PipelineAppConfig(stages=specs, redis_url=redis_url, namespace=cfg.get("registry_namespace", ""))
    common = pipeline.common()

    bound = {}
    for s in specs:
        cls = VaeDecoderReplica if s.deployment == "VaeDecoder" else StageReplica
        dep = serve.deployment(cls).options(
            name=s.deployment, num_replicas=s.num_replicas,
            ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
            graceful_shutdown_timeout_s=float(cfg.get("graceful_shutdown_timeout_s", 60)),
            health_check_period_s=5)
        bound[s.deployment] = dep.bind(s.to_dict(), common)
    cache = serve.deployment(SinkFrameCache).options(
        name="SinkFrameCache", num_replicas=1, ray_actor_options=dict(resources["cache"])).bind(redis_url, namespace)
    gw_cfg = {"model": model, "redis_url": redis_url, "namespace": namespace,
              "registry_namespace": cfg.get("registry_namespace", ""), "deployments": [s.deployment for s in specs],
              "max_in_flight": int(cfg.get("max_in_flight", len(specs) + 2)),
              "queue_size": int(cfg.get("queue_size", 2)), "retry_after_ms": int(cfg.get("retry_after_ms", 2000))}
    gateway = serve.deployment(GatewayDeployment).options(
        name="Gateway", num_replicas=int(replicas.get("gateway", 1)),
        ray_actor_options=dict(resources["gateway"]), max_ongoing_requests=int(cfg.get("gateway_max_ongoing", 256)))
    others = [bound[s.deployment] for s in specs if s.deployment != "VaeDecoder"]
    return gateway.bind(gw_cfg, bound["VaeDecoder"], cache, *others)


class GatewayDeployment(Gateway):
    """Gateway as the Serve ingress; the extra handles are bound only so Serve deploys the whole graph."""

    def __init__(self, config: Mapping[str, Any], vae_handle: Any, cache_handle: Any, *stage_handles: Any):
        super().__init__(config, vae_handle)
        self.cache = cache_handle
        self.stage_handles = stage_handles
