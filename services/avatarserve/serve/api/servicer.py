"""The public `AvatarService`, served through the Ray Serve gRPC proxy (the application's ingress).

The gateway is control plane plus the session's edge: it validates requests, asks the VaeDecoder deployment to
encode the reference image and prompt (a Serve handle call: stateless, any replica), stores the session in the
sink-frame cache (Redis), pins the session to the least-loaded replica of every stage (replica registry), and for
each StreamSession opens ONE per-session gRPC pipe through those replicas (data plane) driven by a
`StreamController`.

Admission and placement (control/admission.py): CreateSession reserves a slot on every stage atomically, parks while
the cluster can still grow, and otherwise fails fast with RESOURCE_EXHAUSTED and a `retry-after-ms` hint; a new
stream re-validates the session's recorded route.

Session lifecycle (the contract in protos/avatarserve/v1/avatar_service.proto): CREATED -> (stream open: IDLE, or
STREAMING while speaking) -> IDLE after a stream -> CLOSED by CloseSession or the idle timeout, FAILED on a server
error. An open stream writes its live counters, state, last audio and next block index to the session store every
`timeouts.stream_sync_s` (and at every block), so GetSession on any replica is live; the stream's lock and state go as
soon as the call ends, however it ends. CloseSession and the idle sweep (every gateway replica sweeps
`timeouts.idle_sweep_s`; sessions are claimed atomically) ask an open stream to end through Redis (`close_req`, read
by the stream's sync task on whichever replica holds it), wait for it (`timeouts.close_wait_s`), then turn the session
into a tombstone (`timeouts.closed_ttl_s`) that answers GetSession and repeated CloseSession calls, and free its
capacity. Block indices are per session (the session stores its next one); pipes number blocks from 0 per stream.

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
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import grpc
from grpc_health.v1 import health_pb2

from avatarserve_client.v1 import avatar_service_pb2 as pb

from avatarserve.serve.api.auth import Authenticator
from avatarserve.serve.api.errors import (ApiError, StreamFailed, apply_to_context, from_redis_unavailable,
                                          from_stage_error, stage_error_of)
from avatarserve.serve.api.grpc_service import MalformedMessage
from avatarserve.serve.api.stream_controller import (DRAINING_ENDS, Counters, StreamCancelled, StreamController,
                                                     StreamSettings, next_request)
from avatarserve.serve.cancel_safe import cancel_requested, wait_for
from avatarserve.serve.config import AppConfig
from avatarserve.serve.control.admission import Admission, AdmissionRefused
from avatarserve.serve.control.autoscale import WAITING_SESSIONS_METRIC
from avatarserve.serve.control.live_sessions import GatewaySessionStore
from avatarserve.serve.control.redis_client import RedisUnavailableError, is_unavailable
from avatarserve.serve.control.registry import ReplicaRegistry, RouteHop
from avatarserve.serve.control.session_store import SESSION_FIELDS, SessionRecord, SessionStore, sink_from_bytes
from avatarserve.serve.dataplane.recovery import RecoveringPipe, Recovery
from avatarserve.serve.dataplane.transport import (START_BLOCK_KEY, PipelineClient, PipelineError, PipelineSession,
                                                   TransportOptions)
from avatarserve.serve.ops.metrics import GatewayMetrics, SessionMeter
from avatarserve.serve.ray_compat import in_serve_replica, serve_app_name

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 16 * 1024 * 1024
SESSION_ID_CHARS = 32  # uuid4 hex
MAX_SESSION_ID_CHARS = 256  # longer ids are refused without a Redis lookup
SERVICE_NAME = "avatarserve.v1.AvatarService"

_FORMATS = {pb.OUTPUT_FORMAT_JPEG: "jpeg", pb.OUTPUT_FORMAT_H264: "h264"}
_STATES = {"CREATED": pb.SESSION_STATE_CREATED, "STREAMING": pb.SESSION_STATE_STREAMING,
           "IDLE": pb.SESSION_STATE_IDLE, "CLOSED": pb.SESSION_STATE_CLOSED, "FAILED": pb.SESSION_STATE_FAILED}


class Gateway:
    """The public AvatarService (unary RPCs + StreamSession) of one gateway replica."""

    def __init__(self, app: AppConfig, vae_handle: Any = None, *, stop_probe: Optional[Callable[[], Any]] = None):
        """`stop_probe`: true once whatever runs this replica has begun stopping it (checked every
        `timeouts.stop_poll_s`; then `stop_streams`)."""
        self.app = AppConfig.parse(app)
        self.stop_probe = stop_probe
        self.stopping = False  # this replica is being stopped: no new stream, open ones drain
        self.stream = self.app.stream
        self.deployments: List[str] = self.app.stage_deployments
        self.redis_url = self.app.require_redis()
        self.vae = vae_handle
        self.timeouts = self.app.timeouts
        self.session_ttl_s = self.timeouts.session_ttl_s
        self._loop_state: Dict[int, tuple] = {}
        self._samplers: Dict[int, asyncio.Task] = {}
        self._sweepers: Dict[int, asyncio.Task] = {}  # per event loop: the idle sweep (`_sweep_idle`)
        self._watchers: Dict[int, asyncio.Task] = {}  # per event loop: `_watch_stop`
        self._streams: Dict[str, tuple] = {}  # session id -> (StreamController, SessionMeter)
        self._teardowns: set = set()  # ended streams' releases and pipe closes running in the background
        self.replica_id = uuid.uuid4().hex[:8]
        self.app_name = serve_app_name() or self.app.name  # what Serve routes `application` metadata by
        self.metrics = GatewayMetrics() if in_serve_replica() else None
        self.auth = Authenticator(self.app)  # API keys and per-key quotas (api/auth.py)
        self.admission = Admission(self.app, on_wait=self._observe_admission,
                                   on_reroute=lambda stage: self._count("avatarserve_session_reroutes", stage=stage))

    # ----- per-event-loop clients (redis.asyncio and grpc.aio bind to the loop that uses them) ---------------
    def _clients(self):
        loop = asyncio.get_running_loop()
        st = self._loop_state.get(id(loop))
        if st is None:
            # The store tracks the sessions this replica streams: they survive a Redis outage (live_sessions.py).
            st = (ReplicaRegistry.from_url(self.redis_url, namespace=self.app.registry_prefix,
                                           reservation_ttl_s=self.timeouts.reservation_ttl_s,
                                           redis_options=self.timeouts.redis),
                  GatewaySessionStore.from_url(self.redis_url, namespace=self.app.namespace, ttl_s=self.session_ttl_s,
                                               closed_ttl_s=self.timeouts.closed_ttl_s,
                                               redis_options=self.timeouts.redis),
                  PipelineClient(TransportOptions(queue_size=self.app.queue_size,
                                                  open_timeout_s=self.timeouts.pipe_open_s)))
            self._loop_state[id(loop)] = st
            st[1].restore_hooks.append(st[0].restore_routes)
            self._sweepers[id(loop)] = loop.create_task(self._sweep_idle(), name="gateway-idle-sweep")
            if self.stop_probe is not None:
                self._watchers[id(loop)] = loop.create_task(self._watch_stop(), name="gateway-stop-watch")
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
        if isinstance(request, MalformedMessage):
            apply_to_context(grpc_context, ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request}"))
            return health_pb2.HealthCheckResponse()
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
        if bool(o.width) != bool(o.height):
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"options.width and options.height: give both or neither (got width {o.width}, "
                           f"height {o.height})")
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
                "fill_grace_ms": int(idle.fill_grace_ms or 200),
                # capped: a session's keys live session_ttl_s after its last activity
                "idle_timeout_s": int(min(idle.idle_timeout_s or 300, max(1, int(self.session_ttl_s)))),
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

    def _check_request(self, request: Any, grpc_context: Any) -> None:
        """What Serve's proxy lets through but the API refuses: an `application` metadata value naming another
        application (the proxy routes any name to the only application), a request that did not parse."""
        if grpc_context is not None and hasattr(grpc_context, "invocation_metadata"):
            app = dict(grpc_context.invocation_metadata() or ()).get("application")
            if app and app != self.app_name:
                raise ApiError(grpc.StatusCode.NOT_FOUND,
                               f"application {app!r} is not running here (this is {self.app_name!r}); send the "
                               "`application` metadata of a running application, or none")
        if isinstance(request, MalformedMessage):
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request}")

    async def CreateSession(self, request: pb.CreateSessionRequest, grpc_context=None) -> pb.CreateSessionResponse:
        try:
            self._check_request(request, grpc_context)
            async with self.auth.admit(grpc_context) as grant:  # API key + per-key quotas, before any work
                resp = await self._create(request)
                await grant.bind(resp.session_id)
        except (ApiError, RedisUnavailableError) as exc:
            err = self._api_error(exc)
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
        await self._refuse_while_draining(store)
        sid = uuid.uuid4().hex
        # Admission: reserve a slot on every stage first (fail fast, before any model work).
        try:
            hops: List[RouteHop] = await self.admission.reserve_route(registry, sid)
        except AdmissionRefused as exc:
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                           {"retry-after-ms": str(exc.retry_after_ms)}) from exc
        try:
            try:
                blob = await wait_for(
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

    async def _authorize(self, sid: str, token: str) -> SessionRecord:
        """The session (or, once closed, its tombstone) if `token` is its token."""
        registry, store, _ = self._clients()
        if not sid:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
        if len(sid) > MAX_SESSION_ID_CHARS:  # never one of ours; and never echoed (a status must stay small)
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"unknown session: session ids are {SESSION_ID_CHARS} "
                                                      f"characters, got {len(sid)}")
        ok = await store.check_token(sid, token)
        if ok is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"unknown session {sid!r}")
        if not ok:
            raise ApiError(grpc.StatusCode.PERMISSION_DENIED, f"session_token does not match session {sid!r}")
        rec = await store.get_session(sid)
        if rec is None:  # closed and forgotten in between
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"unknown session {sid!r}")
        return rec

    async def GetSession(self, request: pb.GetSessionRequest, grpc_context=None) -> pb.SessionInfo:
        try:
            self._check_request(request, grpc_context)
            rec = await self._authorize(request.session_id, request.session_token)
            _, store, _ = self._clients()
            stream_open = False if rec.closed else await store.stream_open(rec.session_id)
        except (ApiError, RedisUnavailableError) as exc:
            apply_to_context(grpc_context, self._api_error(exc))
            return pb.SessionInfo()
        state = rec.state
        if not rec.closed and not stream_open and state == "STREAMING":
            state = "IDLE"  # the stream ended an instant ago (its end writes IDLE right after the lock goes)
        return pb.SessionInfo(
            session_id=rec.session_id, state=_STATES.get(state, pb.SESSION_STATE_UNSPECIFIED),
            geometry=self._geometry(), created_at_unix_ms=rec.created_ms, counters=_counters(rec),
            effective_options=self._options_proto(rec.options) if rec.options else None,
            last_audio_at_unix_ms=rec.last_audio_ms, closed_at_unix_ms=rec.closed_ms, stream_open=stream_open,
            error=rec.error if state == "FAILED" else "")

    async def CloseSession(self, request: pb.CloseSessionRequest, grpc_context=None) -> pb.CloseSessionResponse:
        try:
            self._check_request(request, grpc_context)
            await self._authorize(request.session_id, request.session_token)
            rec = await self._close_session(request.session_id, "closed")
        except (ApiError, RedisUnavailableError) as exc:
            apply_to_context(grpc_context, self._api_error(exc))
            return pb.CloseSessionResponse()
        return pb.CloseSessionResponse(counters=_counters(rec), duration_ms=max(0, rec.closed_ms - rec.created_ms))

    async def _close_session(self, sid: str, code: str) -> SessionRecord:
        """Close `sid` (CloseSession: `closed`; the idle timeout: `idle_timeout`) and return its tombstone, whose
        counters are the session's final totals. Idempotent: a closed session returns the same tombstone.

        An open stream, on this gateway replica or another, is asked to end first (END_OF_STREAM `code`, then OK)
        through the session's `close_req`, which that stream's sync task reads every `timeouts.stream_sync_s`. The
        close waits for that stream to write its counters and release its lock, at most `timeouts.close_wait_s` (a
        gateway that died with the lock does not block it), then turns the session into its tombstone and deletes
        every other key of it in one atomic step, and frees its capacity."""
        registry, store, _ = self._clients()
        if await store.stream_open(sid):
            # one path wherever the stream runs (this replica included): its sync task reads the request
            await store.request_close(sid, code)
            deadline = time.monotonic() + self.timeouts.close_wait_s
            while await store.stream_open(sid):
                if time.monotonic() >= deadline:
                    log.warning("session %s: its stream did not end within %g s (timeouts.close_wait_s); closing it "
                                "regardless", sid, self.timeouts.close_wait_s)
                    break
                await asyncio.sleep(min(self.timeouts.stream_sync_s, max(0.0, deadline - time.monotonic())))
        closed = await store.finalize_close(sid)
        if closed is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"unknown session {sid!r}")
        rec, now = closed
        await self._release_route(sid)  # idempotent: a second close finds no route
        if now:
            await self.auth.session_closed(sid)
            if code == "closed":
                self._count("avatarserve_session_closes")
            log.info("session %s closed (%s)", sid, code)
        return rec

    async def check_health(self) -> None:
        """Serve's periodic replica health check: also starts this replica's idle sweep before its first request."""
        self._clients()

    def _api_error(self, exc: BaseException) -> ApiError:
        """An RPC's error as the API answers it: Redis unreachable -> UNAVAILABLE + retry-after-ms (api/errors.py)."""
        if isinstance(exc, RedisUnavailableError):
            return from_redis_unavailable(exc, self.timeouts.redis.retry_after_ms)
        return exc

    def _redis_warning(self, what: str, exc: BaseException) -> None:
        """Log a failure, but an unreachable Redis only once per outage (the store's outage log)."""
        if is_unavailable(exc):
            self._clients()[1].outage.failed(exc)
        else:
            log.warning("%s: %s", what, exc)

    async def _sweep_idle(self) -> None:
        """Every `timeouts.idle_sweep_s`: close the sessions past their idle timeout (IdleOptions.idle_timeout_s,
        counted from creation or the last audio). Each gateway replica sweeps; a session is claimed atomically (it
        leaves the store's idle index as it is claimed), so only one closes it. A claimed session that had audio
        after all (its stream's last sync moved the deadline an instant too late) goes back into the index."""
        _, store, _ = self._clients()
        while not cancel_requested():
            await asyncio.sleep(self.timeouts.idle_sweep_s)
            try:
                claimed = await store.claim_idle()
            except Exception as exc:  # noqa: BLE001 - Redis hiccup: the next sweep retries
                self._redis_warning("idle sweep failed", exc)
                continue
            if claimed:  # each close may wait for a stream to end: close them side by side
                await asyncio.gather(*(self._close_idle(sid) for sid in claimed))

    async def _close_idle(self, sid: str) -> None:
        _, store, _ = self._clients()
        try:
            rec = await store.get_session(sid)
            if rec is not None and not rec.closed and rec.idle_deadline_ms > int(time.time() * 1000):
                await store.set_idle_deadline(sid, rec.idle_deadline_ms)
                return
            try:
                await self._close_session(sid, "idle_timeout")
            except ApiError:  # its keys expired meanwhile: free what may still hold capacity
                await self._release_route(sid)
        except Exception as exc:  # noqa: BLE001 - one session's failure must not stop the sweep
            log.warning("session %s: idle close failed: %s", sid, exc)
            try:
                await store.set_idle_deadline(sid, int(time.time() * 1000))  # claim it again at the next sweep
            except Exception:  # noqa: BLE001
                pass

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
            observer.idle_timeout_ms = lease.idle_timeout_ms
            async def client_gone() -> None:
                # The client cancelled: free the session now. Serve may have dropped this generator without
                # unwinding it (then nothing below runs until it is collected); the frees are idempotent.
                if self._streams.pop(lease.sid, None) is not None:
                    await observer.finish(False)
                await self._end_lease(lease)

            ctl = StreamController(lease.sid, settings, lease.pipe, on_block=observer, geometry=self._geometry(),
                                   base=lease.base, on_cancel=client_gone)
            observer.ctl = ctl
            self._streams[lease.sid] = (ctl, observer.meter)
            self._count("avatarserve_stream_starts")
            lease.streaming = True
            await observer.start()  # streams_opened, state and the sync task (live counters, close requests)
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
                        if ctl.end_reason == "idle_timeout":  # the idle timeout closes the session, not just the stream
                            try:
                                await self._close_session(lease.sid, "idle_timeout")
                            except Exception as exc:  # noqa: BLE001 - the idle sweep closes it instead
                                log.warning("session %s: closing it at its idle timeout failed: %s", lease.sid, exc)
                    yield msg
            finally:
                if self._streams.pop(lease.sid, None) is not None:
                    await observer.finish(completed)
        except StreamCancelled:
            self._count("avatarserve_stream_ends", code="CANCELLED")  # the client is gone: nothing more to send
            return
        except (ApiError, RedisUnavailableError) as exc:
            err = self._api_error(exc)
            if lease.streaming and err.code == grpc.StatusCode.INTERNAL:
                _, store, _ = self._clients()
                await store.fail(lease.sid, err.message)  # SessionInfo.error
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

    async def _first_request(self, it):
        """The stream's first message (None: an empty stream), within `timeouts.hello_s`; StreamCancelled when the
        client is already gone. Under Serve each message is a call to the proxy that holds the client's stream: one
        that never returns would hold this stream open (and its client waiting) forever."""
        fetch = asyncio.get_running_loop().create_task(next_request(it), name="hello")
        try:
            done, _ = await asyncio.wait({fetch}, timeout=self.timeouts.hello_s)
        finally:
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
        if not done:
            log.warning("a stream's first message did not arrive within timeouts.hello_s (%g s); ending it with "
                        "UNAVAILABLE", self.timeouts.hello_s)
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"the stream's first message (Hello) did not reach the server within "
                           f"{self.timeouts.hello_s:g} s; retry the stream")
        return fetch.result()

    async def _open_stream(self, it, lease: "_StreamLease") -> StreamSettings:
        """Hello -> authorized session, its stream lock, a live route and an open pipeline (recorded in `lease`)."""
        registry, store, client = self._clients()
        first = await self._first_request(it)
        if first is None:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "empty stream: the first message must be Hello")
        if isinstance(first, MalformedMessage):
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed first message: {first}")
        if first.WhichOneof("kind") != "hello":
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "the first message of a stream must be Hello")
        sid = first.hello.session_id
        rec = await self._authorize(sid, first.hello.session_token)
        if rec.closed or rec.state in ("CLOSED", "FAILED"):
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, f"session {sid!r} is {rec.state}")
        if rec.close_req:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, f"session {sid!r} is closing ({rec.close_req})")
        await self._refuse_while_draining(store)
        # Recorded before Redis is asked: a cancel can land after Redis set the lock but before its reply arrives,
        # and the lease's end must still free it. The name is this stream's own, so that freeing a lock this stream
        # may not hold never frees another stream's (compare-and-delete).
        lease.lock = (sid, f"{self.replica_id}/{secrets.token_hex(6)}")
        if not await store.acquire_stream_lock(*lease.lock):
            lease.lock = None
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, f"a stream is already open for session {sid!r}")
        lease.sid = sid
        rec = await store.get_session(sid)  # closed while we took the lock?
        if rec is None or rec.closed or rec.close_req:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, f"session {sid!r} is CLOSED")
        lease.base = Counters(**{f: rec.counters[f] for f in SESSION_FIELDS})
        lease.idle_timeout_ms = rec.idle_timeout_ms
        await self.auth.stream_opened(sid)  # the key's session-seconds quota; meters the stream
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
            return_audio=bool(opts.get("return_audio", False)),
            idle_since_s=max(0.0, time.time() - max(rec.created_ms, rec.last_audio_ms) / 1000.0),
            block_base=rec.next_block, behind_realtime_s=self.app.late_after_s,
            warning_interval_s=self.app.warning_interval_s)
        lease.route = route
        try:
            lease.pipe = await self._open_pipe(lease, opts)
        except PipelineError as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, f"could not open the pipeline: {exc.message}") from exc
        # From here on the stream rides out a Redis outage: its session and route are held in memory.
        await store.track(sid, lease.lock[1])
        registry.track_route(sid, route, ttl_s=self.session_ttl_s)
        return settings

    async def _open_pipe(self, lease: "_StreamLease", opts: Dict[str, Any]) -> RecoveringPipe:
        """The stream's pipe through `lease.route`; with `recovery.enabled` it survives the loss of a replica (the
        lost hop is re-placed and the session rebuilt at the new replica, serve/dataplane/recovery.py)."""
        registry, _, client = self._clients()
        sid, rc = lease.sid, self.app.recovery

        async def open_at(start_block: Optional[int]) -> PipelineSession:
            config = opts if start_block is None else dict(opts, **{START_BLOCK_KEY: start_block})
            return await client.open(sid, [h.address for h in lease.route], json.dumps(config).encode())

        async def reroute(err: PipelineError) -> None:
            lease.route = await self._reroute(registry, sid, lease.route, err)
            registry.track_route(sid, lease.route, ttl_s=self.session_ttl_s)

        def recovered(rec: Recovery) -> None:
            stage = _deployment_at(lease.route, rec.lost_hop) if rec.lost_hop else "stalled"
            self._count("avatarserve_session_recoveries", stage=stage)

        def replay_blocks(lost_hop: str) -> int:
            role = self.app.role_of(_deployment_at(lease.route, lost_hop))
            return getattr(rc.replay_blocks, role, rc.replay_blocks.most())

        pipe = RecoveringPipe(sid, open_at, reroute, replay_blocks=replay_blocks, max_replay=rc.replay_blocks.most(),
                              max_recoveries=rc.max_recoveries if rc.enabled else 0, on_recovery=recovered,
                              stall_s=rc.stall_s if rc.enabled else None, end_wait_s=self.timeouts.pipe_end_s)
        return await pipe.open()

    async def _reroute(self, registry: ReplicaRegistry, sid: str, route: List[RouteHop],
                       err: PipelineError) -> List[RouteHop]:
        """A hop of `route` was lost: keep it if its replica still answers (only the stream broke), else remove the
        replica from the registry and move the session to another one (admission parks while a replacement
        starts). Raises ApiError UNAVAILABLE (+ retry hint) when no replica can take the session."""
        hop = next((h for h in route if h.address == err.lost_hop), None)
        if hop is None:
            raise err
        if await _reachable(hop.address, self.app.recovery.probe_timeout_s):
            log.warning("session %s: the stream to %s (%s) broke but the replica answers; reopening on it", sid,
                        hop.deployment, hop.address)
            return route
        log.warning("session %s: %s replica %s at %s is gone; moving the session", sid, hop.deployment, hop.replica_id,
                    hop.address)
        await registry.deregister(hop.deployment, hop.replica_id)
        try:
            return await self.admission.place_route(registry, sid, route)
        except AdmissionRefused as exc:
            raise ApiError(grpc.StatusCode.UNAVAILABLE,
                           f"lost the session's {hop.deployment} replica and no other can take the session: {exc}",
                           {"retry-after-ms": str(exc.retry_after_ms)}) from exc

    def stop_streams(self) -> int:
        """This replica is being stopped: refuse new streams and sessions here (UNAVAILABLE with a retry hint, so
        clients go to another replica), and end every open stream like a cluster drain does: what its client sent
        is delivered, then DRAINED and END_OF_STREAM `server_draining`. Returns the streams told to end; call it on
        the loop that runs them. Idempotent."""
        self.stopping = True
        for ctl, _ in list(self._streams.values()):
            ctl.request_end("server_draining", drain=True)
        return len(self._streams)

    async def _watch_stop(self) -> None:
        """Every `timeouts.stop_poll_s`: has this replica's stop begun? Then drain its streams (and keep ending any
        that a router still sent here)."""
        announced = False
        while True:
            await asyncio.sleep(self.timeouts.stop_poll_s)
            try:
                if not self.stop_probe():
                    continue
            except Exception as exc:  # noqa: BLE001 - a probe that fails says nothing; never let it kill the watch
                log.warning("gateway %s: stop probe failed: %s", self.replica_id, exc)
                continue
            n = self.stop_streams()
            if not announced:
                announced = True
                log.warning("gateway %s is being stopped: %d open stream(s) drain and end with server_draining",
                            self.replica_id, n)

    async def _refuse_while_draining(self, store: SessionStore) -> None:
        if self.stopping:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "this gateway replica is being stopped: retry, another one "
                           "takes the request", {"retry-after-ms": str(self.app.retry_after_ms)})
        left_ms = await store.draining_ms()
        if left_ms:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the server is draining (it is being stopped): open the "
                           "session on another server, or retry once this one is back",
                           {"retry-after-ms": str(left_ms)})

    async def _end_lease(self, lease: "_StreamLease") -> None:
        """Free what an opened stream holds: keepalive, pipeline, stream lock (the session's TTL restarts now).
        Idempotent, and done to the end even when the caller is cancelled (a cancelled client's stream is torn down
        from several tasks at once, and Serve cancels them): a half-done release would keep the stream lock."""
        if lease.ending is None:
            lease.ending = asyncio.get_running_loop().create_task(self._free_lease(lease), name=f"{lease.sid}/end")
            self._teardowns.add(lease.ending)
            lease.ending.add_done_callback(self._teardowns.discard)
        await asyncio.shield(lease.ending)

    async def _free_lease(self, lease: "_StreamLease") -> None:
        _, store, _ = self._clients()
        if lease.keepalive is not None:
            lease.keepalive.cancel()
            await asyncio.gather(lease.keepalive, return_exceptions=True)
        if lease.pipe is not None:
            # Ended cleanly in the background (blocks in flight finish, bounded by recovery.close_drain_s), so every
            # replica frees the session now instead of keeping it for a reopen.
            closing = asyncio.get_running_loop().create_task(
                lease.pipe.close(self.app.recovery.close_drain_s), name=f"{lease.sid}/pipe-close")
            self._teardowns.add(closing)
            closing.add_done_callback(self._teardowns.discard)
        if lease.sid is not None:
            try:  # the session's TTL counts from the end of its last stream
                await self._touch_session(lease.sid)
            except Exception as exc:  # noqa: BLE001 - the keys still expire on their previous TTL
                self._redis_warning(f"session {lease.sid}: TTL refresh at stream end failed", exc)
            await self.auth.stream_closed(lease.sid)
        if lease.lock is not None:
            sid, owner = lease.lock
            try:  # a tracked session's release is written behind (and back) during a Redis outage
                await store.release_stream_lock(sid, owner)
            except RedisUnavailableError as exc:  # never tracked: the lock expires with its TTL
                self._redis_warning(f"session {sid}: stream lock release failed", exc)
        if lease.sid is not None:
            store.untrack(lease.sid)
            self._clients()[0].untrack_route(lease.sid)

    async def _touch_session(self, sid: str) -> bool:
        registry, store, _ = self._clients()
        alive = await store.touch(sid)
        await registry.touch_route(sid, self.session_ttl_s)
        await registry.touch_admission(sid, self.deployments, self.session_ttl_s)
        if alive:
            await self.auth.touch_session(sid)
        return alive

    async def _keep_session_alive(self, sid: str) -> None:
        """While a stream is open, restart the TTL of every key of its session well before it runs out."""
        period = self.session_ttl_s / 3
        while not cancel_requested():  # stopped by a cancel, which a Redis call may swallow
            await asyncio.sleep(period)
            try:
                if not await self._touch_session(sid):
                    log.warning("session %s: its keys expired while streaming (session_ttl_s %g s)", sid,
                                self.session_ttl_s)
            except Exception as exc:  # noqa: BLE001 - retried at the next period; the stream itself goes on
                self._redis_warning(f"session {sid}: TTL refresh failed", exc)


@dataclass
class _StreamLease:
    """What one StreamSession holds once it got that far (freed by `Gateway._end_lease`)."""

    sid: Optional[str] = None  # set once the stream lock is held
    lock: Optional[tuple[str, str]] = None  # (session, this stream's lock name) from the moment Redis is asked for it
    keepalive: Optional[asyncio.Task] = None
    pipe: Optional[RecoveringPipe] = None
    route: List[RouteHop] = field(default_factory=list)  # the stream's current route (changes when a hop is re-placed)
    streaming: bool = False  # the controller runs: an INTERNAL error now marks the session FAILED
    ending: Optional[asyncio.Task] = None  # `Gateway._end_lease`'s release (runs once)
    base: Optional[Counters] = None  # the session's counters when the stream opened (its earlier streams)
    idle_timeout_ms: int = 0


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
        self._flushed: Dict[str, int] = {}  # this stream's counters as last written to the session
        self._flushed_audio_ms = 0
        self._sync: Optional[asyncio.Task] = None
        self.idle_timeout_ms = 0  # the session's idle timeout: last audio + this = its idle deadline

    # ----- the session's live view in the store (GetSession, CloseSession, other gateway replicas) -------------
    async def start(self) -> None:
        await self.flush()  # streams_opened and the state, before STARTED
        self._sync = asyncio.get_running_loop().create_task(self._sync_loop(), name=f"{self.sid}/sync")

    async def flush(self, *, final: bool = False) -> Optional[str]:
        """Write what changed since the last flush: counter deltas, state, last audio (and the idle deadline it
        moves), the session's next block index. Returns a pending close request's code, if any."""
        ctl = self.ctl
        now = ctl.counters.as_dict()
        deltas = {k: v - self._flushed.get(k, 0) for k, v in now.items()}
        self._flushed = now
        fields: Dict[str, Any] = {"next_block": ctl.next_session_block}
        if not final:
            fields["state"] = "STREAMING" if ctl.speaking else "IDLE"
        elif ctl.end_reason not in ("closed", "idle_timeout"):  # a closing session goes to CLOSED, not IDLE
            fields["state"] = "IDLE"
        deadline = 0
        if ctl.last_audio_wall_ms > self._flushed_audio_ms:
            self._flushed_audio_ms = ctl.last_audio_wall_ms
            fields["last_audio_ms"] = ctl.last_audio_wall_ms
            if self.idle_timeout_ms:
                deadline = ctl.last_audio_wall_ms + self.idle_timeout_ms
        try:
            return await self.store.sync_stream(self.sid, deltas=deltas, fields=fields, idle_deadline_ms=deadline)
        except BaseException:
            self._flushed = {k: v - deltas[k] for k, v in now.items()}  # written at the next flush instead
            raise

    async def _sync_loop(self) -> None:
        """Every `timeouts.stream_sync_s`: flush, and end the stream when a close was requested (CloseSession or the
        idle sweep, on any gateway replica). Stopped by `finish()`'s cancel, which a Redis call may swallow: then the
        loop ends at its next check (a stream whose sync kept running never sent its END_OF_STREAM)."""
        while not cancel_requested():
            await asyncio.sleep(self.gw.timeouts.stream_sync_s)
            try:
                code = await self.flush()
            except Exception as exc:  # noqa: BLE001 - retried at the next period; the stream itself goes on
                log.warning("session %s: stream sync failed: %s", self.sid, exc)
                continue
            if code:
                self.ctl.request_end(code, drain=code in DRAINING_ENDS)

    async def __call__(self, stats: dict) -> None:
        m, delivered, frames = self.gw.metrics, stats["delivered"], stats["frames"]
        self.meter.generated(frames)
        if delivered:
            self.meter.delivered(frames)
        code = await self.flush()
        if code:
            self.ctl.request_end(code, drain=code in DRAINING_ENDS)
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
        """The stream ended (any way): stop syncing, write its final counters and state (IDLE: stream_open goes
        false with the lock, released right after)."""
        c, m = self.ctl.counters, self.gw.metrics
        if self._sync is not None:
            self._sync.cancel()
            await asyncio.gather(self._sync, return_exceptions=True)
        if m is not None:
            sr = float(self.gw.stream.sample_rate)
            m.inc("avatarserve_audio_dropped_seconds", c.audio_samples_late / sr, reason="late")
            m.inc("avatarserve_audio_dropped_seconds", c.audio_samples_discarded / sr, reason="interrupt")
            if completed:
                m.inc("avatarserve_stream_ends", code="OK")
        try:
            await self.flush(final=True)
        except Exception as exc:  # noqa: BLE001 - the stream's end must still free the session
            log.warning("session %s: writing the stream's final counters failed: %s", self.sid, exc)


def _counters(rec: SessionRecord) -> pb.SessionCounters:
    """Session counters stored in Redis (named as SessionCounters' fields) -> the API message."""
    return pb.SessionCounters(**{f: rec.counters[f] for f in SESSION_FIELDS})


def _last_line(msg: str) -> str:
    lines = [l.strip() for l in msg.strip().splitlines() if l.strip()]
    return lines[-1] if lines else msg


def _deployment_at(route: List[RouteHop], address: str) -> str:
    return next((h.deployment for h in route if h.address == address), "unknown")


async def _reachable(address: str, timeout_s: float) -> bool:
    """Does anything accept a TCP connection at host:port within `timeout_s`? (A killed replica's port refuses.)"""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout_s)
    except (OSError, asyncio.TimeoutError, ValueError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True
