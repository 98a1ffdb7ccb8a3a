"""StreamProtocol, the stream logic the sync and asyncio clients share (no network here)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from avatarserve_client import (EventKind, InvalidArgument, ProtocolError, ServerError,
                                SessionNotFound, StatusEvent, StreamMarker, VideoBlock)
from avatarserve_client._stream_protocol import StreamProtocol
from avatarserve_client.audio import RealtimePacer
from avatarserve_client.types import AudioEncoding, Geometry, IdleMode, OutputFormat, SessionHandle
from avatarserve_client.v1 import avatar_service_pb2 as pb

GEOMETRY = Geometry(fps=25, frames_per_block=12, sample_rate=16000, samples_per_block=7680,
                    width=32, height=24)


def _protocol(*, include_events: bool = False, decode: bool = False, on_event=None,
              idle_mode: IdleMode = IdleMode.WAIT_FOR_AUDIO) -> tuple[StreamProtocol, list[StatusEvent]]:
    handle = SessionHandle("sid", "tok", GEOMETRY, (OutputFormat.JPEG,), AudioEncoding.PCM_S16LE,
                           seed=None, idle_mode=idle_mode)
    events: list[StatusEvent] = []
    return StreamProtocol(handle, events, include_events=include_events, decode=decode,
                          on_event=on_event), events


def _status(kind: int) -> pb.ServerMessage:
    return pb.ServerMessage(status=pb.StatusEvent(kind=kind))


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_outgoing_hello_stamping_and_end_of_input() -> None:
    proto, _ = _protocol()
    assert proto.hello().hello.session_id == "sid" and proto.hello().hello.session_token == "tok"
    first = proto.to_message(np.zeros(320, np.int16))
    second = proto.to_message(np.zeros(320, np.int16))
    assert (first.audio.seq, first.audio.pts_ms, second.audio.seq, second.audio.pts_ms) == (0, 0, 1, 20)
    assert proto.is_end_of_input(proto.to_message(StreamMarker.END_OF_INPUT))
    assert proto.is_end_of_input(proto.end_of_input())
    assert not proto.is_end_of_input(proto.to_message(StreamMarker.INTERRUPT))
    assert not proto.is_end_of_input(first)
    with pytest.raises(InvalidArgument):
        proto.to_message("not audio")
    proto.sent(first)
    proto.sent(proto.end_of_input())
    assert proto.stats.audio_chunks_sent == 1 and proto.stats.first_audio_sent_at is not None


def test_audio_items_paced_only_when_realtime() -> None:
    proto, _ = _protocol()
    audio = [np.zeros(320, np.int16)]
    assert proto.audio_items(audio, False, 0.0) is audio
    paced = proto.audio_items(audio, True, 40.0, sleep=lambda s: None)
    assert isinstance(paced, RealtimePacer) and paced.lead_s == 0.04 and list(paced) == audio


def test_receive_classifies_replies_and_records_events() -> None:
    seen: list[StatusEvent] = []
    proto, events = _protocol(on_event=seen.append)
    assert proto.receive(_status(pb.StatusEvent.KIND_STARTED), 1.0) is None  # events not yielded
    assert proto.started and not proto.ended
    video = pb.ServerMessage(video=pb.VideoChunk(block_index=0, num_frames=12, width=32, height=24,
                                                 jpeg_frames=[b"not decoded"] * 12))
    assert not proto.needs_decoding(video)  # decode=False
    block = proto.receive(video, 2.0)
    assert isinstance(block, VideoBlock) and block.num_frames == 12 and block.frames == []
    assert proto.stats.blocks == 1 and proto.stats.first_block_at == 2.0
    assert proto.receive(_status(pb.StatusEvent.KIND_END_OF_STREAM), 3.0) is None
    assert proto.ended
    assert [e.kind for e in events] == [EventKind.STARTED, EventKind.END_OF_STREAM] == [e.kind for e in seen]
    with pytest.raises(ProtocolError, match="empty or unknown"):
        proto.receive(pb.ServerMessage(), 4.0)


def test_receive_yields_events_when_asked_and_uses_a_block_decoded_elsewhere() -> None:
    proto, _ = _protocol(include_events=True, decode=True)
    event = proto.receive(_status(pb.StatusEvent.KIND_IDLE), 1.0)
    assert isinstance(event, StatusEvent) and event.kind is EventKind.IDLE
    video = pb.ServerMessage(video=pb.VideoChunk(num_frames=1, jpeg_frames=[b"x"]))
    assert proto.needs_decoding(video) and not proto.needs_decoding(_status(pb.StatusEvent.KIND_IDLE))
    ready = VideoBlock(block_index=0, pts_ms=0, duration_ms=480, frames=[], h264=None, is_idle=True,
                       width=32, height=24, num_frames=1)
    assert proto.receive(video, 2.0, ready) is ready
    assert proto.stats.idle_blocks == 1


def test_errors_audio_source_first_then_typed_status() -> None:
    proto, _ = _protocol()
    assert isinstance(proto.error_for(_RpcError(grpc.StatusCode.NOT_FOUND, "gone")), SessionNotFound)
    assert proto.error_for(KeyboardInterrupt()) is None  # not a gRPC error: re-raised as is
    proto.raise_feeder_error()  # nothing failed
    proto.write_failed = True
    lost = proto.error_for(_RpcError(grpc.StatusCode.INTERNAL, "boom"))
    assert isinstance(lost, ServerError) and "grpc/grpc#36066" in lost.details
    source = ValueError("bad audio")
    proto.feeder_failed(source)
    assert proto.error_for(_RpcError(grpc.StatusCode.CANCELLED, "cancelled")) is source
    with pytest.raises(ValueError, match="bad audio"):
        proto.raise_feeder_error()


def test_a_deadline_error_says_how_far_the_stream_got() -> None:
    from avatarserve_client import DeadlineExceeded

    proto, _ = _protocol()
    silent = proto.error_for(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert isinstance(silent, DeadlineExceeded)
    assert "no reply from the server, not even STARTED; 0 audio chunks sent" in silent.details
    proto.receive(_status(pb.StatusEvent.KIND_STARTED), 1.0)
    proto.receive(pb.ServerMessage(video=pb.VideoChunk(num_frames=1, jpeg_frames=[b"x"])), 2.0,
                  VideoBlock(block_index=0, pts_ms=0, duration_ms=480, frames=[], h264=None, is_idle=False,
                             width=32, height=24, num_frames=1))
    later = proto.error_for(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert "STARTED received, 1 video blocks" in later.details and "last event STARTED" in later.details
    # errors the server explained carry no progress note
    assert proto.error_for(_RpcError(grpc.StatusCode.NOT_FOUND, "gone")).details == "gone"


def test_live_sessions_never_stamp_audio_in_the_past() -> None:
    proto, _ = _protocol(idle_mode=IdleMode.FILL_SILENCE)
    proto.stats.started_at -= 1.0  # the stream has been open for a second
    msg = proto.to_message(np.zeros(320, np.int16))
    assert msg.audio.pts_ms >= 1000
