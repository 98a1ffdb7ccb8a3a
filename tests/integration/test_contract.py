"""Conformance of the public API to its contract (protos/avatarserve/v1/avatar_service.proto), field by field.

The client here is built only from the generated modules (avatarserve_client.v1.avatar_service_pb2 / _pb2_grpc) and
raw grpc, as a third party would write it from the .proto; no SDK. It runs against the real cluster (`cluster`: Ray
Serve gRPC proxy, gateway, stage replicas, redis-server). Idle timeouts are 1-2 s and the cluster sweeps every second,
so the module takes a few minutes on a 2-core machine (most of it generating video).

Checked (field / behaviour -> test):
- CreateSessionResponse: session_id (non-empty, URL-safe ASCII), session_token (non-empty), geometry (fps 25,
  frames_per_block 12, sample_rate 16000, samples_per_block = frames_per_block / fps * sample_rate, width/height > 0),
  effective_options (seed always set; a given seed echoed; output_formats [JPEG] by default; jpeg_quality 85; audio
  format s16le / 16000 / 1; idle mode FILL_SILENCE, fill_grace_ms 200, idle_timeout_s 300; width/height = geometry)
  -> test_create_session_geometry_and_effective_options
- SessionInfo after create: state CREATED, stream_open false, counters all 0, geometry, effective_options (= create's,
  seed set), created_at_unix_ms within the call, last_audio_at_unix_ms 0, closed_at_unix_ms 0, error ""
  -> test_create_session_geometry_and_effective_options
- StreamSession: STARTED first (geometry = create's, pts_ms 0, block_index = next block of the session, counters with
  streams_opened); VideoChunk block_index consecutive, pts_ms tiling the stream clock in 480 ms spans from 0 on every
  stream, duration_ms 480, num_frames = len(jpeg_frames) (12, the very first block of a session may have fewer),
  width/height = geometry, JPEG frames, h264 unset and audio_pcm empty when not requested, is_idle false for speech;
  SPEAKING before the first speech block; DRAINED then END_OF_STREAM with code `end_of_input` (END_OF_STREAM last),
  then status OK; event counters never decrease; the END_OF_STREAM counters equal GetSession's afterwards
  -> test_two_streams_counters_block_index_and_close
- SessionCounters (all 10): audio_samples_received, audio_chunks_received, blocks_generated, blocks_delivered,
  idle_blocks_delivered, frames_delivered (= sum of num_frames), streams_opened (per stream), interrupts and
  audio_samples_discarded (INTERRUPT), audio_samples_late (late audio), as session totals over all streams, in
  events, in GetSession (live during a stream) and in CloseSession's summary
  -> test_two_streams_counters_block_index_and_close, test_interrupt_counters, test_late_audio_warning
- block_index is per session: the second stream continues where the first stopped; pts_ms restarts at 0
  -> test_two_streams_counters_block_index_and_close
- GetSession during a stream: stream_open true, state STREAMING while speaking, counters live (audio received so
  far), last_audio_at_unix_ms set; after the stream: stream_open false, state IDLE
  -> test_two_streams_counters_block_index_and_close
- CloseSession: counters = final totals (including an open stream's audio), duration_ms = closed_at - created_at;
  a second CloseSession returns the same summary; GetSession then says CLOSED with closed_at_unix_ms; a new stream
  gets FAILED_PRECONDITION; no Redis key of the session remains but its tombstone, its capacity is released
  -> test_two_streams_counters_block_index_and_close
- CloseSession ends an open stream: END_OF_STREAM code `closed` is the stream's last message, then status OK
  -> test_close_session_ends_an_open_stream
- Idle timeout (IdleOptions.idle_timeout_s): a session that never streams becomes CLOSED (closed_at set, capacity
  released, only the tombstone left); an open stream without audio gets END_OF_STREAM `idle_timeout` and the session
  is CLOSED -> test_idle_timeout_closes_the_session
- WARNING `audio_late` (fill mode) with audio_samples_late counted, and the filled blocks is_idle with IDLE before them
  -> test_late_audio_warning
- INTERRUPT: INTERRUPTED event, interrupts 1, audio_samples_discarded > 0 -> test_interrupt_counters
- The stream's state and lock are released at once when the call ends: a cancelled stream and an INVALID_ARGUMENT
  stream leave stream_open false and state IDLE, and a new stream opens right away
  -> test_a_cancelled_or_failed_stream_releases_the_session_at_once
- Error codes: INVALID_ARGUMENT for an empty, undecodable or too large reference image, unsupported width/height,
  width without height, jpeg_quality, output format, audio encoding, sample rate, channel count, a corrupt request
  (unary and stream, first and later message), a first message that is not Hello, a later Hello, a pcm byte count
  not a multiple of the sample size, NaN in f32le audio, a chunk over 1000 ms, a non-increasing seq, overlapping
  pts_ms; NOT_FOUND for an unknown session (Get, Close, Stream) and an `application` naming no running application;
  PERMISSION_DENIED for a wrong token (Get, Close, Stream); FAILED_PRECONDITION for a second stream and a closed
  session -> test_error_codes_unary, test_error_codes_stream
"""

from __future__ import annotations

import queue
import re
import threading
import time
from typing import Iterable, Iterator, List, Optional

import grpc
import numpy as np
import pytest
import redis

from avatarserve_client.v1 import avatar_service_pb2 as pb
from avatarserve_client.v1 import avatar_service_pb2_grpc as pb_grpc

from .conftest import APP, png

pytestmark = pytest.mark.integration

SR = 16000
SPB = 7680
NS = "itest:"  # the cluster fixture's session-store and registry namespaces
RPC_TIMEOUT = 120.0
STREAM_TIMEOUT = 600.0
WAIT_S = 60.0  # bound of every wait on a server-side condition (a busy 2-core machine is slow, not broken)
EV = pb.StatusEvent


# ------------------------------------------------------------------------------------ a client from the .proto only


@pytest.fixture(scope="module")
def api(cluster):
    channel = grpc.insecure_channel(cluster)
    yield Api(channel)
    channel.close()


@pytest.fixture(scope="module")
def rds(redis_server):
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    yield client
    client.close()


class Api:
    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub = pb_grpc.AvatarServiceStub(channel)

    @staticmethod
    def md(sid: str = "", app: str = APP) -> list:
        out = [("application", app)]
        if sid:
            out.append(("session_id", sid))
        return out

    def create(self, image: Optional[bytes] = None, **options) -> pb.CreateSessionResponse:
        req = pb.CreateSessionRequest(reference_image=png(7) if image is None else image, prompt="a person talking",
                                      options=pb.SessionOptions(**options))
        return self.stub.CreateSession(req, metadata=self.md(), timeout=RPC_TIMEOUT)

    def get(self, s: pb.CreateSessionResponse) -> pb.SessionInfo:
        return self.stub.GetSession(pb.GetSessionRequest(session_id=s.session_id, session_token=s.session_token),
                                    metadata=self.md(s.session_id), timeout=RPC_TIMEOUT)

    def close(self, s: pb.CreateSessionResponse) -> pb.CloseSessionResponse:
        return self.stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id, session_token=s.session_token),
                                      metadata=self.md(s.session_id), timeout=RPC_TIMEOUT)

    def stream(self, sid: str, requests: Iterable[pb.ClientMessage]):
        return self.stub.StreamSession(iter(requests), metadata=self.md(sid), timeout=STREAM_TIMEOUT)

    def run(self, s: pb.CreateSessionResponse, msgs: List[pb.ClientMessage]) -> List[pb.ServerMessage]:
        """A whole stream: Hello, `msgs`, then the half-close; every reply until the server ends the call OK."""
        return list(self.stream(s.session_id, [hello(s), *msgs]))


class LiveRequests:
    """A request stream the test writes into while the call runs (from the test's thread)."""

    def __init__(self, *first: pb.ClientMessage) -> None:
        self.q: "queue.Queue[Optional[pb.ClientMessage]]" = queue.Queue()
        for m in first:
            self.q.put(m)

    def send(self, *msgs: pb.ClientMessage) -> None:
        for m in msgs:
            self.q.put(m)

    def end(self) -> None:
        self.q.put(None)

    def __iter__(self) -> Iterator[pb.ClientMessage]:
        while (m := self.q.get()) is not None:
            yield m


class Reader:
    """Reads a streaming call's replies on a thread, so the test can wait for a reply while it sends."""

    def __init__(self, call) -> None:
        self.call = call
        self.out: List[pb.ServerMessage] = []
        self.error: Optional[grpc.RpcError] = None
        self._cv = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for m in self.call:
                with self._cv:
                    self.out.append(m)
                    self._cv.notify_all()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            with self._cv:
                self._done = True
                self._cv.notify_all()

    def wait_for(self, pred, what: str) -> None:
        with self._cv:
            ok = self._cv.wait_for(lambda: pred(self.out) or self._done, WAIT_S)
            assert ok and pred(self.out), f"never got {what}; got {[_describe(m) for m in self.out]} {self.error}"

    def join(self) -> List[pb.ServerMessage]:
        self._thread.join(STREAM_TIMEOUT)
        assert not self._thread.is_alive()
        return self.out


def hello(s: pb.CreateSessionResponse) -> pb.ClientMessage:
    return pb.ClientMessage(hello=pb.Hello(session_id=s.session_id, session_token=s.session_token))


def control(kind: int) -> pb.ClientMessage:
    return pb.ClientMessage(control=pb.Control(kind=kind))


END_OF_INPUT = control(pb.Control.KIND_END_OF_INPUT)
INTERRUPT = control(pb.Control.KIND_INTERRUPT)


def speech(blocks: float, seed: int = 0) -> np.ndarray:
    n = int(blocks * SPB)
    t = np.arange(n) / SR
    x = 0.4 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t + seed))
    return (x * 32767).astype("<i2")


def chunks(pcm: np.ndarray, chunk_ms: int = 160, seq0: int = 0, pts0: int = 0) -> List[pb.ClientMessage]:
    step = SR * chunk_ms // 1000
    return [pb.ClientMessage(audio=pb.AudioChunk(seq=seq0 + i, pts_ms=pts0 + i * chunk_ms,
                                                 pcm=pcm[off:off + step].tobytes()))
            for i, off in enumerate(range(0, len(pcm), step))]


def videos(msgs) -> List[pb.VideoChunk]:
    return [m.video for m in msgs if m.WhichOneof("kind") == "video"]


def events(msgs, kind: Optional[int] = None) -> List[pb.StatusEvent]:
    return [m.status for m in msgs if m.WhichOneof("kind") == "status" and (kind is None or m.status.kind == kind)]


def _describe(m: pb.ServerMessage) -> str:
    if m.WhichOneof("kind") == "video":
        return f"video#{m.video.block_index}@{m.video.pts_ms}"
    return f"{EV.Kind.Name(m.status.kind)}({m.status.code})"


def now_ms() -> int:
    return int(time.time() * 1000)


def wait_until(fn, what: str, timeout: float = WAIT_S):
    """Poll a server-side condition (GetSession, Redis) until `fn()` returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value


def check_end(msgs, code: str, *, drained: bool) -> pb.StatusEvent:
    """The call's last message is END_OF_STREAM with `code` (after DRAINED with the same code when `drained`)."""
    assert msgs[-1].WhichOneof("kind") == "status", _describe(msgs[-1])
    end = msgs[-1].status
    assert (end.kind, end.code) == (EV.KIND_END_OF_STREAM, code) and end.message
    kinds = [e.kind for e in events(msgs)]
    if drained:
        d = events(msgs, EV.KIND_DRAINED)
        assert len(d) == 1 and d[0].code == code and kinds[-2] == EV.KIND_DRAINED
    assert kinds.count(EV.KIND_END_OF_STREAM) == 1
    return end


def check_counters_monotone(msgs) -> None:
    seen = [e.counters for e in events(msgs)]
    for a, b in zip(seen, seen[1:]):
        for f in pb.SessionCounters.DESCRIPTOR.fields:
            assert getattr(b, f.name) >= getattr(a, f.name), (f.name, a, b)


def session_keys(rds: redis.Redis, sid: str) -> List[str]:
    return sorted(k.decode() for k in rds.scan_iter(match=f"*{sid}*", count=1000))


def check_released(rds: redis.Redis, sid: str) -> None:
    """After close: only the tombstone is left, and no stage holds a reservation or an admission of the session."""
    assert session_keys(rds, sid) == [f"{NS}closed:{sid}"]
    for key in rds.scan_iter(match=f"{NS}admitted:*"):
        assert rds.zscore(key, sid) is None, key
    for key in rds.scan_iter(match=f"{NS}resv:*"):
        assert rds.zscore(key, sid) is None, key
    assert rds.zscore(f"{NS}idle", sid) is None


# ------------------------------------------------------------------------------------ tests


def test_create_session_geometry_and_effective_options(api: Api) -> None:
    before = now_ms()
    s = api.create()
    after = now_ms()
    try:
        assert s.session_id and re.fullmatch(r"[A-Za-z0-9_-]+", s.session_id) and s.session_token
        g = s.geometry
        assert (g.fps, g.frames_per_block, g.sample_rate) == (25, 12, SR)
        assert g.samples_per_block == g.frames_per_block * g.sample_rate // g.fps == SPB
        assert g.width > 0 and g.height > 0
        o = s.effective_options
        assert o.HasField("seed")
        assert list(o.output_formats) == [pb.OUTPUT_FORMAT_JPEG] and o.jpeg_quality == 85
        assert (o.audio_format.encoding, o.audio_format.sample_rate_hz, o.audio_format.channels) == \
            (pb.AUDIO_ENCODING_PCM_S16LE, SR, 1)
        assert (o.idle.mode, o.idle.fill_grace_ms, o.idle.idle_timeout_s) == (pb.IDLE_MODE_FILL_SILENCE, 200, 300)
        assert (o.width, o.height) == (g.width, g.height) and not o.return_audio

        info = api.get(s)
        assert info.session_id == s.session_id and info.state == pb.SESSION_STATE_CREATED and not info.stream_open
        assert info.geometry == g and info.effective_options == o and info.effective_options.HasField("seed")
        assert before <= info.created_at_unix_ms <= after
        assert (info.last_audio_at_unix_ms, info.closed_at_unix_ms, info.error) == (0, 0, "")
        assert info.counters == pb.SessionCounters()
    finally:
        api.close(s)

    seeded = api.create(seed=1234, jpeg_quality=70, width=s.geometry.width, height=s.geometry.height,
                        output_formats=[pb.OUTPUT_FORMAT_JPEG], idle=pb.IdleOptions(idle_timeout_s=60))
    try:
        o = seeded.effective_options
        assert o.HasField("seed") and o.seed == 1234 and o.jpeg_quality == 70 and o.idle.idle_timeout_s == 60
        assert api.get(seeded).effective_options.seed == 1234
    finally:
        api.close(seeded)


def test_two_streams_counters_block_index_and_close(api: Api, rds: redis.Redis) -> None:
    s = api.create(idle=pb.IdleOptions(mode=pb.IDLE_MODE_WAIT_FOR_AUDIO))
    g = s.geometry
    # Stream 1: 3 blocks of speech in 160 ms chunks, then END_OF_INPUT.
    t0 = now_ms()
    first = chunks(speech(3))
    out1 = api.run(s, [*first, END_OF_INPUT])
    t1 = now_ms()
    started = out1[0].status
    assert (started.kind, started.pts_ms, started.block_index) == (EV.KIND_STARTED, 0, 0)
    assert started.geometry == g and started.counters.streams_opened == 1
    v1 = videos(out1)
    assert [v.block_index for v in v1] == [0, 1, 2] and [v.pts_ms for v in v1] == [0, 480, 960]
    for i, v in enumerate(v1):
        assert v.duration_ms == 480 and (v.width, v.height) == (g.width, g.height) and not v.is_idle
        assert v.num_frames == len(v.jpeg_frames) and all(f[:2] == b"\xff\xd8" for f in v.jpeg_frames)
        assert v.num_frames == 12 or (i == 0 and 0 < v.num_frames <= 12)
        assert not v.HasField("h264") and v.audio_pcm == b""
    kinds = [e.kind for e in events(out1)]
    assert kinds.index(EV.KIND_SPEAKING) < out1.index(next(m for m in out1 if m.WhichOneof("kind") == "video"))
    end1 = check_end(out1, "end_of_input", drained=True)
    check_counters_monotone(out1)
    frames1 = sum(v.num_frames for v in v1)
    assert end1.counters == pb.SessionCounters(
        audio_samples_received=3 * SPB, audio_chunks_received=len(first), blocks_generated=3, blocks_delivered=3,
        idle_blocks_delivered=0, frames_delivered=frames1, interrupts=0, audio_samples_discarded=0,
        audio_samples_late=0, streams_opened=1)
    assert end1.block_index == 3

    info = api.get(s)
    assert info.counters == end1.counters and not info.stream_open and info.state == pb.SESSION_STATE_IDLE
    assert t0 <= info.last_audio_at_unix_ms <= t1 and info.closed_at_unix_ms == 0

    # Stream 2 (live): GetSession sees it open, speaking, with live totals; block_index continues from 3.
    live = LiveRequests(hello(s), *chunks(speech(2, seed=1)))
    reader = Reader(api.stream(s.session_id, live))
    try:
        reader.wait_for(lambda out: len(videos(out)) >= 1, "the second stream's first video chunk")
        assert reader.out[0].status.block_index == 3 and reader.out[0].status.counters.streams_opened == 2
        info = wait_until(lambda: (i := api.get(s)).counters.audio_samples_received == 5 * SPB
                          and i.state == pb.SESSION_STATE_STREAMING and i, "live counters during the stream")
        assert info.stream_open and info.counters.streams_opened == 2 and info.last_audio_at_unix_ms >= t1
    finally:
        live.send(END_OF_INPUT)
        live.end()
    out2 = reader.join()
    assert reader.error is None, reader.error
    v2 = videos(out2)
    assert [v.block_index for v in v2] == [3, 4] and [v.pts_ms for v in v2] == [0, 480]  # each stream's own clock
    assert all(v.num_frames == 12 for v in v2)
    end2 = check_end(out2, "end_of_input", drained=True)
    check_counters_monotone(out2)
    assert end2.counters.streams_opened == 2 and end2.counters.blocks_delivered == 5
    assert end2.counters.frames_delivered == frames1 + 24 and end2.counters.audio_samples_received == 5 * SPB
    info = wait_until(lambda: (i := api.get(s)).counters == end2.counters and i, "the final counters")
    assert not info.stream_open and info.state == pb.SESSION_STATE_IDLE

    # Close: the summary, idempotent; CLOSED afterwards; only the tombstone remains.
    summary = api.close(s)
    assert summary.counters == end2.counters
    closed = api.get(s)
    assert closed.state == pb.SESSION_STATE_CLOSED and not closed.stream_open
    assert closed.closed_at_unix_ms >= closed.created_at_unix_ms > 0
    assert summary.duration_ms == closed.closed_at_unix_ms - closed.created_at_unix_ms
    assert closed.effective_options.seed == s.effective_options.seed and closed.counters == end2.counters
    assert api.close(s) == summary
    err = rpc_error(lambda: api.run(s, [END_OF_INPUT]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    check_released(rds, s.session_id)


def test_close_session_ends_an_open_stream(api: Api, rds: redis.Redis) -> None:
    s = api.create(idle=pb.IdleOptions(mode=pb.IDLE_MODE_WAIT_FOR_AUDIO))
    live = LiveRequests(hello(s), *chunks(speech(1)))
    reader = Reader(api.stream(s.session_id, live))
    try:
        reader.wait_for(lambda out: len(videos(out)) >= 1, "a video chunk")
        wait_until(lambda: api.get(s).stream_open, "stream_open")
        summary = api.close(s)  # ends the stream: it gets END_OF_STREAM `closed`, then status OK
        out = reader.join()
    finally:
        live.end()
    assert reader.error is None, reader.error
    check_end(out, "closed", drained=False)
    assert summary.counters.audio_samples_received == SPB and summary.counters.streams_opened == 1
    assert summary.counters.blocks_delivered == len(videos(out))
    info = api.get(s)
    assert info.state == pb.SESSION_STATE_CLOSED and not info.stream_open and info.closed_at_unix_ms > 0
    assert api.close(s) == summary
    check_released(rds, s.session_id)


def test_idle_timeout_closes_the_session(api: Api, rds: redis.Redis) -> None:
    # Never streamed: CLOSED by the gateways' sweep.
    quiet = api.create(idle=pb.IdleOptions(idle_timeout_s=1))
    info = wait_until(lambda: (i := api.get(quiet)).state == pb.SESSION_STATE_CLOSED and i, "the idle close")
    assert info.closed_at_unix_ms >= info.created_at_unix_ms + 1000 and not info.stream_open
    check_released(rds, quiet.session_id)
    assert api.close(quiet).counters == info.counters  # the tombstone answers

    # An open stream without audio: END_OF_STREAM `idle_timeout`, then the session is CLOSED.
    s = api.create(idle=pb.IdleOptions(mode=pb.IDLE_MODE_FILL_SILENCE, idle_timeout_s=2))
    live = LiveRequests(hello(s))
    reader = Reader(api.stream(s.session_id, live))
    try:
        out = reader.join()
    finally:
        live.end()
    assert reader.error is None, reader.error
    check_end(out, "idle_timeout", drained=False)
    assert all(v.is_idle for v in videos(out))
    info = wait_until(lambda: (i := api.get(s)).state == pb.SESSION_STATE_CLOSED and i, "CLOSED after idle_timeout")
    assert info.closed_at_unix_ms > 0 and not info.stream_open
    check_released(rds, s.session_id)


def test_late_audio_warning(api: Api) -> None:
    s = api.create(idle=pb.IdleOptions(mode=pb.IDLE_MODE_FILL_SILENCE, fill_grace_ms=1, idle_timeout_s=60))
    try:
        live = LiveRequests(hello(s))
        reader = Reader(api.stream(s.session_id, live))
        try:
            reader.wait_for(lambda out: len(videos(out)) >= 1, "an idle block")
            live.send(*chunks(speech(1)))  # [0, 480) was filled with silence: all of it is late
            # (a busy machine may also say behind_realtime: the late-audio warning is the one checked)
            reader.wait_for(lambda out: [e for e in events(out, EV.KIND_WARNING) if e.code == "audio_late"],
                            "WARNING audio_late")
            live.send(END_OF_INPUT)
        finally:
            live.end()
        out = reader.join()
        assert reader.error is None, reader.error
        warning = next(e for e in events(out, EV.KIND_WARNING) if e.code == "audio_late")
        assert "ms" in warning.message
        assert warning.counters.audio_samples_late > 0
        first = videos(out)[0]
        assert first.is_idle and first.block_index == 0 and first.pts_ms == 0
        assert [e.kind for e in events(out)][1] == EV.KIND_IDLE
        end = check_end(out, "end_of_input", drained=True)
        late = end.counters.audio_samples_late
        assert late > 0 and end.counters.audio_samples_received + late == SPB
        assert api.get(s).counters.audio_samples_late == late
    finally:
        api.close(s)


def test_interrupt_counters(api: Api) -> None:
    s = api.create(idle=pb.IdleOptions(mode=pb.IDLE_MODE_WAIT_FOR_AUDIO))
    try:
        out = api.run(s, [*chunks(speech(20), chunk_ms=480), INTERRUPT, END_OF_INPUT])
        interrupted = events(out, EV.KIND_INTERRUPTED)
        assert len(interrupted) == 1 and interrupted[0].pts_ms == 20 * 480
        end = check_end(out, "end_of_input", drained=True)
        c = end.counters
        assert c.interrupts == 1 and c.audio_samples_discarded > 0 and c.audio_samples_received == 20 * SPB
        assert c.blocks_generated >= c.blocks_delivered == len(videos(out))
        assert c.idle_blocks_delivered == sum(v.is_idle for v in videos(out))
        assert api.get(s).counters == c
    finally:
        api.close(s)


def test_a_cancelled_or_failed_stream_releases_the_session_at_once(api: Api) -> None:
    s = api.create(idle=pb.IdleOptions(mode=pb.IDLE_MODE_WAIT_FOR_AUDIO))
    try:
        live = LiveRequests(hello(s), *chunks(speech(60), chunk_ms=480))  # 28.8 s of audio, all buffered at once
        call = api.stream(s.session_id, live)
        reader = Reader(call)
        reader.wait_for(lambda out: len(videos(out)) >= 1, "a video chunk")
        cancelled_at = time.monotonic()
        call.cancel()
        live.end()
        reader.join()
        info = wait_until(lambda: (lambda i: None if i.stream_open else i)(api.get(s)), "stream_open false after a cancel")
        released_s = time.monotonic() - cancelled_at
        assert info.state == pb.SESSION_STATE_IDLE
        # released without generating the rest of the buffered audio first (60 blocks were sent)
        assert info.counters.blocks_generated < 60, info.counters
        assert released_s < 30.0, f"the session was released {released_s:.1f} s after the cancel"

        bad = pb.ClientMessage(audio=pb.AudioChunk(seq=0, pts_ms=0, pcm=b"\x00\x01\x02"))
        err = rpc_error(lambda: api.run(s, [bad]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = api.get(s)  # released before the status reached the client
        assert not info.stream_open and info.state == pb.SESSION_STATE_IDLE

        out = api.run(s, [*chunks(speech(1)), END_OF_INPUT])  # a new stream opens right away
        check_end(out, "end_of_input", drained=True)
        assert out[0].status.counters.streams_opened == 3
    finally:
        api.close(s)


def _code(fn) -> grpc.StatusCode:
    return rpc_error(fn).code()


def test_error_codes_unary(api: Api) -> None:
    IA = grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: api.create(image=b"")) == IA
    assert _code(lambda: api.create(image=b"this is not an image")) == IA
    assert _code(lambda: api.create(image=b"\x89PNG" + bytes(16 * 1024 * 1024))) == IA
    assert _code(lambda: api.create(width=64 * 99, height=64 * 99)) == IA
    assert _code(lambda: api.create(width=64)) == IA
    err = rpc_error(lambda: api.create(height=64))
    assert err.code() == IA and "both or neither" in err.details()
    assert _code(lambda: api.create(jpeg_quality=101)) == IA
    assert _code(lambda: api.create(output_formats=[7])) == IA
    assert _code(lambda: api.create(audio_format=pb.AudioFormat(encoding=9))) == IA
    assert _code(lambda: api.create(audio_format=pb.AudioFormat(sample_rate_hz=8000))) == IA
    assert _code(lambda: api.create(audio_format=pb.AudioFormat(channels=2))) == IA

    # A corrupt request body: INVALID_ARGUMENT, not UNKNOWN.
    corrupt = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, a length far beyond the message
    for method in ("CreateSession", "GetSession", "CloseSession"):
        raw = api.channel.unary_unary(f"/avatarserve.v1.AvatarService/{method}")
        err = rpc_error(lambda: raw(corrupt, metadata=api.md(), timeout=RPC_TIMEOUT))
        assert err.code() == IA and "do not parse" in err.details(), (method, err.code(), err.details())

    # `application` naming no running application: NOT_FOUND.
    req = pb.CreateSessionRequest(reference_image=png(7))
    err = rpc_error(lambda: api.stub.CreateSession(req, metadata=api.md(app="no-such-app"), timeout=RPC_TIMEOUT))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "no-such-app" in err.details()

    s = api.create()
    try:
        unknown = pb.CreateSessionResponse(session_id="no-such-session", session_token="x")
        foreign = pb.CreateSessionResponse(session_id=s.session_id, session_token="wrong")
        for call in (api.get, api.close):
            assert _code(lambda: call(unknown)) == grpc.StatusCode.NOT_FOUND
            assert _code(lambda: call(foreign)) == grpc.StatusCode.PERMISSION_DENIED
        err = rpc_error(lambda: api.stub.GetSession(
            pb.GetSessionRequest(session_id=s.session_id, session_token=s.session_token),
            metadata=api.md(s.session_id, app="no-such-app"), timeout=RPC_TIMEOUT))
        assert err.code() == grpc.StatusCode.NOT_FOUND
    finally:
        api.close(s)


def test_error_codes_stream(api: Api) -> None:
    IA = grpc.StatusCode.INVALID_ARGUMENT
    s = api.create(idle=pb.IdleOptions(mode=pb.IDLE_MODE_WAIT_FOR_AUDIO))
    f32 = api.create(audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM_F32LE),
                     idle=pb.IdleOptions(mode=pb.IDLE_MODE_WAIT_FOR_AUDIO))
    try:
        tone = speech(3)
        audio = lambda seq, pts, pcm: pb.ClientMessage(audio=pb.AudioChunk(seq=seq, pts_ms=pts, pcm=pcm))  # noqa: E731
        cases = {
            "first message not Hello": (s, None, [END_OF_INPUT]),
            "a later Hello": (s, hello(s), [hello(s)]),
            "odd s16le byte count": (s, hello(s), [audio(0, 0, b"\x00\x01\x02")]),
            "chunk over 1000 ms": (s, hello(s), [audio(0, 0, speech(2.5).tobytes())]),
            "seq not increasing": (s, hello(s), [audio(1, 0, tone[:1600].tobytes()), audio(1, 100, tone[:1600].tobytes())]),
            "overlapping pts_ms": (s, hello(s), [audio(0, 0, tone[:3200].tobytes()), audio(1, 100, tone[:1600].tobytes())]),
            "NaN in f32le": (f32, hello(f32), [audio(0, 0, np.array([0.1, np.nan], "<f4").tobytes())]),
            "f32le byte count": (f32, hello(f32), [audio(0, 0, b"\x00" * 6)]),
        }
        for what, (sess, first, msgs) in cases.items():
            reqs = ([first] if first is not None else []) + msgs
            err = rpc_error(lambda: list(api.stream(sess.session_id, reqs)))
            assert err.code() == IA, (what, err.code(), err.details())
            assert err.details(), what

        corrupt = b"\x0a\xff\xff\xff\xff\x0f"
        raw = api.channel.stream_stream("/avatarserve.v1.AvatarService/StreamSession")
        for what, reqs in {"corrupt first message": [corrupt],
                           "corrupt later message": [hello(s).SerializeToString(), corrupt]}.items():
            err = rpc_error(lambda: list(raw(iter(reqs), metadata=api.md(s.session_id), timeout=RPC_TIMEOUT)))
            assert err.code() == IA and "empty stream" not in err.details(), (what, err.code(), err.details())

        unknown = pb.CreateSessionResponse(session_id="no-such-session", session_token="x")
        assert _code(lambda: api.run(unknown, [END_OF_INPUT])) == grpc.StatusCode.NOT_FOUND
        foreign = pb.CreateSessionResponse(session_id=s.session_id, session_token="wrong")
        assert _code(lambda: api.run(foreign, [END_OF_INPUT])) == grpc.StatusCode.PERMISSION_DENIED

        # One stream per session.
        live = LiveRequests(hello(s))
        reader = Reader(api.stream(s.session_id, live))
        try:
            reader.wait_for(lambda out: len(out) >= 1, "STARTED")
            assert _code(lambda: api.run(s, [END_OF_INPUT])) == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            live.send(END_OF_INPUT)
            live.end()
        assert reader.join() and reader.error is None
    finally:
        api.close(s)
        api.close(f32)
