"""The StreamSession logic both clients share, without I/O.

`Session.stream` (threads, blocking gRPC) and `AsyncSession.stream` (tasks, grpc.aio) only move
messages: the sync client feeds its SendQueue from a thread and iterates the call, the asyncio
client feeds its AsyncSendQueue and writes from tasks and awaits `call.read()`. What goes over
the wire and what comes back out is decided here, once:

* outgoing: the Hello, audio items turned into stamped ClientMessages (realtime pacing
  included), where END_OF_INPUT ends the feed;
* incoming: each ServerMessage classified into a VideoBlock (decoded unless `decode=False`) or
  a StatusEvent (recorded, reported to `on_event`, yielded only with `include_events`), stream
  statistics, STARTED / END_OF_STREAM;
* failure: which error the stream raises (an audio-source error first, else the gRPC status as
  a typed AvatarServeError).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import grpc

from avatarserve_client.v1 import avatar_service_pb2 as pb

from ._streaming import AudioStamper, StreamStats, control_message
from .audio import RealtimePacer
from .errors import AvatarServeError, ProtocolError, from_rpc_error
from .media import VideoBlock, video_block_from_proto
from .types import EventKind, IdleMode, SessionHandle, StatusEvent

StreamItem = VideoBlock | StatusEvent

# grpc.aio replaces the server's status with INTERNAL when a write is in flight as the server
# ends the call (grpc/grpc#36066); said so in the error instead of leaving a bare INTERNAL.
_LOST_STATUS_NOTE = (" (the server ended the stream while audio was being sent; "
                     "grpc.aio lost the server's status, see grpc/grpc#36066)")


class StreamProtocol:
    """State and rules of one StreamSession call (one `stream()` iteration).

    Attributes:
        stats: the stream's StreamStats (the session exposes it as `session.stats`).
        started: a STARTED event arrived (the asyncio client holds audio back until then).
        ended: END_OF_STREAM arrived; the call is over and needs no cancelling.
        feeder_error: what the audio source (or stamping its items) raised, if anything.
        write_failed: a write on the call failed (the call had ended; the reading side says why).
    """

    def __init__(self, handle: SessionHandle, events: list[StatusEvent], *, include_events: bool,
                 decode: bool, on_event: Callable[[StatusEvent], None] | None) -> None:
        self.handle = handle
        self.geometry = handle.geometry
        self.events = events
        self.include_events = include_events
        self.decode = decode
        self.on_event = on_event
        self.stats = StreamStats(started_at=time.monotonic())
        live = handle.idle_mode is IdleMode.FILL_SILENCE
        # Live sessions fill silence in real time: audio must not be stamped in the past.
        self._stamper = AudioStamper(handle.audio_encoding, self.geometry.sample_rate,
                                     floor_ms=self._elapsed_ms if live else None)
        self.started = False
        self.ended = False
        self.feeder_error: BaseException | None = None
        self.write_failed = False
        self.last_event: EventKind | None = None  # kind of the last StatusEvent received

    def _elapsed_ms(self) -> int:
        return int((time.monotonic() - self.stats.started_at) * 1000)

    # -- outgoing --------------------------------------------------------------------------

    def hello(self) -> pb.ClientMessage:
        return pb.ClientMessage(hello=pb.Hello(session_id=self.handle.session_id,
                                               session_token=self.handle.session_token))

    def audio_items(self, audio: Any, realtime: bool, lead_ms: float,
                    sleep: Callable[[float], Any] | None = None) -> Any:
        """The audio iterable, paced to real time (`lead_ms` ahead) when `realtime`.

        `sleep` replaces the pacer's blocking sleep (the sync client passes an Event's wait, so
        pacing stops when the stream ends); `async for` over the pacer sleeps with asyncio.
        """
        if not realtime:
            return audio
        return RealtimePacer(audio, lead_ms=lead_ms, sample_rate=self.geometry.sample_rate,
                             bytes_per_sample=self.handle.audio_encoding.sample_size,
                             **({} if sleep is None else {"sleep": sleep}))

    def to_message(self, item: Any) -> pb.ClientMessage:
        """An audio-iterable item as the ClientMessage to queue (raises InvalidArgument)."""
        return self._stamper.to_message(item)

    @staticmethod
    def is_end_of_input(msg: pb.ClientMessage) -> bool:
        """END_OF_INPUT closes the send queue: nothing from the audio source is sent after it."""
        return msg.WhichOneof("kind") == "control" and msg.control.kind == pb.Control.KIND_END_OF_INPUT

    @staticmethod
    def end_of_input() -> pb.ClientMessage:
        return control_message(pb.Control.KIND_END_OF_INPUT)

    def sent(self, msg: pb.ClientMessage) -> None:
        """`msg` was handed to gRPC."""
        self.stats.on_sent(msg)

    def feeder_failed(self, exc: BaseException) -> None:
        """The audio source raised: the stream is cancelled and raises this error."""
        self.feeder_error = exc

    # -- incoming --------------------------------------------------------------------------

    def needs_decoding(self, reply: pb.ServerMessage) -> bool:
        """The reply is video whose frames `receive` would decode (CPU work)."""
        return (self.decode and reply.WhichOneof("kind") == "video"
                and bool(reply.video.jpeg_frames or reply.video.HasField("h264")))

    def video_block(self, reply: pb.ServerMessage, now: float) -> VideoBlock:
        """The reply's video as a VideoBlock (frames decoded unless `decode=False`); no state."""
        return video_block_from_proto(reply.video, fps=self.geometry.fps, received_at=now,
                                      decode=self.decode)

    def receive(self, reply: pb.ServerMessage, now: float,
                block: VideoBlock | None = None) -> StreamItem | None:
        """Account for one ServerMessage; returns what the stream yields for it (or None).

        `block`: the reply's VideoBlock when the caller already made it (off the event loop).
        """
        kind = reply.WhichOneof("kind")
        if kind == "video":
            if block is None:
                block = self.video_block(reply, now)
            self.stats.on_block(block.num_frames, block.is_idle, now)
            return block
        if kind == "status":
            event = StatusEvent.from_proto(reply.status, now)
            self.started |= event.kind is EventKind.STARTED
            self.last_event = event.kind
            self.ended |= event.kind is EventKind.END_OF_STREAM
            self.events.append(event)
            if self.on_event is not None:
                self.on_event(event)
            return event if self.include_events else None
        raise ProtocolError(f"server sent an empty or unknown ServerMessage ({kind!r})")

    # -- failure ---------------------------------------------------------------------------

    def progress(self) -> str:
        """What the stream got so far, in words: for an error the server could not explain (a deadline)."""
        st = self.stats
        sent = f"{st.audio_chunks_sent} audio chunks sent"
        elapsed = f"after {time.monotonic() - st.started_at:.1f} s"
        if not self.started and self.last_event is None and not st.blocks:
            return f"{elapsed}: no reply from the server, not even STARTED; {sent}"
        last = self.last_event.name if self.last_event is not None else "none"
        since = "" if st.last_block_at is None else f", the last {time.monotonic() - st.last_block_at:.1f} s ago"
        return f"{elapsed}: STARTED {'received' if self.started else 'not received'}, {st.blocks} video blocks" \
               f"{since}, last event {last}; {sent}"

    def raise_feeder_error(self) -> None:
        """After the server's replies ended: an audio-source failure is the stream's error."""
        if self.feeder_error is not None:
            raise self.feeder_error

    def error_for(self, exc: BaseException) -> BaseException | None:
        """The error to raise (from `exc`) when the call failed with `exc`; None: re-raise `exc`.

        The audio source's error wins (it cancelled the call); a gRPC status becomes its typed
        AvatarServeError.
        """
        if self.feeder_error is not None:
            return self.feeder_error
        if isinstance(exc, grpc.RpcError):
            error: AvatarServeError = from_rpc_error(exc)
            if self.write_failed and error.code is grpc.StatusCode.INTERNAL:
                error.details += _LOST_STATUS_NOTE
            if error.code is grpc.StatusCode.DEADLINE_EXCEEDED:
                # The server had no say: what this stream got before the deadline tells where it stopped.
                error.details += f" ({self.progress()})"
            return error
        return None
