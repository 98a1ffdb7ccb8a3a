"""AvatarServe client SDK: create a Live Avatar session, stream audio in, get video out.

    from avatarserve_client import AvatarClient, read_wav, chunk_pcm, write_mp4

    pcm = read_wav("speech.wav")
    with AvatarClient("localhost:9000", application="avatarserve") as client:
        with client.session("face.png", prompt="a person talking") as s:
            blocks = list(s.stream(chunk_pcm(pcm), realtime=True))
    write_mp4("out.mp4", blocks, pcm)
"""

from ._streaming import StreamMarker, StreamStats
from .aio import AsyncAvatarClient, AsyncSession
from .audio import (SAMPLE_RATE, RealtimePacer, chunk_pcm, float_to_pcm16, pcm_to_bytes, read_wav,
                    resample, silence)
from .client import AvatarClient, Session
from .errors import (AvatarServeError, CapacityExhausted, Cancelled, DeadlineExceeded,
                     FailedPrecondition, InvalidArgument, MediaError, MissingDependency,
                     PermissionDenied, ProtocolError, ServerError, SessionNotFound, Unauthenticated,
                     Unavailable, from_rpc_error)
from .media import Mp4Writer, VideoBlock, decode_h264, decode_jpeg, write_mp4
from .types import (AudioEncoding, CloseSummary, Counters, EventKind, Geometry, IdleMode,
                    OutputFormat, SessionHandle, SessionInfo, SessionState, StatusEvent, UtteranceProgress)

INTERRUPT = StreamMarker.INTERRUPT
END_OF_INPUT = StreamMarker.END_OF_INPUT
END_OF_UTTERANCE = StreamMarker.END_OF_UTTERANCE

__all__ = [
    "AsyncAvatarClient", "AsyncSession", "AudioEncoding", "AvatarClient", "AvatarServeError",
    "Cancelled", "CapacityExhausted", "CloseSummary", "Counters", "DeadlineExceeded",
    "END_OF_INPUT", "END_OF_UTTERANCE", "EventKind", "FailedPrecondition", "Geometry", "INTERRUPT", "IdleMode",
    "InvalidArgument", "MediaError", "MissingDependency", "Mp4Writer", "OutputFormat",
    "PermissionDenied", "ProtocolError", "RealtimePacer", "SAMPLE_RATE", "ServerError",
    "Session", "SessionHandle", "SessionInfo", "SessionNotFound", "SessionState", "StatusEvent",
    "StreamMarker", "StreamStats", "Unauthenticated", "Unavailable", "UtteranceProgress", "VideoBlock", "chunk_pcm",
    "decode_h264",
    "decode_jpeg", "float_to_pcm16", "from_rpc_error", "pcm_to_bytes", "read_wav", "resample",
    "silence", "write_mp4",
]
