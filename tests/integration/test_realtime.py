"""Real-time behaviour of the cluster through the SDK: idle on silence, interrupt, pts, and typed errors."""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest

from avatarserve_client.v1 import avatar_service_pb2 as pb
from avatarserve_client.v1 import avatar_service_pb2_grpc as pbg
from avatarserve_client import AvatarClient, EventKind, VideoBlock
from avatarserve_client.audio import chunk_pcm
from avatarserve_client.errors import (FailedPrecondition, InvalidArgument, PermissionDenied, SessionNotFound)

from .conftest import APP, png

pytestmark = pytest.mark.integration


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.4 * np.sin(2 * np.pi * 200 * t) * 32767).astype(np.int16)


def test_idle_blocks_without_audio(cluster):
    with AvatarClient(cluster, application=APP, timeout=120) as client:
        with client.session(png(3), seed=1, idle_mode="fill_silence", fill_grace_ms=50) as s:
            got = []
            for item in s.stream(None, end_of_input=False, include_events=True, timeout=300):
                if isinstance(item, VideoBlock):
                    got.append(item)
                    if len(got) == 3:
                        s.end_of_input()
            # Blocks already due when END_OF_INPUT arrives are still delivered (more of them on a slow machine).
            assert len(got) >= 3 and all(b.is_idle for b in got)
            assert [b.pts_ms for b in got] == [480 * i for i in range(len(got))]
            kinds = [e.kind for e in s.events]
            assert kinds[0] == EventKind.STARTED and EventKind.IDLE in kinds
            assert kinds[-2:] == [EventKind.DRAINED, EventKind.END_OF_STREAM]
            # the session can be streamed again after END_OF_STREAM
            again = list(s.stream([_tone(0.5)], timeout=300))
            assert len(again) >= 2 and not again[0].is_idle  # the tone (plus idle blocks that fell due meanwhile)


def test_interrupt_drops_queued_audio_and_goes_idle(cluster):
    report = {}
    with AvatarClient(cluster, application=APP, timeout=120) as client:
        with client.session(png(4), seed=2, idle_mode="fill_silence", fill_grace_ms=50) as s:
            speech = _tone(8.0)  # 17 blocks, sent far faster than real time
            delivered = []
            sent_interrupt = None
            barge_in = threading.Event()

            def source():  # a TTS that stops speaking at the barge-in
                for chunk in chunk_pcm(speech, chunk_ms=200):
                    if barge_in.is_set():
                        return
                    yield chunk

            for item in s.stream(source(), end_of_input=False, include_events=True, timeout=300):
                if isinstance(item, VideoBlock):
                    delivered.append(item)
                    if len(delivered) == 1:
                        sent_interrupt = time.monotonic()
                        barge_in.set()
                        s.interrupt()
                    if item.is_idle and sent_interrupt is not None and "idle_after_s" not in report:
                        report["idle_after_s"] = item.received_at - sent_interrupt
                        s.end_of_input()
            events = [e for e in s.events if e.kind == EventKind.INTERRUPTED]
            assert len(events) == 1
            resume_pts = events[0].pts_ms
            after = [b for b in delivered[1:]]
            assert after, "no block after the interrupt"
            assert after[0].pts_ms == resume_pts  # output resumes where the received audio ended
            # Idle from there, unless a chunk the source had already produced reached the server after the INTERRUPT
            # (new audio is played: the gateway no longer overwrites it with the idle block).
            assert after[0].is_idle or s.stats.audio_chunks_sent * 200 > events[0].pts_ms
            # blocks made from discarded audio are never delivered: far fewer than the 17 speech blocks
            assert sum(not b.is_idle for b in delivered) < 17
            info = client.get_session(s.handle)
            assert info.counters.interrupts == 1
    report["speech_blocks_delivered"] = sum(not b.is_idle for b in delivered)
    print("INTERRUPT_REPORT", json.dumps(report))
    assert report["idle_after_s"] < 30


def test_video_chunks_carry_audio_pts_and_h264(cluster):
    with AvatarClient(cluster, application=APP, timeout=120) as client:
        with client.session(png(5), seed=3, formats=("h264", "jpeg"), idle_mode="wait_for_audio") as s:
            blocks = list(s.stream(chunk_pcm(_tone(1.5), chunk_ms=40), timeout=300))
    assert [b.pts_ms for b in blocks] == [0, 480, 960, 1440]
    assert all(b.h264 and len(b.frames) == 12 and b.duration_ms == 480 for b in blocks)


def test_typed_errors(cluster):
    with AvatarClient(cluster, application=APP, timeout=60) as client:
        # straight to the server (the SDK would refuse this image before sending it)
        with grpc.insecure_channel(cluster) as ch:
            stub = pbg.AvatarServiceStub(ch)
            corrupt = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
            with pytest.raises(grpc.RpcError) as err:
                stub.CreateSession(pb.CreateSessionRequest(reference_image=corrupt), metadata=(("application", APP),),
                                   timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "decode" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                stub.CreateSession(pb.CreateSessionRequest(reference_image=b""), metadata=(("application", APP),),
                                   timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(InvalidArgument, match="serves"):
            client.create_session(png(6), width=128, height=128)
        with pytest.raises(SessionNotFound):
            client.get_session("no-such-session", "x")
        with client.session(png(6), seed=1, idle_mode="wait_for_audio") as s:
            with pytest.raises(PermissionDenied):
                client.get_session(s.session_id, "wrong-token")
            # straight to the server: malformed audio and protocol errors
            hello = pb.ClientMessage(hello=pb.Hello(session_id=s.session_id, session_token=s.handle.session_token))
            cases = [
                ([hello, pb.ClientMessage(audio=pb.AudioChunk(seq=0, pts_ms=0, pcm=b"\x00\x01\x02"))], "multiple of 2"),
                ([pb.ClientMessage(audio=pb.AudioChunk(seq=0, pts_ms=0, pcm=b"\x00\x00"))], "Hello"),
                ([hello, pb.ClientMessage(audio=pb.AudioChunk(seq=1, pts_ms=0, pcm=b"\x00\x00" * 160)),
                  pb.ClientMessage(audio=pb.AudioChunk(seq=1, pts_ms=10, pcm=b"\x00\x00" * 160))], "seq"),
                ([hello, pb.ClientMessage(audio=pb.AudioChunk(seq=0, pts_ms=0, pcm=b"\x00\x00" * 32000))], "longer"),
            ]
            with grpc.insecure_channel(cluster) as ch:
                stub = pbg.AvatarServiceStub(ch)
                for msgs, text in cases:
                    try:
                        out = list(stub.StreamSession(iter(msgs), metadata=(("application", APP),), timeout=120))
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (text, exc)
                        assert text in exc.details()
                    else:
                        pytest.fail(f"case {text!r} did not fail; got {out}")
            # a second stream while one is open
            opened = threading.Event()
            release = threading.Event()
            errors = []

            def first():
                def audio():
                    yield _tone(0.2)
                    opened.set()
                    release.wait(60)
                try:
                    list(s.stream(audio(), timeout=120))
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)

            t = threading.Thread(target=first)
            t.start()
            assert opened.wait(60)
            time.sleep(1.0)
            other = client.attach(s.handle)
            with pytest.raises(FailedPrecondition):
                list(other.stream([_tone(0.1)], timeout=60))
            release.set()
            t.join(120)
            assert not errors
        # the cluster is still healthy and serves a new session after all of that
        with client.session(png(7), seed=2, idle_mode="wait_for_audio") as s2:
            assert len(list(s2.stream([_tone(0.4)], timeout=300))) == 1


def test_health_and_reflection(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(cluster) as ch:
        md = (("application", APP),)
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="avatarserve.v1.AvatarService"), metadata=md, timeout=30)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        services = [s.name for r in stub.ServerReflectionInfo(reqs, timeout=30)
                    for s in r.list_services_response.service]
        assert "avatarserve.v1.AvatarService" in services


def test_idle_timeout_with_blocks_in_flight_does_not_freeze_the_gateway(cluster):
    """Issue: a session reaching its idle timeout with blocks in flight (at the cap) made the gateway's event loop spin
    in StreamController._feed: every other session stopped, END_OF_STREAM `idle_timeout` never came, and every RPC
    timed out. Session A sends a burst far above the cap's worth (8 in flight), then nothing, its stream left open, so
    its idle deadline passes while its backlog is still being generated; session B streams in real time meanwhile, and
    GetSession is called on the same gateway all along."""
    idle_timeout_s = 1
    # 50 blocks at once (under max_buffer_s, so no back-pressure): at the tiny model's ~15 blocks/s on CPU, A is still
    # at the cap well after its idle deadline.
    burst = list(chunk_pcm(_tone(24.0), chunk_ms=480))
    speech_b = _tone(6.0)  # 13 blocks, paced in real time
    with AvatarClient(cluster, application=APP, timeout=120) as client:
        with client.session(png(8), seed=4, idle_mode="fill_silence", idle_timeout_s=idle_timeout_s) as a, \
                client.session(png(9), seed=5, idle_mode="wait_for_audio") as b:
            a_items, a_errors, polls, burst_sent_at = [], [], [], []
            burst_sent, a_done = threading.Event(), threading.Event()

            def audio_a():
                yield from burst
                burst_sent_at.append(time.monotonic())
                burst_sent.set()  # every chunk is in the SDK's send queue; then silence, the stream stays open

            def run_a():
                try:
                    a_items.extend(a.stream(audio_a(), end_of_input=False, include_events=True, timeout=300))
                except Exception as exc:  # noqa: BLE001 - reported below
                    a_errors.append(exc)
                finally:
                    a_done.set()

            def poll_get_session():  # unary RPCs on the same gateway, for as long as A streams
                while not a_done.is_set():
                    started = time.monotonic()
                    try:
                        client.get_session(a.handle, timeout=60)
                        polls.append((started, "OK"))
                    except Exception as exc:  # noqa: BLE001 - reported below
                        polls.append((started, repr(exc)))
                    a_done.wait(0.25)

            ta = threading.Thread(target=run_a, name="session-a")
            tp = threading.Thread(target=poll_get_session, name="get-session-poller")
            ta.start()
            try:
                assert burst_sent.wait(120), "session A's burst was never sent"
                tp.start()
                blocks_b = list(b.stream(chunk_pcm(speech_b, chunk_ms=40), realtime=True, include_events=False,
                                         timeout=180))
                # B's 6 s began after A's burst: A is past its idle deadline now
                info_a = client.get_session(a.handle, timeout=60)
            finally:
                ta.join(330)
                a_done.set()
                if tp.ident is not None:
                    tp.join(120)
            assert not ta.is_alive(), "session A never ended"
            assert not a_errors, a_errors

    # B: every block, in order, and its END_OF_STREAM
    assert [blk.pts_ms for blk in blocks_b] == [480 * i for i in range(13)]
    assert not any(blk.is_idle for blk in blocks_b)
    assert [e.kind for e in b.events][-1] == EventKind.END_OF_STREAM
    # A: ended by its idle timeout, after every block it had in flight or buffered
    a_events = [x for x in a_items if not isinstance(x, VideoBlock)]
    a_blocks = [x for x in a_items if isinstance(x, VideoBlock)]
    assert a_events[-1].kind == EventKind.END_OF_STREAM and a_events[-1].code == "idle_timeout", a_events[-3:]
    assert [blk.pts_ms for blk in a_blocks] == [480 * i for i in range(len(a_blocks))]
    assert len(a_blocks) == a_events[-1].counters.blocks_delivered >= 8
    # the gateway kept answering unary RPCs
    assert info_a.session_id == a.session_id
    assert polls and all(p == "OK" for _, p in polls), polls

    # For the record (not asserted: timing): B's delivery lag behind its audio, and how much of A's stream (and how
    # many GetSession calls) fell after A's idle deadline (estimated on this side: burst handed over + idle timeout).
    start_b = b.stats.first_audio_sent_at
    lag = [blk.received_at - (start_b + (blk.pts_ms + blk.duration_ms) / 1000.0) for blk in blocks_b]
    deadline_a = burst_sent_at[0] + idle_timeout_s
    end_a = a_events[-1].received_at
    print("IDLE_TIMEOUT_REPORT", json.dumps({
        "b_lag_s": [round(x, 3) for x in lag], "b_lag_max_s": round(max(lag), 3),
        "b_lag_median_s": round(float(np.median(lag)), 3),
        "a_blocks": len(a_blocks),
        "a_blocks_after_idle_deadline": sum(blk.received_at > deadline_a for blk in a_blocks),
        "a_end_after_idle_deadline_s": round(end_a - deadline_a, 3),
        "get_session_calls": len(polls),
        "get_session_calls_past_a_deadline": sum(deadline_a < t < end_a for t, _ in polls)}))


def test_block_audio_and_utterance_events_through_the_cluster(cluster):
    """The adapters' API on the real gateway: return_audio gives every block its own span of the input (silence
    filled where none came), and END_OF_UTTERANCE splits the input into utterances reported as they play out."""
    from avatarserve_client import END_OF_UTTERANCE

    speech = _tone(1.2)  # utterance 0: 1200 ms; utterance 1: 480 ms
    more = _tone(0.48)
    source = [*chunk_pcm(speech, chunk_ms=240), END_OF_UTTERANCE,
              *chunk_pcm(more, chunk_ms=240, start_seq=5, start_sample=len(speech))]
    with AvatarClient(cluster, application=APP, timeout=120) as client:
        with client.session(png(4), seed=3, idle_mode="wait_for_audio", return_audio=True) as s:
            items = list(s.stream(source, include_events=True, timeout=300))
    blocks = [i for i in items if isinstance(i, VideoBlock)]
    audio = np.concatenate([b.audio for b in blocks])
    expected = np.concatenate([speech, more])
    assert len(blocks) == 4 and all(len(b.audio) == 7680 for b in blocks)
    assert np.array_equal(audio[:len(expected)], expected) and not audio[len(expected):].any()
    events = [(i.kind, i.utterance.index, i.utterance.played_ms) for i in items
              if not isinstance(i, VideoBlock) and i.utterance is not None]
    assert events == [(EventKind.UTTERANCE_STARTED, 0, 480), (EventKind.UTTERANCE_STARTED, 1, 240),
                      (EventKind.UTTERANCE_ENDED, 0, 1200), (EventKind.UTTERANCE_ENDED, 1, 480)]
