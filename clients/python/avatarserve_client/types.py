"""Plain-Python views of the API messages (so callers need not touch protobuf)."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Sequence

from avatarserve_client.v1 import avatar_service_pb2 as pb

from .errors import InvalidArgument


class SessionState(str, enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    CREATED = "CREATED"
    STREAMING = "STREAMING"
    IDLE = "IDLE"
    CLOSED = "CLOSED"
    FAILED = "FAILED"

    @classmethod
    def from_proto(cls, value: int) -> "SessionState":
        name = pb.SessionState.Name(value).removeprefix("SESSION_STATE_")
        return cls(name)


class EventKind(str, enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    STARTED = "STARTED"
    IDLE = "IDLE"
    SPEAKING = "SPEAKING"
    INTERRUPTED = "INTERRUPTED"
    DRAINED = "DRAINED"
    END_OF_STREAM = "END_OF_STREAM"
    WARNING = "WARNING"
    UTTERANCE_STARTED = "UTTERANCE_STARTED"
    UTTERANCE_ENDED = "UTTERANCE_ENDED"

    @classmethod
    def from_proto(cls, value: int) -> "EventKind":
        try:
            name = pb.StatusEvent.Kind.Name(value).removeprefix("KIND_")
        except ValueError:
            return cls.UNSPECIFIED  # a kind added by a newer server
        return cls(name)


class OutputFormat(str, enum.Enum):
    JPEG = "jpeg"
    H264 = "h264"

    def to_proto(self) -> int:
        return {OutputFormat.JPEG: pb.OUTPUT_FORMAT_JPEG, OutputFormat.H264: pb.OUTPUT_FORMAT_H264}[self]


class IdleMode(str, enum.Enum):
    FILL_SILENCE = "fill_silence"
    WAIT_FOR_AUDIO = "wait_for_audio"

    def to_proto(self) -> int:
        return {IdleMode.FILL_SILENCE: pb.IDLE_MODE_FILL_SILENCE,
                IdleMode.WAIT_FOR_AUDIO: pb.IDLE_MODE_WAIT_FOR_AUDIO}[self]

    @classmethod
    def from_proto(cls, value: int) -> "IdleMode":
        return cls.WAIT_FOR_AUDIO if value == pb.IDLE_MODE_WAIT_FOR_AUDIO else cls.FILL_SILENCE


class AudioEncoding(str, enum.Enum):
    PCM_S16LE = "s16le"
    PCM_F32LE = "f32le"

    @property
    def sample_size(self) -> int:
        return 2 if self is AudioEncoding.PCM_S16LE else 4

    def to_proto(self) -> int:
        return {AudioEncoding.PCM_S16LE: pb.AUDIO_ENCODING_PCM_S16LE,
                AudioEncoding.PCM_F32LE: pb.AUDIO_ENCODING_PCM_F32LE}[self]

    @classmethod
    def from_proto(cls, value: int) -> "AudioEncoding":
        return cls.PCM_F32LE if value == pb.AUDIO_ENCODING_PCM_F32LE else cls.PCM_S16LE


def parse_formats(formats: Iterable[str | OutputFormat] | str) -> list[OutputFormat]:
    """Accept "jpeg", "h264", "jpeg,h264" or a sequence of those / OutputFormat values."""
    if isinstance(formats, str):
        formats = [f for f in formats.split(",") if f.strip()]
    out: list[OutputFormat] = []
    for f in formats:
        try:
            fmt = f if isinstance(f, OutputFormat) else OutputFormat(str(f).strip().lower())
        except ValueError:
            raise InvalidArgument(f"unknown output format {f!r}; expected 'jpeg' or 'h264'") from None
        if fmt not in out:
            out.append(fmt)
    if not out:
        raise InvalidArgument("at least one output format is required ('jpeg' and/or 'h264')")
    return out


@dataclass(frozen=True)
class Geometry:
    """Timing and size of a session's media (see SessionGeometry in the proto)."""

    fps: int
    frames_per_block: int
    sample_rate: int
    samples_per_block: int
    width: int
    height: int

    @property
    def block_duration_ms(self) -> float:
        return 1000.0 * self.frames_per_block / self.fps

    @classmethod
    def from_proto(cls, g: pb.SessionGeometry) -> "Geometry":
        return cls(fps=g.fps, frames_per_block=g.frames_per_block, sample_rate=g.sample_rate,
                   samples_per_block=g.samples_per_block, width=g.width, height=g.height)


@dataclass(frozen=True)
class Counters:
    """Session totals (see SessionCounters in the proto)."""

    audio_samples_received: int = 0
    audio_chunks_received: int = 0
    audio_samples_late: int = 0
    audio_samples_discarded: int = 0
    blocks_generated: int = 0
    blocks_delivered: int = 0
    idle_blocks_delivered: int = 0
    frames_delivered: int = 0
    interrupts: int = 0
    streams_opened: int = 0

    @classmethod
    def from_proto(cls, c: pb.SessionCounters) -> "Counters":
        return cls(**{f.name: getattr(c, f.name) for f in dataclasses.fields(cls)})


def _from_unix_ms(ms: int) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc) if ms else None


@dataclass(frozen=True)
class SessionHandle:
    """What CreateSession returned: the credentials and media geometry of a new session."""

    session_id: str
    session_token: str
    geometry: Geometry
    output_formats: tuple[OutputFormat, ...]
    audio_encoding: AudioEncoding
    seed: int | None
    idle_mode: IdleMode = IdleMode.FILL_SILENCE

    @classmethod
    def from_proto(cls, r: pb.CreateSessionResponse) -> "SessionHandle":
        opts = r.effective_options
        formats = tuple(OutputFormat.JPEG if f == pb.OUTPUT_FORMAT_JPEG else OutputFormat.H264
                        for f in opts.output_formats if f != pb.OUTPUT_FORMAT_UNSPECIFIED)
        return cls(session_id=r.session_id, session_token=r.session_token,
                   geometry=Geometry.from_proto(r.geometry),
                   output_formats=formats or (OutputFormat.JPEG,),
                   audio_encoding=AudioEncoding.from_proto(opts.audio_format.encoding),
                   seed=opts.seed if opts.HasField("seed") else None,
                   idle_mode=IdleMode.from_proto(opts.idle.mode))


@dataclass(frozen=True)
class SessionInfo:
    """A snapshot of a session (GetSession)."""

    session_id: str
    state: SessionState
    counters: Counters
    geometry: Geometry
    stream_open: bool
    created_at: datetime | None
    last_audio_at: datetime | None
    closed_at: datetime | None
    error: str
    seed: int | None

    @classmethod
    def from_proto(cls, s: pb.SessionInfo) -> "SessionInfo":
        opts = s.effective_options
        return cls(session_id=s.session_id, state=SessionState.from_proto(s.state),
                   counters=Counters.from_proto(s.counters), geometry=Geometry.from_proto(s.geometry),
                   stream_open=s.stream_open, created_at=_from_unix_ms(s.created_at_unix_ms),
                   last_audio_at=_from_unix_ms(s.last_audio_at_unix_ms),
                   closed_at=_from_unix_ms(s.closed_at_unix_ms), error=s.error,
                   seed=opts.seed if opts.HasField("seed") else None)


@dataclass(frozen=True)
class CloseSummary:
    """Final totals returned by CloseSession."""

    counters: Counters
    duration_s: float

    @classmethod
    def from_proto(cls, r: pb.CloseSessionResponse) -> "CloseSummary":
        return cls(counters=Counters.from_proto(r.counters), duration_s=r.duration_ms / 1000.0)


@dataclass(frozen=True)
class UtteranceProgress:
    """Playback of one utterance (UTTERANCE_STARTED / UTTERANCE_ENDED events)."""

    index: int  # 0-based within the stream
    start_pts_ms: int  # stream-clock position of its first audio
    duration_ms: int  # its audio received so far
    played_ms: int  # of it, delivered as video, from its start
    interrupted: bool  # UTTERANCE_ENDED only: an INTERRUPT cut it

    @classmethod
    def from_proto(cls, u: pb.UtteranceProgress) -> "UtteranceProgress":
        return cls(index=u.index, start_pts_ms=u.start_pts_ms, duration_ms=u.duration_ms, played_ms=u.played_ms,
                   interrupted=u.interrupted)


@dataclass(frozen=True)
class StatusEvent:
    """A StatusEvent from the stream, plus the local monotonic time it was received."""

    kind: EventKind
    message: str
    code: str
    pts_ms: int
    block_index: int
    counters: Counters
    geometry: Geometry | None
    received_at: float
    utterance: UtteranceProgress | None = None  # UTTERANCE_STARTED / UTTERANCE_ENDED

    @classmethod
    def from_proto(cls, e: pb.StatusEvent, received_at: float) -> "StatusEvent":
        return cls(kind=EventKind.from_proto(e.kind), message=e.message, code=e.code,
                   pts_ms=e.pts_ms, block_index=e.block_index,
                   counters=Counters.from_proto(e.counters),
                   geometry=Geometry.from_proto(e.geometry) if e.HasField("geometry") else None,
                   received_at=received_at,
                   utterance=UtteranceProgress.from_proto(e.utterance) if e.HasField("utterance") else None)


def build_create_request(
    image_bytes: bytes,
    prompt: str,
    *,
    width: int,
    height: int,
    seed: int | None,
    formats: Sequence[OutputFormat],
    jpeg_quality: int,
    audio_encoding: AudioEncoding,
    idle_mode: IdleMode | str | None,
    fill_grace_ms: int,
    idle_timeout_s: int,
    return_audio: bool = False,
) -> pb.CreateSessionRequest:
    """Validate option values locally (cheap, clear messages) and build the request."""
    for name, value in (("width", width), ("height", height), ("jpeg_quality", jpeg_quality),
                        ("fill_grace_ms", fill_grace_ms), ("idle_timeout_s", idle_timeout_s)):
        if not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"{name} must be a non-negative int, got {value!r}")
    if (width == 0) != (height == 0):
        raise InvalidArgument(f"give both width and height or neither (got {width}x{height})")
    if jpeg_quality > 100:
        raise InvalidArgument(f"jpeg_quality must be 1..100 (0 = server default), got {jpeg_quality}")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**64):
        raise InvalidArgument(f"seed must be an int in [0, 2**64), got {seed!r}")
    opts = pb.SessionOptions(
        width=width, height=height, jpeg_quality=jpeg_quality,
        output_formats=[f.to_proto() for f in formats],
        audio_format=pb.AudioFormat(encoding=audio_encoding.to_proto(), sample_rate_hz=16000,
                                    channels=1),
        return_audio=bool(return_audio),
    )
    if seed is not None:
        opts.seed = seed
    if idle_mode is not None or fill_grace_ms or idle_timeout_s:
        mode = pb.IDLE_MODE_UNSPECIFIED
        if idle_mode is not None:
            try:
                mode = IdleMode(idle_mode).to_proto()
            except ValueError:
                raise InvalidArgument(
                    f"unknown idle_mode {idle_mode!r}; expected 'fill_silence' or 'wait_for_audio'"
                ) from None
        opts.idle.CopyFrom(pb.IdleOptions(mode=mode, fill_grace_ms=fill_grace_ms,
                                          idle_timeout_s=idle_timeout_s))
    return pb.CreateSessionRequest(reference_image=image_bytes, prompt=prompt, options=opts)
