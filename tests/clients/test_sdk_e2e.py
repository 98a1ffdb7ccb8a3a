"""The SDK against a real grpc.aio AvatarService (tests/clients/avatar_test_server.py)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from avatarserve_client.v1 import avatar_service_pb2 as pb
from avatarserve_client import (INTERRUPT, AvatarClient, CapacityExhausted, EventKind,
                                FailedPrecondition, InvalidArgument, PermissionDenied,
                                SessionNotFound, SessionState, StatusEvent, VideoBlock, chunk_pcm,
                                silence)
from avatarserve_client.cli import run_stream

from .avatar_test_server import block_colour
from .conftest import tone


def _check_colours(block: VideoBlock) -> None:
    g = 200 if block.is_idle else 50
    assert len(block.frames) == block.num_frames
    for i, f in enumerate(block.frames):
        assert f.shape == (block.height, block.width, 3)
        px = f[f.shape[0] // 2, f.shape[1] // 2].astype(int)
        assert np.abs(px - [block_colour(block.block_index), g, 20 * i]).max() <= 8, (block.block_index, i, px)


@pytest.fixture
def client(server):
    with AvatarClient(server.address, timeout=5, application="avatar",
                      metadata=[("x-api-key", "k1")]) as c:
        yield c


def test_session_lifecycle_and_routing_metadata(server, client, png_bytes) -> None:
    handle = client.create_session(png_bytes, "a person", width=64, height=48, seed=7)
    assert handle.geometry.samples_per_block == 7680 and handle.geometry.fps == 25
    assert (handle.geometry.width, handle.geometry.height, handle.seed) == (64, 48, 7)
    info = client.get_session(handle)
    assert info.state is SessionState.CREATED and not info.stream_open
    assert info.created_at is not None and info.seed == 7
    summary = client.close_session(handle.session_id, handle.session_token)
    assert summary.counters.blocks_delivered == 0
    assert client.get_session(handle).state is SessionState.CLOSED
    md = server.service.received_metadata
    assert all(m.get("application") == "avatar" and m.get("x-api-key") == "k1" for m in md)
    assert "session_id" not in md[0]  # CreateSession: no session yet
    assert all(m.get("session_id") == handle.session_id for m in md[1:])


def test_stream_blocks_in_order_with_events(server, client, png_bytes) -> None:
    audio = np.concatenate([tone(960), silence(480), tone(240)])  # 3.5 blocks
    with client.session(png_bytes, formats="jpeg") as s:
        items = list(s.stream(chunk_pcm(audio, chunk_ms=40), include_events=True))
        sid = s.session_id
    blocks = [i for i in items if isinstance(i, VideoBlock)]
    kinds = [i.kind for i in items if isinstance(i, StatusEvent)]
    assert [b.block_index for b in blocks] == [0, 1, 2, 3]
    assert [b.pts_ms for b in blocks] == [0, 480, 960, 1440]
    assert [b.is_idle for b in blocks] == [False, False, True, False]
    for b in blocks:
        _check_colours(b)
        assert b.h264 is None and len(b.jpeg_frames) == 12
    assert kinds == [EventKind.STARTED, EventKind.SPEAKING, EventKind.IDLE, EventKind.SPEAKING,
                     EventKind.DRAINED, EventKind.END_OF_STREAM]
    assert s.events[0].geometry == s.geometry
    assert s.events[-1].code == "end_of_input"
    assert s.stats.blocks == 4 and s.stats.frames == 48 and s.stats.idle_blocks == 1
    assert s.stats.audio_chunks_sent == 42 and s.stats.ttff_s is not None and s.stats.ttff_s > 0
    # The server saw every chunk once, in order; the session was closed on exit.
    received = server.service.received_audio[sid]
    assert [c.seq for c in received] == list(range(42))
    assert server.service.sessions[sid].state == pb.SESSION_STATE_CLOSED


def test_raw_arrays_are_stamped_and_h264_frames_decoded(server, client, png_bytes) -> None:
    with client.session(png_bytes, formats=["h264"]) as s:
        blocks = list(s.stream([tone(300), tone(300), tone(360)]))  # 960 ms of audio in 3 arrays
        received = server.service.received_audio[s.session_id]
    assert [(c.seq, c.pts_ms) for c in received] == [(0, 0), (1, 300), (2, 600)]
    assert [b.block_index for b in blocks] == [0, 1]
    for b in blocks:
        assert b.h264 is not None and b.jpeg_frames == []
        _check_colours(b)


def test_in_band_interrupt_discards_the_partial_block(server, client, png_bytes) -> None:
    speech = chunk_pcm(np.concatenate([tone(720), tone(480)]), chunk_ms=240)  # 5 chunks
    items = speech[:3] + [INTERRUPT] + speech[3:]
    with client.session(png_bytes) as s:
        blocks = list(s.stream(items))
        counters = s.info().counters
    # Block 0 = [0, 480); [480, 720) is discarded; output resumes at the next audio (720 ms).
    assert [(b.block_index, b.pts_ms) for b in blocks] == [(0, 0), (1, 720)]
    interrupted = [e for e in s.events if e.kind is EventKind.INTERRUPTED]
    assert len(interrupted) == 1 and interrupted[0].pts_ms == 720
    assert counters.interrupts == 1 and counters.audio_samples_discarded == 3840


def test_interrupt_from_the_receiving_loop(server, client, png_bytes) -> None:
    release = threading.Event()

    def audio():
        yield from chunk_pcm(tone(720), chunk_ms=240)  # 1.5 blocks
        assert release.wait(5)
        yield pb.AudioChunk(seq=10, pts_ms=2000, pcm=tone(480).tobytes())

    with client.session(png_bytes) as s:
        got = []
        for item in s.stream(audio(), include_events=True):
            got.append(item)
            if isinstance(item, VideoBlock) and item.block_index == 0:
                received = server.service.received_audio[s.session_id]
                deadline = time.monotonic() + 5
                while len(received) < 3 and time.monotonic() < deadline:
                    time.sleep(0.005)  # let the third chunk reach the server
                assert s.interrupt() == 0  # nothing left in the local queue
                release.set()
        counters = s.info().counters
    # Output resumes at 720 ms (end of the audio received); the gap up to the next audio
    # (pts 2000) is filled with silence, so idle blocks bridge it.
    blocks = [(b.block_index, b.pts_ms, b.is_idle) for b in got if isinstance(b, VideoBlock)]
    assert blocks == [(0, 0, False), (1, 720, True), (2, 1200, True), (3, 1680, False),
                      (4, 2160, False)]
    kinds = [e.kind for e in got if isinstance(e, StatusEvent)]
    assert kinds.index(EventKind.INTERRUPTED) < kinds.index(EventKind.DRAINED)
    assert counters.audio_samples_discarded == 3840
    assert [e.pts_ms for e in s.events if e.kind is EventKind.INTERRUPTED] == [720]


def test_interrupt_drops_locally_queued_audio_consistently(server, client, png_bytes) -> None:
    server.reset(block_delay_s=0.02)  # a slow server lets the local queue fill up
    chunks = chunk_pcm(tone(250 * 40), chunk_ms=250)
    with client.session(png_bytes) as s:
        dropped = None
        for block in s.stream(chunks, max_queued_chunks=4):
            if dropped is None:
                dropped = s.interrupt()
        received = server.service.received_audio[s.session_id]
    assert 1 <= dropped <= 4 and s.stats.audio_chunks_dropped == dropped
    # Every chunk was either sent once or dropped locally; seq gaps are what the server sees.
    assert len(received) + dropped == 40
    seqs = [c.seq for c in received]
    assert seqs == sorted(set(seqs))


def test_end_of_input_called_by_the_user(server, client, png_bytes) -> None:
    with client.session(png_bytes) as s:
        it = s.stream([tone(480)], end_of_input=False, include_events=True)
        first_block = None
        for item in it:
            if isinstance(item, VideoBlock):
                first_block = item
                s.end_of_input()
        assert first_block is not None and s.events[-1].kind is EventKind.END_OF_STREAM


def test_close_while_streaming_ends_the_stream(server, client, png_bytes) -> None:
    with client.session(png_bytes) as s:
        for item in s.stream([tone(480)], end_of_input=False, include_events=True):
            if isinstance(item, VideoBlock):
                client.close_session(s.handle)
    assert s.events[-1].kind is EventKind.END_OF_STREAM and s.events[-1].code == "closed"


def test_session_closes_when_the_body_raises(server, client, png_bytes) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with client.session(png_bytes) as s:
            raise RuntimeError("boom")
    assert server.service.sessions[s.session_id].state == pb.SESSION_STATE_CLOSED


def test_error_codes_round_trip(server, client, png_bytes) -> None:
    with pytest.raises(InvalidArgument, match="not a decodable PNG/JPEG") as ei:
        client.create_session(png_bytes[:20] + b"\x00" * 50)  # PNG magic, corrupt body
    assert ei.value.code is not None  # it came from the server
    with pytest.raises(InvalidArgument, match="neither PNG nor JPEG"):
        client.create_session(b"GIF89a....")  # rejected before sending
    with pytest.raises(InvalidArgument, match="unsupported size"):
        client.create_session(png_bytes, width=63, height=48)
    with pytest.raises(SessionNotFound, match="unknown session"):
        client.get_session("nope", "x")
    handle = client.create_session(png_bytes)
    with pytest.raises(PermissionDenied, match="does not match"):
        client.close_session(handle.session_id, "wrong-token")
    client.close_session(handle)
    with pytest.raises(FailedPrecondition, match="CLOSED"):
        list(client.attach(handle).stream([tone(40)]))


def test_second_stream_on_the_same_session_is_refused(server, client, png_bytes) -> None:
    with client.session(png_bytes) as s:
        it = s.stream(None, end_of_input=False, include_events=True)
        assert next(it).kind is EventKind.STARTED
        with pytest.raises(FailedPrecondition, match="already open"):
            list(client.attach(s.handle).stream([tone(40)]))
        with pytest.raises(FailedPrecondition, match="already open on this Session"):
            s.stream([])
        s.end_of_input()
        assert [e.kind for e in it] == [EventKind.DRAINED, EventKind.END_OF_STREAM]


def test_capacity_exhausted_carries_retry_after(server, client, png_bytes) -> None:
    server.reset(max_sessions=1, retry_after_ms=1500)
    client.create_session(png_bytes)
    with pytest.raises(CapacityExhausted) as ei:
        client.create_session(png_bytes)
    assert ei.value.retry_after_s == 1.5 and "slots are busy" in ei.value.details


def test_bad_audio_fails_the_stream_with_a_typed_error(server, client, png_bytes) -> None:
    with client.session(png_bytes) as s:
        with pytest.raises(InvalidArgument, match="multiple of the 2-byte"):
            list(s.stream([tone(40), b"\x01\x02\x03"]))
        # The session stays usable: a new stream works.
        assert len(list(s.stream([tone(480)]))) == 1


def test_stream_deadline_is_typed(server, client, png_bytes) -> None:
    from avatarserve_client import DeadlineExceeded

    with client.session(png_bytes) as s:
        with pytest.raises(DeadlineExceeded):
            list(s.stream(None, end_of_input=False, timeout=0.2))


def test_a_stream_refused_before_its_first_reply_is_retried_with_what_was_sent(server, client, png_bytes) -> None:
    from avatarserve_client import Unavailable

    audio = tone(960)  # 2 blocks
    # Repeated: in a stand-alone reproduction, grpcio 1.85.3 replaying a stream that had sent audio lost a chunk in
    # 28 of 400 tries.
    for _ in range(6):
        server.reset(unavailable_streams=2)  # the first two attempts end UNAVAILABLE right after their Hello
        with client.session(png_bytes, formats="jpeg") as s:
            blocks = list(s.stream(chunk_pcm(audio, chunk_ms=40)))
            sid = s.session_id
        assert [b.block_index for b in blocks] == [0, 1]
        attempts = server.service.stream_attempts
        assert len(attempts) == 3 and all(a.hello.session_id == sid for a in attempts)
        # the attempt that ran got every chunk once, in order (a retry replays only the Hello)
        assert [c.seq for c in server.service.received_audio[sid]] == list(range(24))

    server.reset(unavailable_streams=3)  # one more than the policy's 3 attempts: the error reaches the caller
    with client.session(png_bytes) as s:
        with pytest.raises(Unavailable, match="retry it"):
            list(s.stream(chunk_pcm(audio, chunk_ms=40)))
    assert len(server.service.stream_attempts) == 3


def test_unreachable_server_is_unavailable(png_bytes) -> None:
    from avatarserve_client import Unavailable

    with AvatarClient("127.0.0.1:1", timeout=2) as c:
        with pytest.raises(Unavailable):
            c.create_session(png_bytes)


def test_realtime_stream_and_first_block_with_fewer_frames(server, client, png_bytes) -> None:
    server.reset(first_block_frames=9)
    with client.session(png_bytes) as s:
        blocks = list(s.stream(chunk_pcm(tone(960), chunk_ms=80), realtime=True, lead_ms=800))
    assert [b.num_frames for b in blocks] == [9, 12]
    assert blocks[0].frame_pts_ms(0) == 120.0
    assert s.stats.first_audio_sent_at is not None


def test_cli_stream_writes_mp4_and_prints_summary(server, png_bytes, tmp_path, capsys) -> None:
    import av

    (tmp_path / "face.png").write_bytes(png_bytes)
    sf.write(tmp_path / "a.wav", np.concatenate([tone(1000), silence(440)]), 16000, subtype="PCM_16")
    out = tmp_path / "out.mp4"
    rc = run_stream(["--server", server.address, "--image", str(tmp_path / "face.png"),
                     "--audio", str(tmp_path / "a.wav"), "--out", str(out), "--width", "64",
                     "--height", "48", "--seed", "3", "--formats", "jpeg,h264"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip())
    assert summary["blocks"] == 3 and summary["frames"] == 36 and summary["idle_blocks"] == 0
    assert summary["ttff_s"] > 0 and summary["width"] == 64
    with av.open(str(out)) as c:
        assert c.streams.video[0].frames == 36 and c.streams.video[0].average_rate == 25
        a = c.streams.audio[0]
        assert float(a.duration * a.time_base) == pytest.approx(1.44, abs=0.065)


def test_cli_reports_errors_with_exit_code(server, tmp_path, capsys) -> None:
    (tmp_path / "face.png").write_bytes(b"not an image")
    sf.write(tmp_path / "a.wav", tone(100), 16000)
    rc = run_stream(["--server", server.address, "--image", str(tmp_path / "face.png"),
                     "--audio", str(tmp_path / "a.wav"), "--out", str(tmp_path / "o.mp4")])
    assert rc == 1
    assert "neither PNG nor JPEG" in capsys.readouterr().err


def test_audio_source_error_surfaces_and_stops_the_stream(server, client, png_bytes) -> None:
    def source():
        yield tone(40)
        raise RuntimeError("microphone unplugged")

    with client.session(png_bytes) as s:
        with pytest.raises(RuntimeError, match="microphone unplugged"):
            list(s.stream(source()))
        # The SDK cancelled the call, so the server sees the stream end.
        deadline = time.monotonic() + 5
        while server.service.sessions[s.session_id].stream_open and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not server.service.sessions[s.session_id].stream_open
