"""The public `AvatarService`, served through the Ray Serve gRPC proxy (the application's ingress).

The gateway is control plane plus the session's edge: it validates requests, asks the VaeDecoder deployment to
encode the reference image and prompt (a Serve handle call: stateless, any replica), stores the session in the
sink-frame cache (Redis), pins the session to the least-loaded replica of every stage (replica registry), and for
each StreamSession opens ONE per-session gRPC pipe through those replicas (data plane) driven by a
`StreamController`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from typing import Any, Dict, List, Mapping, Optional

import grpc
from grpc_health.v1 import health_pb2

from avatarserve.v1 import avatar_service_pb2 as pb

from ..model.config import ConfigError, get_preset
from .registry import NoReplicaAvailableError, ReplicaRegistry, RouteHop
from .sink_store import SinkFrameStore, sink_from_bytes
from .stream_controller import StreamAbort, StreamController, StreamSettings
from .transport import PipelineClient, PipelineError, TransportOptions

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 16 * 1024 * 1024
SERVICE_NAME = "avatarserve.v1.AvatarService"

_FORMATS = {pb.OUTPUT_FORMAT_JPEG: "jpeg", pb.OUTPUT_FORMAT_H264: "h264"}
_STATES = {"CREATED": pb.SESSION_STATE_CREATED, "STREAMING": pb.SESSION_STATE_STREAMING,
           "IDLE": pb.SESSION_STATE_IDLE, "CLOSED": pb.SESSION_STATE_CLOSED, "FAILED": pb.SESSION_STATE_FAILED}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, trailing: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.code, self.message, self.trailing = code, message, trailing or {}


class _StreamFailed(RuntimeError):
    """Raised after the status code was set on the Serve gRPC context."""


def _apply(ctx: Any, err: _Abort) -> None:
    if ctx is None:
        raise err
    ctx.set_code(err.code)
    ctx.set_details(err.message)
    if err.trailing:
        ctx.set_trailing_metadata(list(err.trailing.items()))


class Gateway:
    def __init__(self, config: Mapping[str, Any], vae_handle: Any = None):
        self.config = dict(config)
        model = self.config.get("model", {})
        preset = get_preset(model.get("config", "tiny"))
        self.stream = preset.stream.replace(**(model.get("stream_overrides") or {}))
        self.deployments: List[str] = list(self.config["deployments"])
        self.redis_url = self.config["redis_url"]
        self.registry_namespace = self.config.get("registry_namespace", "")
        self.store_namespace = self.config.get("namespace", "avatarserve:")
        self.vae = vae_handle
        self.max_in_flight = int(self.config.get("max_in_flight", len(self.deployments) + 2))
        self.retry_after_ms = int(self.config.get("retry_after_ms", 2000))
        self.session_ttl_s = float(self.config.get("session_ttl_s", 3600))
        self._loop_state: Dict[int, tuple] = {}
        self.replica_id = uuid.uuid4().hex[:8]

    # ----- per-event-loop clients (redis.asyncio and grpc.aio bind to the loop that uses them) ---------------
    def _clients(self):
        loop = asyncio.get_running_loop()
        st = self._loop_state.get(id(loop))
        if st is None:
            st = (ReplicaRegistry.from_url(self.redis_url, namespace=self.registry_namespace),
                  SinkFrameStore.from_url(self.redis_url, namespace=self.store_namespace, ttl_s=self.session_ttl_s),
                  PipelineClient(TransportOptions(queue_size=int(self.config.get("queue_size", 2)))))
            self._loop_state[id(loop)] = st
        return st

    def _geometry(self) -> pb.SessionGeometry:
        st = self.stream
        return pb.SessionGeometry(fps=st.fps, frames_per_block=st.frames_per_block, sample_rate=st.sample_rate,
                                  samples_per_block=st.samples_per_block, width=st.width, height=st.height)

    # ----- health -------------------------------------------------------------------------------------------
    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE_NAME):
            _apply(grpc_context, _Abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}"))
            return health_pb2.HealthCheckResponse()
        registry, store, _ = self._clients()
        try:
            for dep in self.deployments:
                if not await registry.replicas(dep):
                    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        except Exception:  # noqa: BLE001 - Redis down means not serving
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    # ----- sessions -----------------------------------------------------------------------------------------
    def _effective_options(self, req: pb.CreateSessionRequest) -> Dict[str, Any]:
        o = req.options
        st = self.stream
        if (o.width and o.width != st.width) or (o.height and o.height != st.height):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"this deployment serves {st.width}x{st.height}; requested {o.width}x{o.height}")
        formats = []
        for f in o.output_formats:
            if f not in _FORMATS:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported output format {f}")
            formats.append(_FORMATS[f])
        formats = sorted(set(formats)) or ["jpeg"]
        q = o.jpeg_quality or 85
        if not 1 <= q <= 100:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"jpeg_quality must be 1..100, got {q}")
        af = o.audio_format
        enc = {0: "s16le", pb.AUDIO_ENCODING_PCM_S16LE: "s16le", pb.AUDIO_ENCODING_PCM_F32LE: "f32le"}.get(af.encoding)
        if enc is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported audio encoding {af.encoding}")
        if af.sample_rate_hz not in (0, st.sample_rate):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"audio sample rate must be {st.sample_rate} Hz, got {af.sample_rate_hz}")
        if af.channels not in (0, 1):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"audio must be mono, got {af.channels} channels")
        idle = o.idle
        mode = "wait" if idle.mode == pb.IDLE_MODE_WAIT_FOR_AUDIO else "fill"
        seed = int(o.seed) if o.HasField("seed") else secrets.randbits(31)
        return {"formats": formats, "jpeg_quality": q, "encoding": enc, "idle_mode": mode,
                "fill_grace_ms": int(idle.fill_grace_ms or 200), "idle_timeout_s": int(idle.idle_timeout_s or 300),
                "seed": seed, "width": st.width, "height": st.height}

    def _options_proto(self, opts: Dict[str, Any]) -> pb.SessionOptions:
        inv = {v: k for k, v in _FORMATS.items()}
        return pb.SessionOptions(
            width=opts["width"], height=opts["height"], seed=opts["seed"],
            output_formats=[inv[f] for f in opts["formats"]], jpeg_quality=opts["jpeg_quality"],
            audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM_F32LE if opts["encoding"] == "f32le"
                                        else pb.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=self.stream.sample_rate,
                                        channels=1),
            idle=pb.IdleOptions(mode=pb.IDLE_MODE_WAIT_FOR_AUDIO if opts["idle_mode"] == "wait"
                                else pb.IDLE_MODE_FILL_SILENCE, fill_grace_ms=opts["fill_grace_ms"],
                                idle_timeout_s=opts["idle_timeout_s"]))

    async def CreateSession(self, request: pb.CreateSessionRequest, grpc_context=None) -> pb.CreateSessionResponse:
        try:
            return await self._create(request)
        except _Abort as err:
            _apply(grpc_context, err)
            return pb.CreateSessionResponse()

    async def _create(self, request: pb.CreateSessionRequest) -> pb.CreateSessionResponse:
        if not request.reference_image:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "reference_image is empty")
        if len(request.reference_image) > MAX_IMAGE_BYTES:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"reference_image is {len(request.reference_image)} bytes; the limit is {MAX_IMAGE_BYTES}")
        opts = self._effective_options(request)
        registry, store, _ = self._clients()
        # Admission: reserve a slot on every stage first (fail fast, before any model work).
        hops: List[RouteHop] = []
        try:
            for dep in self.deployments:
                info = await registry.pick_least_loaded(dep, reserve=True)
                hops.append(RouteHop(deployment=dep, replica_id=info.replica_id, address=info.address))
        except NoReplicaAvailableError as exc:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no capacity for a new session: {exc}",
                         {"retry-after-ms": str(self.retry_after_ms)}) from exc
        try:
            blob = await self.vae.prepare_session.remote(bytes(request.reference_image), request.prompt, opts["seed"])
        except Exception as exc:  # noqa: BLE001 - the image/prompt could not be turned into a sink
            msg = str(exc)
            if "InvalidInput" in msg or "cannot decode" in msg or "PromptError" in msg:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, _last_line(msg)) from exc
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"session preparation failed: {_last_line(msg)}") from exc
        sid = uuid.uuid4().hex
        sink = sink_from_bytes(blob)
        token = await store.create_session(sid, sink, width=opts["width"], height=opts["height"])
        await store.r.hset(store._k("session", sid), "options", json.dumps(opts))
        await registry.record_route(sid, hops, ttl_s=self.session_ttl_s)
        return pb.CreateSessionResponse(session_id=sid, session_token=token, geometry=self._geometry(),
                                        effective_options=self._options_proto(opts))

    async def _authorize(self, sid: str, token: str):
        registry, store, _ = self._clients()
        if not sid:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
        ok = await store.check_token(sid, token)
        if ok is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"unknown session {sid!r}")
        if not ok:
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, f"session_token does not match session {sid!r}")
        return await store.get_session(sid)

    async def GetSession(self, request: pb.GetSessionRequest, grpc_context=None) -> pb.SessionInfo:
        try:
            rec = await self._authorize(request.session_id, request.session_token)
        except _Abort as err:
            _apply(grpc_context, err)
            return pb.SessionInfo()
        c = rec.counters
        return pb.SessionInfo(
            session_id=rec.session_id, state=_STATES.get(rec.state, pb.SESSION_STATE_UNSPECIFIED),
            geometry=self._geometry(), created_at_unix_ms=rec.created_ms,
            counters=pb.SessionCounters(audio_samples_received=c["audio_samples"], blocks_generated=c["blocks_generated"],
                                        blocks_delivered=c["blocks_delivered"], frames_delivered=c["frames_delivered"],
                                        interrupts=c["interrupts"], idle_blocks_delivered=c["idle_blocks"]),
            stream_open=rec.state == "STREAMING")

    async def CloseSession(self, request: pb.CloseSessionRequest, grpc_context=None) -> pb.CloseSessionResponse:
        try:
            rec = await self._authorize(request.session_id, request.session_token)
        except _Abort as err:
            _apply(grpc_context, err)
            return pb.CloseSessionResponse()
        registry, store, _ = self._clients()
        await self._release_route(request.session_id)
        await store.set_state(request.session_id, "CLOSED")
        await store.delete_session(request.session_id)
        c = rec.counters
        return pb.CloseSessionResponse(
            counters=pb.SessionCounters(audio_samples_received=c["audio_samples"], blocks_generated=c["blocks_generated"],
                                        blocks_delivered=c["blocks_delivered"], frames_delivered=c["frames_delivered"]),
            duration_ms=max(0, int(time.time() * 1000) - rec.created_ms))

    async def _release_route(self, sid: str) -> None:
        registry, _, _ = self._clients()
        await registry.remove_route(sid)

    # ----- streaming ----------------------------------------------------------------------------------------
    async def StreamSession(self, requests, grpc_context=None):
        registry, store, client = self._clients()
        it = requests.__aiter__()
        lock_key = None
        pipe = None
        try:
            try:
                first = await it.__anext__()
            except StopAsyncIteration:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "empty stream: the first message must be Hello")
            if first.WhichOneof("kind") != "hello":
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message of a stream must be Hello")
            sid = first.hello.session_id
            rec = await self._authorize(sid, first.hello.session_token)
            if rec.state in ("CLOSED", "FAILED"):
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"session {sid!r} is {rec.state}")
            lock_key = store._k("streamlock", sid)
            if not await store.r.set(lock_key, self.replica_id, nx=True, px=int(self.session_ttl_s * 1000)):
                lock_key = None
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"a stream is already open for session {sid!r}")
            route = await registry.get_route(sid)
            if not route:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, f"session {sid!r} has no pipeline route")
            raw = await store.r.hget(store._k("session", sid), "options")
            opts = json.loads(raw) if raw else {}
            settings = StreamSettings(
                sample_rate=self.stream.sample_rate, samples_per_block=self.stream.samples_per_block,
                frames_per_block=self.stream.frames_per_block, fps=self.stream.fps, width=self.stream.width,
                height=self.stream.height, encoding=opts.get("encoding", "s16le"),
                idle_mode=opts.get("idle_mode", "fill"), fill_grace_ms=int(opts.get("fill_grace_ms", 200)),
                idle_timeout_s=float(opts.get("idle_timeout_s", 300)), max_in_flight=self.max_in_flight)
            try:
                pipe = await client.open(sid, [h.address for h in route], json.dumps(opts).encode())
            except PipelineError as exc:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, f"could not open the pipeline: {exc.message}") from exc
            await store.set_state(sid, "STREAMING")

            async def on_block(stats: dict) -> None:
                await store.incr(sid, blocks_generated=1, blocks_delivered=1,
                                 frames_delivered=self.stream.frames_per_block, idle_blocks=int(stats["is_idle"]))

            ctl = StreamController(sid, settings, pipe, on_block=on_block, geometry=self._geometry())
            try:
                async for msg in ctl.run(it):
                    yield msg
            finally:
                await store.incr(sid, audio_samples=ctl.counters.audio_samples_received,
                                 interrupts=ctl.counters.interrupts)
            await store.set_state(sid, "IDLE")
        except (_Abort, StreamAbort) as err:
            if isinstance(err, StreamAbort):
                if lock_key is not None and err.code == "INTERNAL":
                    await store.set_state(sid, "FAILED")
                err = _Abort(getattr(grpc.StatusCode, err.code), err.message, err.trailing)
            _apply(grpc_context, err)
            # A streaming method's status only reaches the client through an exception raised after setting
            # the code (Serve wraps it with the code set on the context); returning would end the call OK.
            raise _StreamFailed(err.message) from None
        finally:
            if pipe is not None:
                await pipe.close()
            if lock_key is not None:
                await store.r.delete(lock_key)


def _last_line(msg: str) -> str:
    lines = [l.strip() for l in msg.strip().splitlines() if l.strip()]
    return lines[-1] if lines else msg
