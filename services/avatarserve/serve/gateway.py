"""The public `AvatarService`, served through the Ray Serve gRPC proxy (the application's ingress).

The gateway is control plane plus the session's edge: it validates requests, asks the VaeDecoder deployment to
encode the reference image and prompt (a Serve handle call: stateless, any replica), stores the session in the
sink-frame cache (Redis), pins the session to the least-loaded replica of every stage (replica registry), and for
each StreamSession opens ONE per-session gRPC pipe through those replicas (data plane) driven by a
`StreamController`.

Admission. CreateSession reserves a slot on one replica of every stage in one atomic step (serve/registry.py). When a
stage has no free slot: if the deployment can still grow (autoscaling on and fewer live replicas than its
`max_replicas`), the call is parked for up to `admission_wait_s` and counted in `waiting_sessions`, which the
application-level autoscaling policy adds to the demand (serve/autoscale.py), so the surge itself brings the capacity;
otherwise (or when the wait runs out) it fails fast with RESOURCE_EXHAUSTED and a `retry-after-ms` trailing-metadata
hint. Admitted sessions keep their slots until their stream opens (then they count as live) or they close.

A new stream re-validates the recorded route: a hop whose replica is gone (crashed, or stopped by a scale-down) or
full is re-placed on another replica (the pipeline state is rebuilt per stream from the sink-frame cache, so an idle
session moves freely; a streaming session never moves: a stopping replica drains it, see pipeline_app.py).

Metrics (serve/metrics.py): lifecycle and admission counters, time to first frame, per-session FPS / real-time factor
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
from typing import Any, Dict, List, Mapping, Optional

import grpc
from grpc_health.v1 import health_pb2

from avatarserve.v1 import avatar_service_pb2 as pb

from ..model.config import ConfigError, get_preset
from .autoscale import WAITING_SESSIONS_METRIC
from .config import TimeoutsConfig
from .metrics import GatewayMetrics, SessionMeter
from .ray_compat import in_serve_replica
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
        self.timeouts = TimeoutsConfig.parse(self.config.get("timeouts"))
        self.session_ttl_s = self.timeouts.session_ttl_s
        self.reservation_ttl_s = self.timeouts.reservation_ttl_s
        # Admission: parking a CreateSession only makes sense while the cluster can still grow.
        self.autoscaling = bool(self.config.get("autoscaling", False))
        self.max_replicas: Dict[str, int] = {k: int(v) for k, v in (self.config.get("max_replicas") or {}).items()}
        self.min_replicas: Dict[str, int] = {k: int(v) for k, v in (self.config.get("min_replicas") or {}).items()}
        self.admission_wait_s = self.timeouts.admission_wait_s
        self.admission_poll_s = float(self.config.get("admission_poll_s", 0.1))
        # Quality of service: a frame is late when delivered more than this after the end of its audio span.
        self.late_after_s = float(self.config.get("late_after_s", 3.0))
        self.fps_window_s = float(self.config.get("fps_window_s", 5.0))
        self.fps_sample_s = float(self.config.get("fps_sample_s", 1.0))
        self._loop_state: Dict[int, tuple] = {}
        self._samplers: Dict[int, asyncio.Task] = {}
        self._streams: Dict[str, tuple] = {}  # session id -> (StreamController, SessionMeter)
        self._waiting = 0
        self.replica_id = uuid.uuid4().hex[:8]
        self.metrics = GatewayMetrics() if in_serve_replica() else None

    # ----- per-event-loop clients (redis.asyncio and grpc.aio bind to the loop that uses them) ---------------
    def _clients(self):
        loop = asyncio.get_running_loop()
        st = self._loop_state.get(id(loop))
        if st is None:
            st = (ReplicaRegistry.from_url(self.redis_url, namespace=self.registry_namespace,
                                           reservation_ttl_s=self.reservation_ttl_s),
                  SinkFrameStore.from_url(self.redis_url, namespace=self.store_namespace, ttl_s=self.session_ttl_s),
                  PipelineClient(TransportOptions(queue_size=int(self.config.get("queue_size", 2)))))
            self._loop_state[id(loop)] = st
            if self.metrics is not None:
                self._samplers[id(loop)] = loop.create_task(self._sample_streams(), name="gateway-stream-sampler")
        return st

    # ----- autoscaling signal and metrics ---------------------------------------------------------------------
    def record_autoscaling_stats(self) -> Dict[str, float]:
        """Custom autoscaling metric: CreateSession calls parked for lack of a free slot (serve/autoscale.py)."""
        return {WAITING_SESSIONS_METRIC: float(self._waiting)}

    async def _sample_streams(self) -> None:
        """Every `fps_sample_s`: per-session FPS / real-time factor, and the gateway's queue gauges."""
        m = self.metrics
        while True:
            await asyncio.sleep(self.fps_sample_s)
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
                m.set("avatarserve_admission_waiting", self._waiting)
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
            _apply(grpc_context, _Abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}"))
            return health_pb2.HealthCheckResponse()
        registry, store, _ = self._clients()
        try:
            for dep in self.deployments:
                # A stage scaled to zero is healthy: a session brings a replica back (admission parks meanwhile).
                if not await registry.replicas(dep) and not (self.autoscaling and self.min_replicas.get(dep, 1) == 0):
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
            resp = await self._create(request)
        except _Abort as err:
            self._count("avatarserve_session_creates", code=err.code.name)
            _apply(grpc_context, err)
            return pb.CreateSessionResponse()
        except Exception:
            self._count("avatarserve_session_creates", code="INTERNAL")
            raise
        self._count("avatarserve_session_creates", code="OK")
        return resp

    def _can_grow(self, exc: NoReplicaAvailableError) -> bool:
        """May capacity still appear on every deployment that is full? (autoscaling on and each below its max)."""
        if not self.autoscaling:
            return False
        return all(self.max_replicas.get(dep) is None or registered < self.max_replicas[dep]
                   for dep, registered in exc.full.items())

    async def _admit(self, place):
        """Run `place()` (a registry reservation) until it succeeds; park while the cluster can grow, else refuse."""
        started = time.monotonic()
        deadline = started + self.admission_wait_s
        parked = False
        try:
            while True:
                try:
                    result = await place()
                    if self.metrics is not None:
                        self.metrics.observe("avatarserve_admission_wait_seconds", time.monotonic() - started,
                                             outcome="admitted")
                    return result
                except NoReplicaAvailableError as exc:
                    if not self._can_grow(exc) or time.monotonic() >= deadline:
                        if self.metrics is not None:
                            self.metrics.observe("avatarserve_admission_wait_seconds", time.monotonic() - started,
                                                 outcome="refused")
                        why = "at its maximum size" if not self._can_grow(exc) else \
                            f"still full after waiting {self.admission_wait_s:g} s for it to grow"
                        raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"no capacity for a new session: {exc}; the cluster is {why}",
                                     {"retry-after-ms": str(self.retry_after_ms)}) from exc
                    if not parked:
                        parked = True
                        self._waiting += 1
                    await asyncio.sleep(self.admission_poll_s)
        finally:
            if parked:
                self._waiting -= 1

    async def _create(self, request: pb.CreateSessionRequest) -> pb.CreateSessionResponse:
        if not request.reference_image:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "reference_image is empty")
        if len(request.reference_image) > MAX_IMAGE_BYTES:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"reference_image is {len(request.reference_image)} bytes; the limit is {MAX_IMAGE_BYTES}")
        opts = self._effective_options(request)
        registry, store, _ = self._clients()
        sid = uuid.uuid4().hex
        # Admission: reserve a slot on every stage first (fail fast, before any model work).
        hops: List[RouteHop] = await self._admit(lambda: registry.reserve_route(self.deployments, sid))
        try:
            try:
                blob = await asyncio.wait_for(
                    self.vae.prepare_session.remote(bytes(request.reference_image), request.prompt, opts["seed"]),
                    self.timeouts.prepare_session_s)
            except asyncio.TimeoutError as exc:
                raise _Abort(grpc.StatusCode.UNAVAILABLE,
                             f"session preparation took longer than {self.timeouts.prepare_session_s:g} s "
                             "(timeouts.prepare_session_s)") from exc
            except Exception as exc:  # noqa: BLE001 - the image/prompt could not be turned into a sink
                msg = str(exc)
                if "InvalidInput" in msg or "cannot decode" in msg or "PromptError" in msg:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, _last_line(msg)) from exc
                raise _Abort(grpc.StatusCode.UNAVAILABLE, f"session preparation failed: {_last_line(msg)}") from exc
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
        return pb.SessionInfo(
            session_id=rec.session_id, state=_STATES.get(rec.state, pb.SESSION_STATE_UNSPECIFIED),
            geometry=self._geometry(), created_at_unix_ms=rec.created_ms, counters=_counters(rec),
            stream_open=rec.state == "STREAMING")

    async def CloseSession(self, request: pb.CloseSessionRequest, grpc_context=None) -> pb.CloseSessionResponse:
        try:
            rec = await self._authorize(request.session_id, request.session_token)
        except _Abort as err:
            _apply(grpc_context, err)
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

    async def _place_route(self, sid: str, route: List[RouteHop]) -> List[RouteHop]:
        """Keep this session's slot on every hop of its recorded route that still stands; re-place the others."""
        registry, _, _ = self._clients()
        check = await registry.reserve_route_hops(sid, route)
        bad = {(h.deployment, h.replica_id) for h in check.gone + check.full}
        if not bad:
            return route
        new_route: List[RouteHop] = []
        for hop in route:
            if (hop.deployment, hop.replica_id) not in bad:
                new_route.append(hop)
                continue
            info = await self._admit(lambda d=hop.deployment, r=hop.replica_id: registry.pick_least_loaded(
                d, reserve=True, session_id=sid, exclude=r))
            new_route.append(RouteHop(hop.deployment, info.replica_id, info.address))
            self._count("avatarserve_session_reroutes", stage=hop.deployment)
            log.info("session %s: %s moves from replica %s to %s", sid, hop.deployment, hop.replica_id, info.replica_id)
        await registry.record_route(sid, new_route, ttl_s=self.session_ttl_s)
        return new_route

    # ----- streaming ----------------------------------------------------------------------------------------
    async def StreamSession(self, requests, grpc_context=None):
        registry, store, client = self._clients()
        it = requests.__aiter__()
        locked = False
        keepalive = None
        pipe = None
        completed = False
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
            if not await store.acquire_stream_lock(sid, self.replica_id):
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"a stream is already open for session {sid!r}")
            locked = True
            keepalive = asyncio.get_running_loop().create_task(self._keep_session_alive(sid), name=f"{sid}/keepalive")
            route = await registry.get_route(sid)
            if not route:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, f"session {sid!r} has no pipeline route")
            route = await self._place_route(sid, route)
            opts = await store.get_options(sid)
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
            meter = SessionMeter(self.stream.fps, self.fps_window_s)
            m = self.metrics
            seen = {"ttff": False, "interrupts": 0}

            async def on_block(stats: dict) -> None:
                delivered = stats["delivered"]
                if m is not None:  # observed as they happen, so rates over short windows see them
                    if not seen["ttff"] and ctl.ttff_s is not None:
                        seen["ttff"] = True
                        m.observe("avatarserve_time_to_first_frame_seconds", ctl.ttff_s)
                    for s_ in ctl.interrupt_to_idle_s[seen["interrupts"]:]:
                        m.observe("avatarserve_interrupt_to_idle_seconds", s_)
                    seen["interrupts"] = len(ctl.interrupt_to_idle_s)
                meter.generated(stats["frames"])
                if delivered:
                    meter.delivered(stats["frames"])
                    await store.incr(sid, blocks_generated=1, blocks_delivered=1,
                                     frames_delivered=self.stream.frames_per_block, idle_blocks=int(stats["is_idle"]))
                else:
                    await store.incr(sid, blocks_generated=1)
                if m is None:
                    return
                m.block(stats["stamps"], stats["received_ns"])
                m.observe("avatarserve_block_latency_seconds", stats["latency_s"])
                if not delivered:
                    m.inc("avatarserve_frames_dropped", stats["frames"], reason="interrupt")
                    return
                m.inc("avatarserve_frames_delivered", stats["frames"])
                m.observe("avatarserve_block_delivery_lag_seconds", max(0.0, stats["lag_s"]))
                if stats["lag_s"] > self.late_after_s:
                    m.inc("avatarserve_frames_late", stats["frames"])
                m.observe("avatarserve_av_skew_seconds", abs(stats["av_skew_s"]))

            ctl = StreamController(sid, settings, pipe, on_block=on_block, geometry=self._geometry())
            self._streams[sid] = (ctl, meter)
            self._count("avatarserve_stream_starts")
            try:
                async for msg in ctl.run(it):
                    if msg.WhichOneof("kind") == "status" and msg.status.kind == pb.StatusEvent.KIND_END_OF_STREAM:
                        # The stream is complete once END_OF_STREAM is out: a client that hangs up right after it
                        # (closing the generator at this yield) ended it normally.
                        completed = True
                    yield msg
            finally:
                self._streams.pop(sid, None)
                if m is not None:
                    sr = float(self.stream.sample_rate)
                    m.inc("avatarserve_audio_dropped_seconds", ctl.counters.audio_samples_late / sr, reason="late")
                    m.inc("avatarserve_audio_dropped_seconds", ctl.counters.audio_samples_discarded / sr,
                          reason="interrupt")
                    if completed:
                        m.inc("avatarserve_stream_ends", code="OK")
                await store.incr(sid, audio_samples=ctl.counters.audio_samples_received,
                                 interrupts=ctl.counters.interrupts)
                if completed:
                    await store.set_state(sid, "IDLE")
        except (_Abort, StreamAbort) as err:
            if isinstance(err, StreamAbort):
                if locked and err.code == "INTERNAL":
                    await store.set_state(sid, "FAILED")
                err = _Abort(getattr(grpc.StatusCode, err.code), err.message, err.trailing)
            self._count("avatarserve_stream_ends", code=err.code.name)
            _apply(grpc_context, err)
            # A streaming method's status only reaches the client through an exception raised after setting
            # the code (Serve wraps it with the code set on the context); returning would end the call OK.
            raise _StreamFailed(err.message) from None
        except (asyncio.CancelledError, GeneratorExit):
            if not completed:
                self._count("avatarserve_stream_ends", code="CANCELLED")
            raise
        except Exception:
            if not completed:
                self._count("avatarserve_stream_ends", code="INTERNAL")
            raise
        finally:
            if keepalive is not None:
                keepalive.cancel()
                await asyncio.gather(keepalive, return_exceptions=True)
            if pipe is not None:
                await pipe.close()
            if locked:
                try:  # the session's TTL counts from the end of its last stream
                    await self._touch_session(sid)
                except Exception as exc:  # noqa: BLE001 - the keys still expire on their previous TTL
                    log.warning("session %s: TTL refresh at stream end failed: %s", sid, exc)
                await store.release_stream_lock(sid, self.replica_id)

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


def _counters(rec) -> pb.SessionCounters:
    """Session counters stored in Redis -> the API message."""
    c = rec.counters
    return pb.SessionCounters(audio_samples_received=c["audio_samples"], blocks_generated=c["blocks_generated"],
                              blocks_delivered=c["blocks_delivered"], frames_delivered=c["frames_delivered"],
                              interrupts=c["interrupts"], idle_blocks_delivered=c["idle_blocks"])


def _last_line(msg: str) -> str:
    lines = [l.strip() for l in msg.strip().splitlines() if l.strip()]
    return lines[-1] if lines else msg
