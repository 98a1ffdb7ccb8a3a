"""AvatarServeVideoService: the live avatar of an AvatarServe session as a Pipecat video service.

Place it between the TTS service and the output transport::

    transport.input() -> stt -> user aggregator -> llm -> tts -> AvatarServeVideoService -> transport.output()

What it does with each frame:

* **StartFrame**: the session is created in ``setup()`` (the pipeline sets its processors up concurrently and holds
  this processor's StartFrame until then); once the StartFrame has passed, the stream opens. From then on video
  flows all the time: the session runs in the live idle mode (``fill_silence``), so the avatar is idle while nobody
  speaks.
* **TTSAudioRawFrame**: resampled to 16 kHz mono int16 and streamed to the avatar, paced to at most ``lead_ms`` ahead
  of the stream clock. The frame is consumed: the transport plays the avatar's copy of the audio, cut to match the
  video, instead of the TTS's (otherwise it would play twice). If the avatar stream is not running (it failed), the
  TTS audio is passed on unchanged, so the bot still speaks.
* **TTSStoppedFrame**: END_OF_UTTERANCE. TTSStartedFrame / TTSStoppedFrame are held back and passed on in step with
  the avatar: a TTSStartedFrame right before the first block of its utterance, a TTSStoppedFrame right after the
  block holding the utterance's last audio (the server's UTTERANCE_STARTED / UTTERANCE_ENDED events), so the output
  transport sees them where the avatar starts and stops speaking.
* **InterruptionFrame**: audio not yet sent is dropped, INTERRUPT is sent (when the avatar has speech left to cut),
  speech blocks still on their way are not shown, and the avatar goes idle. The frame is passed on, so the
  transport drops what it has queued.
* **EndFrame**: END_OF_INPUT; every remaining block is published (within ``drain_timeout_s``), then the session is
  closed and the EndFrame passed on.
* **CancelFrame**: the stream is cancelled and the session closed at once.

Out, for every block, in stream order: for each video frame an ``OutputImageRawFrame`` (RGB bytes, the session's
size, ``pts`` = its presentation time on the pipeline clock, ``sync_with_audio`` so the output transport shows it
when the audio before it has been played) followed by that frame's 40 ms of the block's audio (``return_audio``: the
exact samples that were sent for it, server-filled silence elsewhere): a ``TTSAudioRawFrame`` for speech blocks, an
``OutputAudioRawFrame`` for idle ones. Every such frame has ``metadata["avatarserve"]``: ``block_index``,
``frame_index`` (-1 for audio before a short first block's first frame), ``pts_ms`` (stream clock) and ``is_idle``.

Event handlers: ``on_utterance_started(service, progress)`` and ``on_utterance_ended(service, progress)`` with the
server's :class:`~avatarserve_client.UtteranceProgress` (``played_ms`` and ``interrupted`` say how much of an
interrupted utterance the avatar actually said).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

import grpc
import numpy as np

from .._streaming import StreamMarker, load_image_bytes, wait_event
from ..aio import AsyncAvatarClient, AsyncSession
from ..errors import AvatarServeError, InvalidArgument, MissingDependency
from ..media import VideoBlock
from ..types import CloseSummary, EventKind, Geometry, IdleMode, SessionHandle, StatusEvent

try:
    from loguru import logger
    from pipecat.audio.utils import create_stream_resampler
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        Frame,
        InterruptionFrame,
        OutputAudioRawFrame,
        OutputImageRawFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
    from pipecat.services.ai_service import AIService
    from pipecat.services.settings import ServiceSettings
    from pipecat.utils.errors import ErrorCategory
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency(exc.name or "pipecat-ai", "pipecat",
                            "AvatarServeVideoService (the Pipecat integration)") from exc

# Items of the queue between the pipeline and the stream's audio source.
_AUDIO, _END_OF_UTTERANCE, _INTERRUPT, _END_OF_INPUT = range(4)
# Largest audio chunk sent at once (the API accepts up to 1000 ms); small enough for smooth pacing.
_MAX_CHUNK_MS = 200

_ERROR_CATEGORIES = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorCategory.INVALID_REQUEST,
    grpc.StatusCode.OUT_OF_RANGE: ErrorCategory.INVALID_REQUEST,
    grpc.StatusCode.NOT_FOUND: ErrorCategory.INVALID_REQUEST,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorCategory.INVALID_REQUEST,
    grpc.StatusCode.PERMISSION_DENIED: ErrorCategory.AUTHORIZATION,
    grpc.StatusCode.UNAUTHENTICATED: ErrorCategory.AUTHENTICATION,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorCategory.RATE_LIMIT,
    grpc.StatusCode.UNAVAILABLE: ErrorCategory.CONNECTIVITY,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorCategory.CONNECTIVITY,
    grpc.StatusCode.INTERNAL: ErrorCategory.SERVER,
    grpc.StatusCode.UNKNOWN: ErrorCategory.SERVER,
    grpc.StatusCode.DATA_LOSS: ErrorCategory.SERVER,
}


@dataclass
class AvatarServeVideoSettings(ServiceSettings):
    """Settings of AvatarServeVideoService (nothing is updatable at run time; ``extra`` is accepted)."""


@dataclass
class _Held:
    """A TTSStartedFrame / TTSStoppedFrame waiting for the avatar to reach its utterance."""

    frame: Frame
    local: int | None  # local utterance id; None: pass on as soon as everything before it has gone
    started: bool  # TTSStartedFrame: goes at UTTERANCE_STARTED; TTSStoppedFrame: at UTTERANCE_ENDED


class AvatarServeVideoService(AIService):
    """AvatarServe's real-time avatar between a TTS service and the output transport (see the module docstring).

    Args:
        address: gRPC address of the AvatarServe API (``host:port``).
        image: the reference photo: a path, PNG/JPEG bytes, a PIL image or an HxWx3 uint8 RGB array.
        prompt: text prompt of the session ("" = the server's default).
        application: Ray Serve application name (request metadata ``application``), if the cluster runs several.
        seed, width, height, jpeg_quality, fill_grace_ms, idle_timeout_s: session options (0 / None = server
            defaults; see ``SessionOptions`` in the API).
        lead_ms: how far ahead of the stream clock audio is sent. TTS is usually faster than real time; at least one
            block (480 ms) of lead lets a block start generating as soon as its audio is there, while a small lead
            keeps the server's buffer (and how far the clock jumps at an INTERRUPT) small.
        sync_with_audio: set ``OutputImageRawFrame.sync_with_audio``, so the output transport shows each frame when
            the audio before it has been played (needs audio output on the transport).
        drain_timeout_s: how long an EndFrame waits for the remaining blocks before giving up.
        rpc_timeout_s: deadline of CreateSession (and the default of the other unary calls).
        close_timeout_s: deadline of CloseSession at stop / cancel.
        grpc_metadata: extra request metadata (e.g. an auth header for a gateway in front of the service).
        credentials: TLS channel credentials (None: plaintext).
        settings: Pipecat service settings.
        **kwargs: passed to AIService.
    """

    Settings = AvatarServeVideoSettings
    _settings: Settings

    def __init__(self, *, address: str, image: Any, prompt: str = "", application: str | None = None,
                 seed: int | None = None, width: int = 0, height: int = 0, jpeg_quality: int = 0,
                 fill_grace_ms: int = 0, idle_timeout_s: int = 0, lead_ms: float = 600.0,
                 sync_with_audio: bool = True, drain_timeout_s: float = 60.0, rpc_timeout_s: float = 60.0,
                 close_timeout_s: float = 5.0, grpc_metadata: Sequence[tuple[str, str]] = (),
                 credentials: grpc.ChannelCredentials | None = None, settings: Settings | None = None,
                 **kwargs: Any) -> None:
        default_settings = self.Settings(model=None)
        if settings is not None:
            default_settings.apply_update(settings)
        super().__init__(settings=default_settings, **kwargs)
        if not lead_ms >= 0:
            raise InvalidArgument(f"lead_ms must be >= 0, got {lead_ms!r}")
        self._address = address
        self._image = load_image_bytes(image)  # a bad image fails here, not when the pipeline starts
        self._prompt = prompt
        self._application = application
        self._session_options = dict(seed=seed, width=width, height=height, jpeg_quality=jpeg_quality,
                                     fill_grace_ms=fill_grace_ms, idle_timeout_s=idle_timeout_s)
        self._lead_ms = float(lead_ms)
        self._sync_with_audio = sync_with_audio
        self._drain_timeout_s = drain_timeout_s
        self._rpc_timeout_s = rpc_timeout_s
        self._close_timeout_s = close_timeout_s
        self._grpc_metadata = tuple(grpc_metadata)
        self._credentials = credentials

        self._client: AsyncAvatarClient | None = None
        self._session: AsyncSession | None = None
        self._stream_task: asyncio.Task | None = None
        self._stream_done = asyncio.Event()
        self._streaming = False  # the stream is open and takes audio
        self._ending = False  # END_OF_INPUT queued (an EndFrame): the stream is expected to end
        self._pending: asyncio.Queue[tuple[int, int, Any]] = asyncio.Queue()
        self._wake = asyncio.Event()  # cuts the pacing wait short (an interruption)
        self._generation = 0  # bumped by every interruption: queued items of older generations are dropped
        self._resampler: Any = None
        self._resampler_rate = 0
        self._sent_end = 0  # end of the audio sent, in stream-clock samples (mirrors the SDK's stamping)
        self._clock_origin_ns = 0  # pipeline clock at the stream's STARTED event

        # Utterances. Local ids count TTS utterances here (a boundary: TTSStoppedFrame after audio, interruption);
        # the server numbers the utterances whose audio it received, so the two are mapped when audio is sent.
        self._local = 0  # local utterance the next TTS audio belongs to
        self._local_has_audio = False
        self._local_context: dict[int, str | None] = {}
        self._sent_local: int | None = None  # local utterance of the audio sent last (None after a boundary)
        self._server_locals: dict[int, int] = {}  # server utterance index -> local id
        self._server_sent = 0  # server utterances started by audio sent
        self._server_ended = 0  # UTTERANCE_ENDED events received
        self._started_local = -1  # highest local utterance the avatar started saying
        self._ended_local = -1  # highest local utterance the avatar finished (or was cut)
        self._held: deque[_Held] = deque()
        self._playing_context: str | None = None
        self._awaiting_interrupted = 0  # INTERRUPTs sent and not answered yet: speech blocks are not shown
        self._ttfb_pending = False
        self.blocks_dropped = 0  # speech blocks not shown because of an interruption
        self.close_summary: CloseSummary | None = None  # the session's final counters, once it was closed

        self._register_event_handler("on_utterance_started")
        self._register_event_handler("on_utterance_ended")

    # -- properties ---------------------------------------------------------------------------------------------

    @property
    def session_id(self) -> str | None:
        """The AvatarServe session's id once it was created (None before)."""
        return self._session.session_id if self._session is not None else None

    @property
    def session_handle(self) -> SessionHandle | None:
        """The session's handle (id and token: keep it private) while the service holds the session."""
        return self._session.handle if self._session is not None else None

    @property
    def geometry(self) -> Geometry | None:
        """Frame size, fps and audio rate of the session (None before it was created)."""
        return self._session.geometry if self._session is not None else None

    def can_generate_metrics(self) -> bool:
        """TTFB here: first TTS audio of an utterance in -> first video frame of it out."""
        return True

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def setup(self, setup: FrameProcessorSetup):
        """Create the session (image upload, reference encoding): the slow part, done while the pipeline sets up."""
        await super().setup(setup)
        self._client = AsyncAvatarClient(self._address, timeout=self._rpc_timeout_s, application=self._application,
                                         metadata=self._grpc_metadata, credentials=self._credentials)
        handle = await self._client.create_session(
            self._image, self._prompt, formats=("jpeg",), idle_mode=IdleMode.FILL_SILENCE, return_audio=True,
            **self._session_options)
        self._session = self._client.attach(handle)
        g = handle.geometry
        logger.debug(f"{self}: AvatarServe session {handle.session_id} ({g.width}x{g.height}, {g.fps} fps)")

    async def stop(self, frame: EndFrame):
        """END_OF_INPUT, publish every remaining block, close the session."""
        await super().stop(frame)
        await self._drain()
        await self._teardown()

    async def cancel(self, frame: CancelFrame):
        """Cancel the stream and close the session at once."""
        await super().cancel(frame)
        await self._teardown()

    async def cleanup(self):
        """Release everything still held (idempotent with stop / cancel)."""
        await super().cleanup()
        await self._teardown()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        """Route TTS frames to the avatar and pass everything else on."""
        await super().process_frame(frame, direction)

        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._open_stream()
        elif direction is FrameDirection.DOWNSTREAM and isinstance(frame, TTSAudioRawFrame):
            if self._streaming:
                await self._handle_tts_audio(frame)
            else:
                await self.push_frame(frame, direction)  # no avatar: the bot still speaks
        elif direction is FrameDirection.DOWNSTREAM and isinstance(frame, TTSStartedFrame):
            self._note_context(frame.context_id)
            await self._hold(_Held(frame, self._local, started=True))
        elif direction is FrameDirection.DOWNSTREAM and isinstance(frame, TTSStoppedFrame):
            await self._handle_tts_stopped(frame)
        elif isinstance(frame, InterruptionFrame):
            await self._handle_interruption()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    def _classify_error(self, exception: Exception) -> ErrorCategory | None:
        if isinstance(exception, AvatarServeError) and exception.code is not None:
            return _ERROR_CATEGORIES.get(exception.code)
        return None

    # -- the stream ---------------------------------------------------------------------------------------------

    def _open_stream(self) -> None:
        if self._session is None or self._stream_task is not None:
            return  # no session (its creation failed and was reported), or already open
        self._stream_done = asyncio.Event()
        self._streaming = True
        self._stream_task = self.create_task(self._run_stream(self._session), "avatarserve_stream")

    async def _run_stream(self, session: AsyncSession) -> None:
        stream = session.stream(self._audio_source(session), include_events=True, max_queued_chunks=256)
        try:
            async for item in stream:
                if isinstance(item, VideoBlock):
                    await self._publish_block(item)
                else:
                    await self._on_event(item)
            logger.debug(f"{self}: AvatarServe stream of session {session.session_id} ended")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # AvatarServeError, or a bug: either way the pipeline hears of it
            self._streaming = False
            await self.push_error(f"AvatarServe stream of session {session.session_id} failed: {exc}",
                                  exception=exc)
            await self._release_held(everything=True)
        finally:
            self._streaming = False
            await stream.aclose()  # cancels the call if it is still open
            self._stream_done.set()

    async def _audio_source(self, session: AsyncSession) -> AsyncIterator[Any]:
        """What the stream sends: queued audio (paced) and markers, minus what an interruption dropped."""
        while True:
            generation, kind, payload = await self._pending.get()
            if kind == _END_OF_INPUT:
                yield StreamMarker.END_OF_INPUT
                return
            if generation != self._generation:
                continue
            if kind == _AUDIO:
                local, pcm = payload
                if not await self._pace(session, generation):
                    continue  # an interruption came while waiting: this audio is dropped
                if self._sent_local != local:  # the first audio since a boundary starts a server utterance
                    self._server_locals[self._server_sent] = local
                    self._server_sent += 1
                    self._sent_local = local
                start = max(self._sent_end, int(self._stream_ms(session)) * self._sample_rate // 1000)
                self._sent_end = start + len(pcm)
                yield pcm
            elif kind == _END_OF_UTTERANCE:
                if self._sent_local == payload:
                    self._sent_local = None
                    yield StreamMarker.END_OF_UTTERANCE
            elif kind == _INTERRUPT:
                self._sent_local = None
                yield StreamMarker.INTERRUPT

    @property
    def _sample_rate(self) -> int:
        return self._session.geometry.sample_rate if self._session is not None else 16000

    @staticmethod
    def _stream_ms(session: AsyncSession) -> float:
        return (time.monotonic() - session.stats.started_at) * 1000.0

    async def _pace(self, session: AsyncSession, generation: int) -> bool:
        """Wait until the audio sent is at most `lead_ms` ahead of the stream clock; False if interrupted."""
        while generation == self._generation:
            ahead_ms = self._sent_end * 1000.0 / self._sample_rate - self._stream_ms(session)
            if ahead_ms <= self._lead_ms:
                return True
            self._wake.clear()
            await wait_event(self._wake, (ahead_ms - self._lead_ms) / 1000.0)
        return False

    async def _drain(self) -> None:
        if self._stream_task is None:
            await self._release_held(everything=True)
            return
        self._ending = True
        self._pending.put_nowait((self._generation, _END_OF_INPUT, None))
        if not await wait_event(self._stream_done, self._drain_timeout_s):
            await self.push_error(f"AvatarServe stream did not drain within {self._drain_timeout_s} s; closing it")
        await self._release_held(everything=True)

    async def _teardown(self) -> None:
        """Cancel the stream, close the session, close the channel. Safe to call more than once."""
        self._streaming = False
        self._generation += 1
        self._held.clear()
        task, self._stream_task = self._stream_task, None
        if task is not None:
            await self.cancel_task(task, timeout=self._close_timeout_s)
        session, self._session = self._session, None
        if session is not None:
            try:
                self.close_summary = await session.close(timeout=self._close_timeout_s)
                logger.debug(f"{self}: AvatarServe session {session.session_id} closed")
            except Exception as exc:  # the server may be gone: nothing more to release here
                logger.warning(f"{self}: closing AvatarServe session {session.session_id} failed: {exc}")
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- frames in ----------------------------------------------------------------------------------------------

    async def _to_stream_pcm(self, frame: TTSAudioRawFrame) -> np.ndarray:
        """The frame's audio as mono int16 at the session's sample rate."""
        audio = frame.audio
        if frame.num_channels > 1:
            x = np.frombuffer(audio, dtype="<i2").reshape(-1, frame.num_channels).mean(axis=1)
            audio = np.round(x).astype("<i2").tobytes()
        rate = self._sample_rate
        if frame.sample_rate != rate:
            tail = b""
            if self._resampler is None or self._resampler_rate != frame.sample_rate:
                if self._resampler is not None:
                    tail = await self._resampler.flush()
                # No automatic clearing: the stream's history is reset explicitly (utterance end, interruption).
                self._resampler = create_stream_resampler(clear_after_secs=None)
                self._resampler_rate = frame.sample_rate
            audio = tail + await self._resampler.resample(audio, frame.sample_rate, rate)
        return np.frombuffer(audio, dtype="<i2").astype(np.int16)

    def _note_context(self, context_id: str | None) -> None:
        if context_id is not None:
            self._local_context.setdefault(self._local, context_id)

    def _enqueue_audio(self, pcm: np.ndarray) -> None:
        step = self._sample_rate * _MAX_CHUNK_MS // 1000
        for i in range(0, len(pcm), step):
            self._pending.put_nowait((self._generation, _AUDIO, (self._local, pcm[i:i + step])))

    async def _handle_tts_audio(self, frame: TTSAudioRawFrame) -> None:
        pcm = await self._to_stream_pcm(frame)
        if not len(pcm):
            return
        self._note_context(frame.context_id)
        if not self._local_has_audio:
            self._local_has_audio = True
            if not self._ttfb_pending:
                self._ttfb_pending = True
                await self.start_ttfb_metrics()
        self._enqueue_audio(pcm)

    async def _handle_tts_stopped(self, frame: TTSStoppedFrame) -> None:
        if not self._streaming:
            await self.push_frame(frame)
            return
        if self._resampler is not None:
            tail = np.frombuffer(await self._resampler.flush(), dtype="<i2").astype(np.int16)
            if len(tail) and self._local_has_audio:
                self._enqueue_audio(tail)
        if self._local_has_audio:
            self._pending.put_nowait((self._generation, _END_OF_UTTERANCE, self._local))
            held = _Held(frame, self._local, started=False)
            self._local += 1
            self._local_has_audio = False
        else:
            # Nothing to say: this TTSStoppedFrame and its TTSStartedFrame go on as soon as they are next in line.
            for h in self._held:
                if h.started and h.local == self._local:
                    h.local = None
            held = _Held(frame, None, started=False)
        await self._hold(held)

    async def _handle_interruption(self) -> None:
        self._generation += 1
        while not self._pending.empty():
            generation, kind, payload = self._pending.get_nowait()
            if kind == _END_OF_INPUT:  # an EndFrame is draining: it still ends the stream
                self._pending.put_nowait((self._generation, kind, payload))
                break
        self._held.clear()  # like the frames queued downstream, they belonged to the speech being cut
        if self._resampler is not None:
            await self._resampler.reset()
        if self._local_has_audio:
            self._local += 1
            self._local_has_audio = False
        self._ttfb_pending = False
        if self._streaming and self._server_sent > self._server_ended:  # the avatar has speech left to cut
            self._awaiting_interrupted += 1
            self._pending.put_nowait((self._generation, _INTERRUPT, None))
        self._wake.set()

    # -- TTS markers in step with the avatar --------------------------------------------------------------------

    async def _hold(self, held: _Held) -> None:
        if not self._streaming:
            await self.push_frame(held.frame)
            return
        self._held.append(held)
        await self._release_held()

    def _releasable(self, h: _Held) -> bool:
        return (h.local is None or h.local <= self._ended_local
                or (h.started and h.local <= self._started_local))

    async def _release_held(self, everything: bool = False) -> None:
        while self._held and (everything or self._releasable(self._held[0])):
            await self.push_frame(self._held.popleft().frame)

    # -- frames out ---------------------------------------------------------------------------------------------

    async def _on_event(self, event: StatusEvent) -> None:
        kind = event.kind
        if kind is EventKind.STARTED:
            self._clock_origin_ns = self.get_clock().get_time()
        elif kind is EventKind.INTERRUPTED:
            self._awaiting_interrupted = max(0, self._awaiting_interrupted - 1)
        elif kind is EventKind.UTTERANCE_STARTED and event.utterance is not None:
            local = self._server_locals.get(event.utterance.index)
            if local is not None:
                self._started_local = max(self._started_local, local)
                self._playing_context = self._local_context.get(local)
            await self._release_held()
            await self._call_event_handler("on_utterance_started", event.utterance)
        elif kind is EventKind.UTTERANCE_ENDED and event.utterance is not None:
            self._server_ended += 1
            local = self._server_locals.pop(event.utterance.index, None)
            if local is not None:
                self._ended_local = max(self._ended_local, local)
                self._local_context.pop(local, None)
            await self._release_held()
            await self._call_event_handler("on_utterance_ended", event.utterance)
        elif kind is EventKind.WARNING:
            logger.warning(f"{self}: AvatarServe warning {event.code}: {event.message}")
        elif kind is EventKind.END_OF_STREAM and not self._ending:
            # The server ended the stream on its own (idle timeout, session closed, server draining): no more video.
            self._streaming = False
            hint = "; raise idle_timeout_s if the bot stays silent that long" if event.code == "idle_timeout" else ""
            await self.push_error(f"AvatarServe ended the stream of session {self.session_id}: {event.code} "
                                  f"({event.message}){hint}")
            await self._release_held(everything=True)

    def _stamp(self, frame: Frame, block: VideoBlock, index: int, pts_ms: float) -> None:
        frame.pts = self._clock_origin_ns + int(round(pts_ms * 1_000_000))
        frame.metadata["avatarserve"] = {"block_index": block.block_index, "frame_index": index,
                                         "pts_ms": pts_ms, "is_idle": block.is_idle}

    async def _push_audio(self, pcm: np.ndarray, block: VideoBlock, index: int, pts_ms: float) -> None:
        data = pcm.astype("<i2", copy=False).tobytes()
        if block.is_idle:
            frame: OutputAudioRawFrame = OutputAudioRawFrame(audio=data, sample_rate=self._sample_rate,
                                                             num_channels=1)
        else:
            frame = TTSAudioRawFrame(audio=data, sample_rate=self._sample_rate, num_channels=1,
                                     context_id=self._playing_context)
        self._stamp(frame, block, index, pts_ms)
        await self.push_frame(frame)

    async def _publish_block(self, block: VideoBlock) -> None:
        """Each frame's image, then its 40 ms of audio (frames are end-aligned in the block's span)."""
        speech = not block.is_idle
        if speech and self._awaiting_interrupted:
            self.blocks_dropped += 1
            return
        if speech and self._ttfb_pending:
            self._ttfb_pending = False
            await self.stop_ttfb_metrics()
        audio = block.audio
        per_frame = self._sample_rate // block.fps
        lead = max(0, len(audio) - block.num_frames * per_frame) if audio is not None else 0
        if lead:
            await self._push_audio(audio[:lead], block, -1, float(block.pts_ms))
        for i, rgb in enumerate(block.frames):
            if speech and self._awaiting_interrupted:
                return  # interrupted mid-block: the rest of it is not shown
            pts_ms = block.frame_pts_ms(i)
            image = OutputImageRawFrame(image=np.ascontiguousarray(rgb).tobytes(),
                                        size=(block.width, block.height), format="RGB")
            image.sync_with_audio = self._sync_with_audio
            self._stamp(image, block, i, pts_ms)
            await self.push_frame(image)
            if audio is not None and not (speech and self._awaiting_interrupted):
                start = lead + i * per_frame
                await self._push_audio(audio[start:start + per_frame], block, i, pts_ms)
