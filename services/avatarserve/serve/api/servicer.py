"""The public `AvatarService`, served through the Ray Serve gRPC proxy (the application's ingress).

The gateway is control plane plus the session's edge: it validates requests, asks the VaeDecoder deployment to
encode the reference image and prompt (a Serve handle call: stateless, any replica), stores the session in the
sink-frame cache (Redis), pins the session to the least-loaded replica of every stage (replica registry), and for
each StreamSession opens ONE per-session gRPC pipe through those replicas (data plane) driven by a
`StreamController`.

Admission and placement (control/admission.py): CreateSession reserves a slot on every stage atomically, parks while
the cluster can still grow, and otherwise fails fast with RESOURCE_EXHAUSTED and a `retry-after-ms` hint; a new
stream re-validates the session's recorded route.

Metrics (serve/ops/metrics.py): lifecycle and admission counters, time to first frame, per-session FPS / real-time factor
sampled every `fps_sample_s`, delivery lag, late and dropped frames, interrupt-to-idle, A/V skew, per-hop transport and
queueing latency from the HopStamps of every block.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import grpc
from grpc_health.v1 import health_pb2

from avatarserve_client.v1 import avatar_service_pb2 as pb

from avatarserve.serve.api.errors import ApiError, StreamFailed, apply_to_context, from_stage_error, stage_error_of
from avatarserve.serve.api.stream_controller import StreamController, StreamSettings
from avatarserve.serve.config import AppConfig
from avatarserve.serve.control.admission import Admission, AdmissionRefused
from avatarserve.serve.control.autoscale import WAITING_SESSIONS_METRIC
from avatarserve.serve.control.registry import ReplicaRegistry, RouteHop
from avatarserve.serve.control.session_store import SessionStore, sink_from_bytes
from avatarserve.serve.dataplane.transport import PipelineClient, PipelineError, PipelineSession, TransportOptions
from avatarserve.serve.ops.metrics import GatewayMetrics, SessionMeter
from avatarserve.serve.ray_compat import in_serve_replica

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 16 * 1024 * 1024
SERVICE_NAME = "avatarserve.v1.AvatarService"

_FORMATS = {pb.OUTPUT_FORMAT_JPEG: "jpeg", pb.OUTPUT_FORMAT_H264: "h264"}
_STATES = {"CREATED": pb.SESSION_STATE_CREATED, "STREAMING": pb.SESSION_STATE_STREAMING,
           "IDLE": pb.SESSION_STATE_IDLE, "CLOSED": pb.SESSION_STATE_CLOSED, "FAILED": pb.SESSION_STATE_FAILED}


class Gateway:
    """The public AvatarService (unary RPCs + StreamSession) of one gateway replica."""

    def __init__(self, app: AppConfig, vae_handle: Any = None):
        self.app = AppConfig.parse(app)
        self.stream = self.app.stream
        self.deployments: List[str] = self.app.stage_deployments
        self.redis_url = self.app.require_redis()
        self.vae = vae_handle
        self.timeouts = self.app.timeouts
        self.session_ttl_s = self.timeouts.session_ttl_s
        self._loop_state: Dict[int, tuple] = {}
        self._samplers: Dict[int, asyncio.Task] = {}
        self._streams: Dict[str, tuple] = {}  # session id -> (StreamController, SessionMeter)
        self.replica_id = uuid.uuid4().hex[:8]
        self.metrics = GatewayMetrics() if in_serve_replica() else None
        self.admission = Admission(self.app, on_wait=self._observe_admission,
                                   on_reroute=lambda stage: self._count("avatarserve_session_reroutes", stage=stage))

    # ----- per-event-loop clients (redis.asyncio and grpc.aio bind to the loop that uses them) ---------------
    def _clients(self):
        loop = asyncio.get_running_loop()
        st = self._loop_state.get(id(loop))
        if st is None:
            st = (ReplicaRegistry.from_url(self.redis_url, namespace=self.app.registry_prefix,
                                           reservation_ttl_s=self.timeouts.reservation_ttl_s),
                  SessionStore.from_url(self.redis_url, namespace=self.app.namespace, ttl_s=self.session_ttl_s),
                  PipelineClient(TransportOptions(queue_size=self.app.queue_size,
                                                  open_timeout_s=self.timeouts.pipe_open_s)))
            self._loop_state[id(loop)] = st
            if self.metrics is not None:
                self._samplers[id(loop)] = loop.create_task(self._sample_streams(), name="gateway-stream-sampler")
        return st

    # ----- autoscaling signal and metrics ---------------------------------------------------------------------
    def record_autoscaling_stats(self) -> Dict[str, float]:
        """Custom autoscaling metric: CreateSession calls parked for lack of a free slot (serve/control/autoscale.py)."""
        return {WAITING_SESSIONS_METRIC: float(self.admission.waiting)}

    def _observe_admission(self, outcome: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe("avatarserve_admission_wait_seconds", seconds, outcome=outcome)

    async def _sample_streams(self) -> None:
        """Every `fps_sample_s`: per-session FPS / real-time factor, and the gateway's queue gauges."""
        m = self.metrics
        while True:
            await asyncio.sleep(self.app.fps_sample_s)
            try:
                in_flight = buffered = 0.0
                for ctl, meter in list(self._streams.values()):
                    in_flight += len(ctl.in_flight)
                    buffered += ctl.buffered_seconds
                    sample = meter.sample()
                    if sample is not None:
                        gen, dlv, rtf = sample
                        m.observe("avatarserve_session_generated_fps", gen)
                        m.observe("avatarserve_session_delivered_fps", dlv)
                        m.observe("avatarserve_session_realtime_factor", rtf)
                m.set("avatarserve_active_streams", len(self._streams))
                m.set("avatarserve_gateway_blocks_in_flight", in_flight)
                m.set("avatarserve_gateway_audio_buffered_seconds", buffered)
                m.set("avatarserve_admission_waiting", self.admission.waiting)
            except Exception as exc:  # noqa: BLE001 - never let metrics kill the sampler
                log.warning("stream sampler: %s", exc)

    def _count(self, name: str, **tags: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(name, **tags)

    def _geometry(self) -> pb.SessionGeometry:
        st = self.stream
        return pb.SessionGeometry(fps=st.fps, frames_per_block=st.frames_per_block, sample_rate=st.sample_rate,
                                  samples_per_block=st.samples_per_block, width=st.width, height=st.height)

    # ----- health -------------------------------------------------------------------------------------------
    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE_NAME):
            apply_to_context(grpc_context, ApiError(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}"))
            return health_pb2.HealthCheckResponse()
        registry, store, _ = self._clients()
        try:
            for dep in self.deployments:
                # A stage scaled to zero is healthy: a session brings a replica back (admission parks meanwhile).
                if not await registry.replicas(dep) and not self.admission.may_scale_to_zero(dep):
                    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        except Exception:  # noqa: BLE001 - Redis down means not serving
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    # ----- sessions -----------------------------------------------------------------------------------------
    def _effective_options(self, req: pb.CreateSessionRequest) -> Dict[str, Any]:
        o = req.options
        st = self.stream
        if (o.width and o.width != st.width) or (o.height and o.height != st.height):
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"this deployment serves {st.width}x{st.height}; requested {o.width}x{o.height}")
        formats = []
        for f in o.output_formats:
            if f not in _FORMATS:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported output format {f}")
            formats.append(_FORMATS[f])
        formats = sorted(set(formats)) or ["jpeg"]
        q = o.jpeg_quality or 85
        if not 1 <= q <= 100:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"jpeg_quality must be 1..100, got {q}")
        af = o.audio_format
        enc = {0: "s16le", pb.AUDIO_ENCODING_PCM_S16LE: "s16le", pb.AUDIO_ENCODING_PCM_F32LE: "f32le"}.get(af.encoding)
        if enc is None:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported audio encoding {af.encoding}")
        if af.sample_rate_hz not in (0, st.sample_rate):
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"audio sample rate must be {st.sample_rate} Hz, got {af.sample_rate_hz}")
        if af.channels not in (0, 1):
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"audio must be mono, got {af.channels} channels")
        idle = o.idle
        mode = "wait" if idle.mode == pb.IDLE_MODE_WAIT_FOR_AUDIO else "fill"
        seed = int(o.seed) if o.HasField("seed") else secrets.randbits(31)
        return {"formats": formats, "jpeg_quality": q, "encoding": enc, "idle_mode": mode,
                "fill_grace_ms": int(idle.fill_grace_ms or 200), "idle_timeout_s": int(idle.idle_timeout_s or 300),
                "seed": seed, "width": st.width, "height": st.height, "return_audio": bool(o.return_audio)}

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
                                idle_timeout_s=opts["idle_timeout_s"]),
            return_audio=bool(opts.get("return_audio", False)))

    async def CreateSession(self, request: pb.CreateSessionRequest, grpc_context=None) -> pb.CreateSessionResponse:
        try:
            resp = await self._create(request)
        except ApiError as err:
            self._count("avatarserve_session_creates", code=err.code.name)
            apply_to_context(grpc_context, err)
            return pb.CreateSessionResponse()
        except Exception:
            self._count("avatarserve_session_creates", code="INTERNAL")
            raise
        self._count("avatarserve_session_creates", code="OK")
        return resp

    async def _create(self, request: pb.CreateSessionRequest) -> pb.CreateSessionResponse:
        if not request.reference_image:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "reference_image is empty")
        if len(request.reference_image) > MAX_IMAGE_BYTES:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"reference_image is {len(request.reference_image)} bytes; the limit is {MAX_IMAGE_BYTES}")
        opts = self._effective_options(request)
        registry, store, _ = self._clients()
        sid = uuid.uuid4().hex
        # Admission: reserve a slot on every stage first (fail fast, before any model work).
        try:
            hops: List[RouteHop] = await self.admission.reserve_route(registry, sid)
        except AdmissionRefused as exc:
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                           {"retry-after-ms": str(exc.retry_after_ms)}) from exc
        try:
            try:
                blob = await asyncio.wait_for(
                    self.vae.prepare_session.remote(bytes(request.reference_image), request.prompt, opts["seed"]),
                    self.timeouts.prepare_session_s)
            except asyncio.TimeoutError as exc:
                raise ApiError(grpc.StatusCode.UNAVAILABLE,
                             f"session preparation took longer than {self.timeouts.prepare_session_s:g} s "
                             "(timeouts.prepare_session_s)") from exc
            except Exception as exc:  # noqa: BLE001 - the image/prompt could not be turned into a sink
                typed = stage_error_of(exc)
                if typed is not None:
                    raise from_stage_error(typed, "session preparation failed") from exc
                raise ApiError(grpc.StatusCode.UNAVAILABLE,
                               f"session preparation failed: {type(exc).__name__}: {_last_line(str(exc))}") from exc
            sink = sink_from_bytes(blob)
            token = await store.create_session(sid, sink, width=opts["width"], height=opts["height"], options=opts)
            await registry.record_route(sid, hops, ttl_s=self.session_ttl_s)
        except BaseException:
            await registry.release(sid, hops)  # the slots go back at once, not when the reservations expire
            raise
        return pb.CreateSessionResponse(session_id=sid, session_token=token, geometry=self._geometry(),
                                        effective_options=self._options_proto(opts))

    async def _authorize(self, sid: str, token: str):
        registry, store, _ = self._clients()
        if not sid:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
        ok = await store.check_token(sid, token)
        if ok is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"unknown session {sid!r}")
        if not ok:
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED, f"session_token does not match session {sid!r}")
        return await store.get_session(sid)

    async def GetSession(self, request: pb.GetSessionRequest, grpc_context=None) -> pb.SessionInfo:
        try:
            rec = await self._authorize(request.session_id, request.session_token)
        except ApiError as err:
            apply_to_context(grpc_context, err)
            return pb.SessionInfo()
        return pb.SessionInfo(
            session_id=rec.session_id, state=_STATES.get(rec.state, pb.SESSION_STATE_UNSPECIFIED),
            geometry=self._geometry(), created_at_unix_ms=rec.created_ms, counters=_counters(rec),
            stream_open=rec.state == "STREAMING")

    async def CloseSession(self, request: pb.CloseSessionRequest, grpc_context=None) -> pb.CloseSessionResponse:
        try:
            rec = await self._authorize(request.session_id, request.session_token)
        except ApiError as err:
            apply_to_context(grpc_context, err)
            return pb.CloseSessionResponse()
        registry, store, _ = self._clients()
        await self._release_route(request.session_id)
        self._count("avatarserve_session_closes")
        await store.set_state(request.session_id, "CLOSED")
        await store.delete_session(request.session_id)
        return pb.CloseSessionResponse(counters=_counters(rec),
                                       duration_ms=max(0, int(time.time() * 1000) - rec.created_ms))

    async def _release_route(self, sid: str) -> None:
        registry, _, _ = self._clients()
        route = await registry.get_route(sid)
        if route:
            await registry.release(sid, route)
        await registry.remove_route(sid)

    # ----- streaming ----------------------------------------------------------------------------------------
    async def StreamSession(self, requests, grpc_context=None):
        it = requests.__aiter__()
        lease = _StreamLease()
        completed = False
        try:
            settings = await self._open_stream(it, lease)
            _, store, _ = self._clients()
            observer = _StreamObserver(self, lease.sid, store)
            ctl = StreamController(lease.sid, settings, lease.pipe, on_block=observer, geometry=self._geometry())
            observer.ctl = ctl
            self._streams[lease.sid] = (ctl, observer.meter)
            self._count("avatarserve_stream_starts")
            lease.streaming = True
            try:
                async for msg in ctl.run(it):
                    if msg.WhichOneof("kind") == "status" and msg.status.kind == pb.StatusEvent.KIND_END_OF_STREAM:
                        # The stream is complete: account for it and free the session (stream lock, pipeline)
                        # before the client sees END_OF_STREAM, so it can open the next stream right away. A client
                        # that hangs up right after it (closing the generator at this yield) ended it normally.
                        completed = True
                        self._streams.pop(lease.sid, None)
                        await observer.finish(completed)
                        await self._end_lease(lease)
                    yield msg
            finally:
                if self._streams.pop(lease.sid, None) is not None:
                    await observer.finish(completed)
        except ApiError as err:
            if lease.streaming and err.code == grpc.StatusCode.INTERNAL:
                _, store, _ = self._clients()
                await store.set_state(lease.sid, "FAILED")
            self._count("avatarserve_stream_ends", code=err.code.name)
            apply_to_context(grpc_context, err)
            raise StreamFailed(err.message) from None
        except (asyncio.CancelledError, GeneratorExit):
            if not completed:
                self._count("avatarserve_stream_ends", code="CANCELLED")
            raise
        except Exception:
            if not completed:
                self._count("avatarserve_stream_ends", code="INTERNAL")
            raise
        finally:
            await self._end_lease(lease)

    async def _open_stream(self, it, lease: "_StreamLease") -> StreamSettings:
        """Hello -> authorized session, its stream lock, a live route and an open pipeline (recorded in `lease`)."""
        registry, store, client = self._clients()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "empty stream: the first message must be Hello")
        if first.WhichOneof("kind") != "hello":
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "the first message of a stream must be Hello")
        sid = first.hello.session_id
        rec = await self._authorize(sid, first.hello.session_token)
        if rec.state in ("CLOSED", "FAILED"):
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, f"session {sid!r} is {rec.state}")
        if not await store.acquire_stream_lock(sid, self.replica_id):
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, f"a stream is already open for session {sid!r}")
        lease.sid = sid
        lease.keepalive = asyncio.get_running_loop().create_task(self._keep_session_alive(sid), name=f"{sid}/keepalive")
        route = await registry.get_route(sid)
        if not route:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, f"session {sid!r} has no pipeline route")
        try:
            route = await self.admission.place_route(registry, sid, route)
        except AdmissionRefused as exc:
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                           {"retry-after-ms": str(exc.retry_after_ms)}) from exc
        opts = await store.get_options(sid)
        st = self.stream
        settings = StreamSettings(
            sample_rate=st.sample_rate, samples_per_block=st.samples_per_block, frames_per_block=st.frames_per_block,
            fps=st.fps, width=st.width, height=st.height, encoding=opts.get("encoding", "s16le"),
            idle_mode=opts.get("idle_mode", "fill"), fill_grace_ms=int(opts.get("fill_grace_ms", 200)),
            idle_timeout_s=float(opts.get("idle_timeout_s", 300)), max_in_flight=self.app.in_flight_limit,
            return_audio=bool(opts.get("return_audio", False)))
        try:
            lease.pipe = await client.open(sid, [h.address for h in route], json.dumps(opts).encode())
        except PipelineError as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, f"could not open the pipeline: {exc.message}") from exc
        await store.set_state(sid, "STREAMING")
        return settings

    async def _end_lease(self, lease: "_StreamLease") -> None:
        """Free what an opened stream holds: keepalive, pipeline, stream lock (the session's TTL restarts now).
        Idempotent."""
        if lease.ended:
            return
        lease.ended = True
        _, store, _ = self._clients()
        if lease.keepalive is not None:
            lease.keepalive.cancel()
            await asyncio.gather(lease.keepalive, return_exceptions=True)
        if lease.pipe is not None:
            await lease.pipe.close()
        if lease.sid is not None:
            try:  # the session's TTL counts from the end of its last stream
                await self._touch_session(lease.sid)
            except Exception as exc:  # noqa: BLE001 - the keys still expire on their previous TTL
                log.warning("session %s: TTL refresh at stream end failed: %s", lease.sid, exc)
            await store.release_stream_lock(lease.sid, self.replica_id)

    async def _touch_session(self, sid: str) -> bool:
        registry, store, _ = self._clients()
        alive = await store.touch(sid)
        await registry.touch_route(sid, self.session_ttl_s)
        return alive

    async def _keep_session_alive(self, sid: str) -> None:
        """While a stream is open, restart the TTL of every key of its session well before it runs out."""
        period = self.session_ttl_s / 3
        while True:
            await asyncio.sleep(period)
            try:
                if not await self._touch_session(sid):
                    log.warning("session %s: its keys expired while streaming (session_ttl_s %g s)", sid,
                                self.session_ttl_s)
            except Exception as exc:  # noqa: BLE001 - retried at the next period; the stream itself goes on
                log.warning("session %s: TTL refresh failed: %s", sid, exc)


@dataclass
class _StreamLease:
    """What one StreamSession holds once it got that far (freed by `Gateway._end_lease`)."""

    sid: Optional[str] = None  # set once the stream lock is held
    keepalive: Optional[asyncio.Task] = None
    pipe: Optional[PipelineSession] = None
    streaming: bool = False  # the controller runs: an INTERNAL error now marks the session FAILED
    ended: bool = False  # `Gateway._end_lease` ran


class _StreamObserver:
    """Per-block accounting of one stream: session counters in the store, the FPS meter, Prometheus metrics."""

    def __init__(self, gateway: "Gateway", sid: str, store: SessionStore):
        self.gw = gateway
        self.sid = sid
        self.store = store
        self.meter = SessionMeter(gateway.stream.fps, gateway.app.fps_window_s)
        self.ctl: Optional[StreamController] = None
        self._ttff_seen = False
        self._interrupts_seen = 0

    async def __call__(self, stats: dict) -> None:
        m, delivered, frames = self.gw.metrics, stats["delivered"], stats["frames"]
        self.meter.generated(frames)
        if delivered:
            self.meter.delivered(frames)
            await self.store.incr(self.sid, blocks_generated=1, blocks_delivered=1,
                                  frames_delivered=self.gw.stream.frames_per_block, idle_blocks=int(stats["is_idle"]))
        else:
            await self.store.incr(self.sid, blocks_generated=1)
        if m is None:
            return
        self._observe_events(m)
        m.block(stats["stamps"], stats["received_ns"])
        m.observe("avatarserve_block_latency_seconds", stats["latency_s"])
        if not delivered:
            m.inc("avatarserve_frames_dropped", frames, reason="interrupt")
            return
        m.inc("avatarserve_frames_delivered", frames)
        m.observe("avatarserve_block_delivery_lag_seconds", max(0.0, stats["lag_s"]))
        if stats["lag_s"] > self.gw.app.late_after_s:
            m.inc("avatarserve_frames_late", frames)
        m.observe("avatarserve_av_skew_seconds", abs(stats["av_skew_s"]))

    def _observe_events(self, m: GatewayMetrics) -> None:
        """TTFF and interrupt-to-idle, observed as they happen so rates over short windows see them."""
        ctl = self.ctl
        if not self._ttff_seen and ctl.ttff_s is not None:
            self._ttff_seen = True
            m.observe("avatarserve_time_to_first_frame_seconds", ctl.ttff_s)
        for s in ctl.interrupt_to_idle_s[self._interrupts_seen:]:
            m.observe("avatarserve_interrupt_to_idle_seconds", s)
        self._interrupts_seen = len(ctl.interrupt_to_idle_s)

    async def finish(self, completed: bool) -> None:
        c, m = self.ctl.counters, self.gw.metrics
        if m is not None:
            sr = float(self.gw.stream.sample_rate)
            m.inc("avatarserve_audio_dropped_seconds", c.audio_samples_late / sr, reason="late")
            m.inc("avatarserve_audio_dropped_seconds", c.audio_samples_discarded / sr, reason="interrupt")
            if completed:
                m.inc("avatarserve_stream_ends", code="OK")
        await self.store.incr(self.sid, audio_samples=c.audio_samples_received, interrupts=c.interrupts)
        if completed:
            await self.store.set_state(self.sid, "IDLE")


def _counters(rec) -> pb.SessionCounters:
    """Session counters stored in Redis -> the API message."""
    c = rec.counters
    return pb.SessionCounters(audio_samples_received=c["audio_samples"], blocks_generated=c["blocks_generated"],
                              blocks_delivered=c["blocks_delivered"], frames_delivered=c["frames_delivered"],
                              interrupts=c["interrupts"], idle_blocks_delivered=c["idle_blocks"])


def _last_line(msg: str) -> str:
    lines = [l.strip() for l in msg.strip().splitlines() if l.strip()]
    return lines[-1] if lines else msg
