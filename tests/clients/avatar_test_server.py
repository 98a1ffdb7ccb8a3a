"""A small, deterministic AvatarService on a real grpc.aio server, for SDK tests.

It follows the public protocol (Hello first, seq/pts rules, blocks of `samples_per_block`,
INTERRUPT, END_OF_INPUT -> DRAINED -> END_OF_STREAM, typed status codes) in
IDLE_MODE_WAIT_FOR_AUDIO fashion, but "generates" frames whose colour encodes the block:
    R = block_colour(block_index), G = 200 if idle else 50, B = 20 * frame_index.
It lives in tests/ on purpose: the real server is the Ray Serve application.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import grpc
import grpc.aio
import numpy as np
from PIL import Image

from avatarserve_client.v1 import avatar_service_pb2 as pb
from avatarserve_client.v1 import avatar_service_pb2_grpc as pb_grpc

FPS = 25
FRAMES_PER_BLOCK = 12
SAMPLE_RATE = 16000
SAMPLES_PER_BLOCK = SAMPLE_RATE * FRAMES_PER_BLOCK // FPS  # 7680
BLOCK_MS = 1000 * FRAMES_PER_BLOCK // FPS  # 480
MAX_CHUNK_SAMPLES = SAMPLE_RATE  # 1 s
_CLOSE = object()
_HALF_CLOSE = object()


def block_colour(block_index: int) -> int:
    return (block_index * 37 + 11) % 256


def frame_colour(block_index: int, frame_index: int, idle: bool) -> tuple[int, int, int]:
    return block_colour(block_index), 200 if idle else 50, 20 * frame_index


def encode_h264(frames: list[np.ndarray]) -> bytes:
    import av

    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height = frames[0].shape[1], frames[0].shape[0]
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = Fraction(1, FPS)
    ctx.framerate = Fraction(FPS)
    ctx.gop_size = len(frames)
    ctx.max_b_frames = 0
    ctx.options = {"preset": "ultrafast", "tune": "zerolatency"}
    out = bytearray()
    for i, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(f, format="rgb24")
        vf.pts = i
        for packet in ctx.encode(vf):
            out += bytes(packet)
    for packet in ctx.encode(None):
        out += bytes(packet)
    return bytes(out)


@dataclass
class _Session:
    session_id: str
    token: str
    width: int
    height: int
    formats: list[int]
    jpeg_quality: int
    encoding: int
    seed: int
    state: int = pb.SESSION_STATE_CREATED
    counters: pb.SessionCounters = field(default_factory=pb.SessionCounters)
    created_at_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    closed_at_ms: int = 0
    last_audio_ms: int = 0
    next_block_index: int = 0
    inbox: asyncio.Queue | None = None

    @property
    def stream_open(self) -> bool:
        return self.inbox is not None


class DeterministicAvatarService(pb_grpc.AvatarServiceServicer):
    def __init__(self) -> None:
        self.reset()

    def reset(self, *, max_sessions: int = 8, retry_after_ms: int | None = 1500,
              first_block_frames: int = FRAMES_PER_BLOCK, block_delay_s: float = 0.0,
              unavailable_streams: int = 0) -> None:
        self.sessions: dict[str, _Session] = {}
        # The next N StreamSession calls read their Hello, then end UNAVAILABLE before any reply (a gateway that
        # could not start the stream); `stream_attempts` counts every call with the Hello it carried.
        self.unavailable_streams = unavailable_streams
        self.stream_attempts: list[pb.ClientMessage] = []
        self.max_sessions = max_sessions
        self.retry_after_ms = retry_after_ms
        self.first_block_frames = first_block_frames
        self.block_delay_s = block_delay_s
        self.received_metadata: list[dict[str, str]] = []
        self.received_audio: dict[str, list[pb.AudioChunk]] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _record_md(self, context: grpc.aio.ServicerContext) -> None:
        self.received_metadata.append({k: v for k, v in context.invocation_metadata()})

    async def _auth(self, session_id: str, token: str, context: grpc.aio.ServicerContext) -> _Session:
        sess = self.sessions.get(session_id)
        if sess is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {session_id!r}")
        if not secrets.compare_digest(sess.token, token):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"session_token does not match session {session_id!r}")
        return sess

    # -- unary RPCs ------------------------------------------------------------------------

    async def CreateSession(self, request: pb.CreateSessionRequest, context: Any) -> pb.CreateSessionResponse:
        self._record_md(context)
        try:
            with Image.open(io.BytesIO(request.reference_image)) as img:
                img.load()
                if img.format not in ("PNG", "JPEG"):
                    raise ValueError(f"format {img.format}")
        except Exception as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"reference_image is not a decodable PNG/JPEG: {exc}")
        o = request.options
        if o.audio_format.sample_rate_hz not in (0, SAMPLE_RATE):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"audio sample_rate_hz {o.audio_format.sample_rate_hz} unsupported; "
                                f"only {SAMPLE_RATE} is accepted")
        if o.audio_format.channels not in (0, 1):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only mono audio is accepted")
        if (o.width == 0) != (o.height == 0) or o.width % 8 or o.height % 8:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unsupported size {o.width}x{o.height} (multiples of 8, both or neither)")
        active = sum(s.state not in (pb.SESSION_STATE_CLOSED, pb.SESSION_STATE_FAILED)
                     for s in self.sessions.values())
        if active >= self.max_sessions:
            if self.retry_after_ms is not None:
                context.set_trailing_metadata((("retry-after-ms", str(self.retry_after_ms)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"all {self.max_sessions} session slots are busy")
        formats = [f for f in o.output_formats if f != pb.OUTPUT_FORMAT_UNSPECIFIED] or [pb.OUTPUT_FORMAT_JPEG]
        sess = _Session(session_id=secrets.token_hex(8), token=secrets.token_urlsafe(16),
                        width=o.width or 32, height=o.height or 24, formats=formats,
                        jpeg_quality=o.jpeg_quality or 90,
                        encoding=o.audio_format.encoding or pb.AUDIO_ENCODING_PCM_S16LE,
                        seed=o.seed if o.HasField("seed") else 1234)
        self.sessions[sess.session_id] = sess
        self.received_audio[sess.session_id] = []
        return pb.CreateSessionResponse(session_id=sess.session_id, session_token=sess.token,
                                        geometry=self._geometry(sess),
                                        effective_options=self._options(sess))

    def _geometry(self, s: _Session) -> pb.SessionGeometry:
        return pb.SessionGeometry(fps=FPS, frames_per_block=FRAMES_PER_BLOCK, sample_rate=SAMPLE_RATE,
                                  samples_per_block=SAMPLES_PER_BLOCK, width=s.width, height=s.height)

    def _options(self, s: _Session) -> pb.SessionOptions:
        return pb.SessionOptions(width=s.width, height=s.height, seed=s.seed, output_formats=s.formats,
                                 jpeg_quality=s.jpeg_quality,
                                 audio_format=pb.AudioFormat(encoding=s.encoding,
                                                             sample_rate_hz=SAMPLE_RATE, channels=1),
                                 idle=pb.IdleOptions(mode=pb.IDLE_MODE_WAIT_FOR_AUDIO,
                                                     fill_grace_ms=200, idle_timeout_s=300))

    async def GetSession(self, request: pb.GetSessionRequest, context: Any) -> pb.SessionInfo:
        self._record_md(context)
        s = await self._auth(request.session_id, request.session_token, context)
        return pb.SessionInfo(session_id=s.session_id, state=s.state, counters=s.counters,
                              geometry=self._geometry(s), effective_options=self._options(s),
                              created_at_unix_ms=s.created_at_ms, last_audio_at_unix_ms=s.last_audio_ms,
                              closed_at_unix_ms=s.closed_at_ms, stream_open=s.stream_open)

    async def CloseSession(self, request: pb.CloseSessionRequest, context: Any) -> pb.CloseSessionResponse:
        self._record_md(context)
        s = await self._auth(request.session_id, request.session_token, context)
        if s.state != pb.SESSION_STATE_CLOSED:
            s.state = pb.SESSION_STATE_CLOSED
            s.closed_at_ms = int(time.time() * 1000)
            if s.inbox is not None:
                await s.inbox.put(_CLOSE)
        return pb.CloseSessionResponse(counters=s.counters,
                                       duration_ms=max(0, s.closed_at_ms - s.created_at_ms))

    # -- streaming -------------------------------------------------------------------------

    def _status(self, s: _Session, kind: int, pts_ms: int, message: str = "", code: str = "",
                geometry: bool = False) -> pb.ServerMessage:
        ev = pb.StatusEvent(kind=kind, message=message, code=code, pts_ms=pts_ms,
                            block_index=s.next_block_index, counters=s.counters)
        if geometry:
            ev.geometry.CopyFrom(self._geometry(s))
        return pb.ServerMessage(status=ev)

    def _make_block(self, s: _Session, pcm: np.ndarray, pts_ms: int, num_frames: int) -> pb.ServerMessage:
        idle = not np.any(pcm)
        idx = s.next_block_index
        frames = [np.full((s.height, s.width, 3), frame_colour(idx, i, idle), dtype=np.uint8)
                  for i in range(num_frames)]
        chunk = pb.VideoChunk(block_index=idx, pts_ms=pts_ms, duration_ms=BLOCK_MS, is_idle=idle,
                              width=s.width, height=s.height, num_frames=num_frames)
        if pb.OUTPUT_FORMAT_JPEG in s.formats:
            for f in frames:
                buf = io.BytesIO()
                Image.fromarray(f).save(buf, format="JPEG", quality=s.jpeg_quality)
                chunk.jpeg_frames.append(buf.getvalue())
        if pb.OUTPUT_FORMAT_H264 in s.formats:
            chunk.h264 = encode_h264(frames)
        s.next_block_index += 1
        s.counters.blocks_generated += 1
        s.counters.blocks_delivered += 1
        s.counters.frames_delivered += num_frames
        s.counters.idle_blocks_delivered += int(idle)
        return pb.ServerMessage(video=chunk)

    async def StreamSession(self, request_iterator: Any, context: Any):
        self._record_md(context)
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty stream: send Hello first")
        if first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the first message must be hello, got {first.WhichOneof('kind')}")
        s = await self._auth(first.hello.session_id, first.hello.session_token, context)
        self.stream_attempts.append(first)
        if self.unavailable_streams > 0:
            self.unavailable_streams -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the stream could not start here; retry it")
        if s.state in (pb.SESSION_STATE_CLOSED, pb.SESSION_STATE_FAILED):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"session {s.session_id} is {pb.SessionState.Name(s.state)}")
        if s.stream_open:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"a stream is already open for session {s.session_id}")
        # Bounded: a slow consumer pushes back through gRPC flow control to the client.
        inbox: asyncio.Queue = asyncio.Queue(maxsize=2)
        s.inbox = inbox
        s.state = pb.SESSION_STATE_IDLE
        s.counters.streams_opened += 1

        async def read() -> None:
            try:
                async for msg in requests:
                    await inbox.put(msg)
            finally:
                await inbox.put(_HALF_CLOSE)

        reader = asyncio.create_task(read())
        spb = SAMPLES_PER_BLOCK
        sample_size = 4 if s.encoding == pb.AUDIO_ENCODING_PCM_F32LE else 2
        buf = np.zeros(0, dtype=np.float32)
        buf_start = 0  # stream-clock sample of buf[0]
        end_sample = 0  # end of all audio received on this stream
        last_seq = -1
        prev_idle: bool | None = None
        first_block = s.next_block_index == 0
        try:
            yield self._status(s, pb.StatusEvent.KIND_STARTED, 0, "stream started", geometry=True)
            while True:
                msg = await inbox.get()
                if msg is _CLOSE:
                    yield self._status(s, pb.StatusEvent.KIND_END_OF_STREAM, end_sample * 1000 // SAMPLE_RATE,
                                       "session closed", "closed")
                    return
                kind = None if msg is _HALF_CLOSE else msg.WhichOneof("kind")
                if kind == "hello":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hello is only allowed first")
                if kind == "audio":
                    a = msg.audio
                    if len(a.pcm) % sample_size:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            f"audio seq={a.seq}: {len(a.pcm)} bytes is not a multiple "
                                            f"of the {sample_size}-byte sample")
                    if int(a.seq) <= last_seq:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            f"audio seq={a.seq} does not increase (last {last_seq})")
                    if a.pts_ms < end_sample * 1000 // SAMPLE_RATE - 1:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            f"audio seq={a.seq} pts_ms={a.pts_ms} overlaps audio already "
                                            f"received (ends at {end_sample * 1000 // SAMPLE_RATE} ms)")
                    if sample_size == 2:
                        samples = np.frombuffer(a.pcm, dtype="<i2").astype(np.float32) / 32768.0
                    else:
                        samples = np.frombuffer(a.pcm, dtype="<f4").astype(np.float32)
                        if not np.all(np.isfinite(samples)):
                            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                                f"audio seq={a.seq} contains NaN/Inf")
                    if samples.size > MAX_CHUNK_SAMPLES:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            f"audio seq={a.seq} is longer than 1000 ms")
                    last_seq = int(a.seq)
                    start = max(end_sample, a.pts_ms * SAMPLE_RATE // 1000)
                    if start > end_sample:  # a gap on the clock: fill with silence
                        buf = np.concatenate([buf, np.zeros(start - end_sample, np.float32)])
                    buf = np.concatenate([buf, samples])
                    end_sample = start + samples.size
                    self.received_audio[s.session_id].append(a)
                    s.counters.audio_chunks_received += 1
                    s.counters.audio_samples_received += samples.size
                    s.last_audio_ms = int(time.time() * 1000)
                elif kind == "control" and msg.control.kind == pb.Control.KIND_INTERRUPT:
                    s.counters.interrupts += 1
                    s.counters.audio_samples_discarded += buf.size
                    # Blocks restart at the end of the audio received so far.
                    buf, buf_start = np.zeros(0, np.float32), end_sample
                    yield self._status(s, pb.StatusEvent.KIND_INTERRUPTED, end_sample * 1000 // SAMPLE_RATE,
                                       "interrupted")
                    if prev_idle is False:
                        prev_idle = True
                        yield self._status(s, pb.StatusEvent.KIND_IDLE, end_sample * 1000 // SAMPLE_RATE)
                    continue
                eoi = msg is _HALF_CLOSE or (kind == "control" and msg.control.kind == pb.Control.KIND_END_OF_INPUT)
                if eoi and buf.size % spb:
                    buf = np.concatenate([buf, np.zeros(spb - buf.size % spb, np.float32)])
                while buf.size >= spb:
                    block, buf = buf[:spb], buf[spb:]
                    pts_ms = buf_start * 1000 // SAMPLE_RATE
                    buf_start += spb
                    idle = not np.any(block)
                    if idle != prev_idle:
                        prev_idle = idle
                        s.state = pb.SESSION_STATE_IDLE if idle else pb.SESSION_STATE_STREAMING
                        yield self._status(s, pb.StatusEvent.KIND_IDLE if idle else pb.StatusEvent.KIND_SPEAKING,
                                           pts_ms)
                    frames = self.first_block_frames if first_block else FRAMES_PER_BLOCK
                    first_block = False
                    if self.block_delay_s:
                        await asyncio.sleep(self.block_delay_s)
                    yield self._make_block(s, block, pts_ms, frames)
                if eoi:
                    pts = end_sample * 1000 // SAMPLE_RATE
                    yield self._status(s, pb.StatusEvent.KIND_DRAINED, pts, "all audio delivered")
                    yield self._status(s, pb.StatusEvent.KIND_END_OF_STREAM, pts, "end of input",
                                       "end_of_input")
                    return
        finally:
            reader.cancel()
            s.inbox = None
            if s.state == pb.SESSION_STATE_STREAMING:
                s.state = pb.SESSION_STATE_IDLE


class ServerThread:
    """Runs a grpc.aio server with the service on its own event loop in a daemon thread."""

    def __init__(self, service: DeterministicAvatarService) -> None:
        self.service = service
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="avatar-test-server",
                                        daemon=True)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "ServerThread":
        self._thread.start()

        async def start() -> None:
            # A small, fixed flow-control window so back-pressure reaches the client quickly.
            self.server = grpc.aio.server(options=[("grpc.http2.bdp_probe", 0),
                                                   ("grpc.http2.lookahead_bytes", 16384)])
            pb_grpc.add_AvatarServiceServicer_to_server(self.service, self.server)
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()

        self.call(start())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset(self, **kwargs: Any) -> None:
        async def reset() -> None:
            self.service.reset(**kwargs)

        self.call(reset())

    def stop(self) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()
