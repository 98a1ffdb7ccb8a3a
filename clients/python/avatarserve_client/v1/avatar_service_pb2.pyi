from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_JPEG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_H264: _ClassVar[OutputFormat]

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_PCM_S16LE: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_PCM_F32LE: _ClassVar[AudioEncoding]

class IdleMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IDLE_MODE_UNSPECIFIED: _ClassVar[IdleMode]
    IDLE_MODE_FILL_SILENCE: _ClassVar[IdleMode]
    IDLE_MODE_WAIT_FOR_AUDIO: _ClassVar[IdleMode]

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_CREATED: _ClassVar[SessionState]
    SESSION_STATE_STREAMING: _ClassVar[SessionState]
    SESSION_STATE_IDLE: _ClassVar[SessionState]
    SESSION_STATE_CLOSED: _ClassVar[SessionState]
    SESSION_STATE_FAILED: _ClassVar[SessionState]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_JPEG: OutputFormat
OUTPUT_FORMAT_H264: OutputFormat
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
AUDIO_ENCODING_PCM_S16LE: AudioEncoding
AUDIO_ENCODING_PCM_F32LE: AudioEncoding
IDLE_MODE_UNSPECIFIED: IdleMode
IDLE_MODE_FILL_SILENCE: IdleMode
IDLE_MODE_WAIT_FOR_AUDIO: IdleMode
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_CREATED: SessionState
SESSION_STATE_STREAMING: SessionState
SESSION_STATE_IDLE: SessionState
SESSION_STATE_CLOSED: SessionState
SESSION_STATE_FAILED: SessionState

class AudioFormat(_message.Message):
    __slots__ = ("encoding", "sample_rate_hz", "channels")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rate_hz: int
    channels: int
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate_hz: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class IdleOptions(_message.Message):
    __slots__ = ("mode", "fill_grace_ms", "idle_timeout_s")
    MODE_FIELD_NUMBER: _ClassVar[int]
    FILL_GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    mode: IdleMode
    fill_grace_ms: int
    idle_timeout_s: int
    def __init__(self, mode: _Optional[_Union[IdleMode, str]] = ..., fill_grace_ms: _Optional[int] = ..., idle_timeout_s: _Optional[int] = ...) -> None: ...

class SessionOptions(_message.Message):
    __slots__ = ("width", "height", "seed", "output_formats", "jpeg_quality", "audio_format", "idle", "return_audio")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FORMAT_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    RETURN_AUDIO_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    seed: int
    output_formats: _containers.RepeatedScalarFieldContainer[OutputFormat]
    jpeg_quality: int
    audio_format: AudioFormat
    idle: IdleOptions
    return_audio: bool
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ..., output_formats: _Optional[_Iterable[_Union[OutputFormat, str]]] = ..., jpeg_quality: _Optional[int] = ..., audio_format: _Optional[_Union[AudioFormat, _Mapping]] = ..., idle: _Optional[_Union[IdleOptions, _Mapping]] = ..., return_audio: _Optional[bool] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("reference_image", "prompt", "options")
    REFERENCE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    reference_image: bytes
    prompt: str
    options: SessionOptions
    def __init__(self, reference_image: _Optional[bytes] = ..., prompt: _Optional[str] = ..., options: _Optional[_Union[SessionOptions, _Mapping]] = ...) -> None: ...

class SessionGeometry(_message.Message):
    __slots__ = ("fps", "frames_per_block", "sample_rate", "samples_per_block", "width", "height")
    FPS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    fps: int
    frames_per_block: int
    sample_rate: int
    samples_per_block: int
    width: int
    height: int
    def __init__(self, fps: _Optional[int] = ..., frames_per_block: _Optional[int] = ..., sample_rate: _Optional[int] = ..., samples_per_block: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session_id", "session_token", "geometry", "effective_options")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    session_token: str
    geometry: SessionGeometry
    effective_options: SessionOptions
    def __init__(self, session_id: _Optional[str] = ..., session_token: _Optional[str] = ..., geometry: _Optional[_Union[SessionGeometry, _Mapping]] = ..., effective_options: _Optional[_Union[SessionOptions, _Mapping]] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("hello", "audio", "control")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    audio: AudioChunk
    control: Control
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., control: _Optional[_Union[Control, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("session_id", "session_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    session_token: str
    def __init__(self, session_id: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("seq", "pts_ms", "pcm")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PTS_MS_FIELD_NUMBER: _ClassVar[int]
    PCM_FIELD_NUMBER: _ClassVar[int]
    seq: int
    pts_ms: int
    pcm: bytes
    def __init__(self, seq: _Optional[int] = ..., pts_ms: _Optional[int] = ..., pcm: _Optional[bytes] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("kind",)
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Control.Kind]
        KIND_INTERRUPT: _ClassVar[Control.Kind]
        KIND_END_OF_INPUT: _ClassVar[Control.Kind]
        KIND_END_OF_UTTERANCE: _ClassVar[Control.Kind]
    KIND_UNSPECIFIED: Control.Kind
    KIND_INTERRUPT: Control.Kind
    KIND_END_OF_INPUT: Control.Kind
    KIND_END_OF_UTTERANCE: Control.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: Control.Kind
    def __init__(self, kind: _Optional[_Union[Control.Kind, str]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("video", "status")
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    video: VideoChunk
    status: StatusEvent
    def __init__(self, video: _Optional[_Union[VideoChunk, _Mapping]] = ..., status: _Optional[_Union[StatusEvent, _Mapping]] = ...) -> None: ...

class VideoChunk(_message.Message):
    __slots__ = ("block_index", "pts_ms", "duration_ms", "jpeg_frames", "h264", "is_idle", "width", "height", "num_frames", "audio_pcm")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    PTS_MS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    JPEG_FRAMES_FIELD_NUMBER: _ClassVar[int]
    H264_FIELD_NUMBER: _ClassVar[int]
    IS_IDLE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PCM_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    pts_ms: int
    duration_ms: int
    jpeg_frames: _containers.RepeatedScalarFieldContainer[bytes]
    h264: bytes
    is_idle: bool
    width: int
    height: int
    num_frames: int
    audio_pcm: bytes
    def __init__(self, block_index: _Optional[int] = ..., pts_ms: _Optional[int] = ..., duration_ms: _Optional[int] = ..., jpeg_frames: _Optional[_Iterable[bytes]] = ..., h264: _Optional[bytes] = ..., is_idle: _Optional[bool] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_frames: _Optional[int] = ..., audio_pcm: _Optional[bytes] = ...) -> None: ...

class SessionCounters(_message.Message):
    __slots__ = ("audio_samples_received", "audio_chunks_received", "audio_samples_late", "audio_samples_discarded", "blocks_generated", "blocks_delivered", "idle_blocks_delivered", "frames_delivered", "interrupts", "streams_opened")
    AUDIO_SAMPLES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    AUDIO_CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SAMPLES_LATE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SAMPLES_DISCARDED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    IDLE_BLOCKS_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTS_FIELD_NUMBER: _ClassVar[int]
    STREAMS_OPENED_FIELD_NUMBER: _ClassVar[int]
    audio_samples_received: int
    audio_chunks_received: int
    audio_samples_late: int
    audio_samples_discarded: int
    blocks_generated: int
    blocks_delivered: int
    idle_blocks_delivered: int
    frames_delivered: int
    interrupts: int
    streams_opened: int
    def __init__(self, audio_samples_received: _Optional[int] = ..., audio_chunks_received: _Optional[int] = ..., audio_samples_late: _Optional[int] = ..., audio_samples_discarded: _Optional[int] = ..., blocks_generated: _Optional[int] = ..., blocks_delivered: _Optional[int] = ..., idle_blocks_delivered: _Optional[int] = ..., frames_delivered: _Optional[int] = ..., interrupts: _Optional[int] = ..., streams_opened: _Optional[int] = ...) -> None: ...

class StatusEvent(_message.Message):
    __slots__ = ("kind", "message", "code", "pts_ms", "block_index", "counters", "geometry", "utterance")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[StatusEvent.Kind]
        KIND_STARTED: _ClassVar[StatusEvent.Kind]
        KIND_IDLE: _ClassVar[StatusEvent.Kind]
        KIND_SPEAKING: _ClassVar[StatusEvent.Kind]
        KIND_INTERRUPTED: _ClassVar[StatusEvent.Kind]
        KIND_DRAINED: _ClassVar[StatusEvent.Kind]
        KIND_END_OF_STREAM: _ClassVar[StatusEvent.Kind]
        KIND_WARNING: _ClassVar[StatusEvent.Kind]
        KIND_UTTERANCE_STARTED: _ClassVar[StatusEvent.Kind]
        KIND_UTTERANCE_ENDED: _ClassVar[StatusEvent.Kind]
    KIND_UNSPECIFIED: StatusEvent.Kind
    KIND_STARTED: StatusEvent.Kind
    KIND_IDLE: StatusEvent.Kind
    KIND_SPEAKING: StatusEvent.Kind
    KIND_INTERRUPTED: StatusEvent.Kind
    KIND_DRAINED: StatusEvent.Kind
    KIND_END_OF_STREAM: StatusEvent.Kind
    KIND_WARNING: StatusEvent.Kind
    KIND_UTTERANCE_STARTED: StatusEvent.Kind
    KIND_UTTERANCE_ENDED: StatusEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    PTS_MS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_FIELD_NUMBER: _ClassVar[int]
    kind: StatusEvent.Kind
    message: str
    code: str
    pts_ms: int
    block_index: int
    counters: SessionCounters
    geometry: SessionGeometry
    utterance: UtteranceProgress
    def __init__(self, kind: _Optional[_Union[StatusEvent.Kind, str]] = ..., message: _Optional[str] = ..., code: _Optional[str] = ..., pts_ms: _Optional[int] = ..., block_index: _Optional[int] = ..., counters: _Optional[_Union[SessionCounters, _Mapping]] = ..., geometry: _Optional[_Union[SessionGeometry, _Mapping]] = ..., utterance: _Optional[_Union[UtteranceProgress, _Mapping]] = ...) -> None: ...

class UtteranceProgress(_message.Message):
    __slots__ = ("index", "start_pts_ms", "duration_ms", "played_ms", "interrupted")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    START_PTS_MS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    PLAYED_MS_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    index: int
    start_pts_ms: int
    duration_ms: int
    played_ms: int
    interrupted: bool
    def __init__(self, index: _Optional[int] = ..., start_pts_ms: _Optional[int] = ..., duration_ms: _Optional[int] = ..., played_ms: _Optional[int] = ..., interrupted: _Optional[bool] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id", "session_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    session_token: str
    def __init__(self, session_id: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "state", "counters", "geometry", "effective_options", "created_at_unix_ms", "last_audio_at_unix_ms", "closed_at_unix_ms", "stream_open", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_AUDIO_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STREAM_OPEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    state: SessionState
    counters: SessionCounters
    geometry: SessionGeometry
    effective_options: SessionOptions
    created_at_unix_ms: int
    last_audio_at_unix_ms: int
    closed_at_unix_ms: int
    stream_open: bool
    error: str
    def __init__(self, session_id: _Optional[str] = ..., state: _Optional[_Union[SessionState, str]] = ..., counters: _Optional[_Union[SessionCounters, _Mapping]] = ..., geometry: _Optional[_Union[SessionGeometry, _Mapping]] = ..., effective_options: _Optional[_Union[SessionOptions, _Mapping]] = ..., created_at_unix_ms: _Optional[int] = ..., last_audio_at_unix_ms: _Optional[int] = ..., closed_at_unix_ms: _Optional[int] = ..., stream_open: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id", "session_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    session_token: str
    def __init__(self, session_id: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("counters", "duration_ms")
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    counters: SessionCounters
    duration_ms: int
    def __init__(self, counters: _Optional[_Union[SessionCounters, _Mapping]] = ..., duration_ms: _Optional[int] = ...) -> None: ...
