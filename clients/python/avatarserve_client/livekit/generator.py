"""An AvatarServe session as a livekit-agents ``VideoGenerator``.

Audio in (``push_audio``): the agent's utterances as ``rtc.AudioFrame``s, each utterance ended by an
``AudioSegmentEnd``. Frames are downmixed to mono and resampled to 16 kHz s16 (LiveKit's streaming
``rtc.AudioResampler``; 16 kHz mono passes through bit-exact) and streamed to the session in order, with
END_OF_UTTERANCE at each segment end. ``clear_buffer`` drops the audio not yet handed to the SDK and sends INTERRUPT
in band, so the server and this generator agree on which utterances it ever received.

Media out (``__aiter__``): for every delivered block, its frames as ``rtc.VideoFrame`` (RGB24), each followed by its
own 40 ms of the block's audio (``return_audio``) as an ``rtc.AudioFrame``: frames are end-aligned in the block's
480 ms span, so audio before the first frame of a short first block comes first. Idle blocks carry the server's
silence, so the published audio track is continuous and every frame travels with its audio. ``last_media`` describes
the item just yielded (stream-clock pts, idle or not) for the runner.

Playback (events of this ``rtc.EventEmitter``): ``playback_started`` right before the audio slice holding an
utterance's first sample is yielded (the server's UTTERANCE_STARTED says where it starts), and
``playback_finished`` (:class:`PlaybackFinished`) once per utterance, in order: after its last chunk (server
UTTERANCE_ENDED, ``played_ms`` -> ``playback_position`` seconds), or when an INTERRUPT cut it (``interrupted``, the
position being the part actually played out here). Speech already received but not yet played when
``clear_buffer`` is called is dropped, not played.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, VideoGenerator

from .._streaming import StreamMarker, load_image_bytes, wait_event
from ..aio import AsyncAvatarClient, AsyncSession
from ..media import VideoBlock
from ..types import EventKind, Geometry, StatusEvent
from ..v1 import avatar_service_pb2 as pb

logger = logging.getLogger("avatarserve_client.livekit")

SAMPLE_RATE = 16000  # what AvatarServe takes (AudioFormat): mono s16le at 16 kHz
MAX_CHUNK_MS = 240  # audio handed to the SDK per AudioChunk, at most (the server takes up to 1000 ms)


@dataclass(frozen=True)
class PlaybackFinished:
    """What goes into ``lk.playback_finished``."""

    playback_position: float  # seconds of the utterance played out
    interrupted: bool


@dataclass(frozen=True)
class MediaInfo:
    """The item the generator yielded last."""

    kind: Literal["video", "audio"]
    pts_ms: float  # stream-clock start of the frame's display / of the audio slice
    duration_ms: float
    is_idle: bool  # from an idle block (no client audio in it)
    block_index: int


@dataclass
class _Segment:
    """One agent utterance: the audio between two AudioSegmentEnd / clear_buffer boundaries."""

    seq: int
    server_index: int | None = None  # its utterance index in the stream, once its first audio went to the SDK
    has_audio: bool = False
    cleared: bool = False  # clear_buffer cut it
    start_pts_ms: int | None = None  # UTTERANCE_STARTED: where its audio starts on the stream clock
    started: bool = False  # playback_started emitted
    played_end_ms: float = 0.0  # stream-clock end of the audio yielded since its start
    result: PlaybackFinished | None = None


class _FeedQueue:
    """Unbounded FIFO between push_audio (the LiveKit side) and the SDK's audio iterable; clear_buffer removes
    what was not handed over yet."""

    def __init__(self) -> None:
        self.items: collections.deque[tuple[Any, ...]] = collections.deque()
        self._changed = asyncio.Event()
        self.closed = False

    def put(self, item: tuple[Any, ...]) -> None:
        if not self.closed:
            self.items.append(item)
            self._changed.set()

    def keep_only(self, kind: str) -> None:
        self.items = collections.deque(i for i in self.items if i[0] == kind)
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def peek(self) -> tuple[Any, ...] | None:
        """The next item, left in the queue (None once closed and empty)."""
        while not self.items:
            if self.closed:
                return None
            self._changed.clear()
            await self._changed.wait()
        return self.items[0]

    async def wait_changed(self, timeout: float) -> None:
        """Until an item is added or removed, or `timeout` seconds."""
        self._changed.clear()
        await wait_event(self._changed, timeout)


class AvatarServeVideoGenerator(VideoGenerator, rtc.EventEmitter[Literal["playback_started", "playback_finished"]]):
    """One AvatarServe session driven by a LiveKit agent's audio (see the module docstring).

    Args:
        client: a connected ``AsyncAvatarClient`` (the caller closes it).
        image: the reference photo (path, PNG/JPEG bytes, PIL image or HxWx3 array).
        prompt, seed: session options; ``session_options`` passes more of ``create_session``'s keywords
            (``width``, ``height``, ``jpeg_quality``, ``fill_grace_ms``, ``idle_timeout_s``, ...).
        max_extra_lag_ms: idle blocks that would play more than this much later than idle blocks usually arrive are
            skipped (catching up after a burst); None plays every block.
        lead_ms: how far ahead of the live stream clock audio is sent (it is paced; >= one block, 480 ms, keeps the
            first speech frame as early as unpaced audio would).
        max_queued_chunks: audio chunks the SDK may hold before the wire (an INTERRUPT waits behind them).
    """

    def __init__(self, client: AsyncAvatarClient, image: Any, *, prompt: str = "", seed: int | None = None,
                 session_options: dict[str, Any] | None = None, lead_ms: int = 600,
                 max_extra_lag_ms: float | None = 480.0,
                 max_queued_chunks: int = 4) -> None:
        rtc.EventEmitter.__init__(self)
        self._client = client
        self._image = load_image_bytes(image)
        self._prompt = prompt
        self._seed = seed
        self._options = dict(session_options or {})
        self._max_queued_chunks = max_queued_chunks
        self._lead_samples = lead_ms * SAMPLE_RATE // 1000
        self._max_extra_lag_ms = max_extra_lag_ms
        self._arrival_lags: collections.deque[float] = collections.deque(maxlen=25)
        self._sample_lag = True
        self.skipped_idle_blocks = 0
        self._session: AsyncSession | None = None
        self._stream: AsyncIterator[Any] | None = None
        self._geometry: Geometry | None = None
        self._feed_q = _FeedQueue()
        self._segments: collections.deque[_Segment] = collections.deque()  # not yet reported, in order
        self._open: _Segment | None = None  # the utterance being received
        self._next_seq = 0
        self._next_server_index = 0
        self._resampler: rtc.AudioResampler | None = None
        self._resampler_rate = 0
        self._stamp_seq = 0  # next AudioChunk seq
        self._stamp_end = 0  # stream-clock sample where the audio sent so far ends
        self._cuts_pending = 0  # INTERRUPTs sent whose INTERRUPTED event has not come back yet
        self._clear_epoch = 0
        self.last_media: MediaInfo | None = None
        # diagnostics, most recent last: server events in order; audio sent as (time.monotonic(), pts_ms, samples)
        self.stream_events: collections.deque[StatusEvent] = collections.deque(maxlen=4096)
        self.sent_audio: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=4096)

    # ----- lifecycle ------------------------------------------------------------------------------------------

    @property
    def geometry(self) -> Geometry:
        if self._geometry is None:
            raise RuntimeError("start() first")
        return self._geometry

    @property
    def session(self) -> AsyncSession | None:
        return self._session

    async def start(self) -> Geometry:
        """Create the session (return_audio, filling silence: idle video from the start) and open its stream (it
        starts with the first item read). Idempotent."""
        if self._geometry is not None:
            return self._geometry
        options = {"idle_mode": "fill_silence", **self._options, "return_audio": True}
        handle = await self._client.create_session(self._image, self._prompt, seed=self._seed, **options)
        self._session = self._client.attach(handle)
        self._geometry = handle.geometry
        self._stream = self._session.stream(self._feed(), include_events=True, end_of_input=True,
                                            max_queued_chunks=self._max_queued_chunks, timeout=None)
        return handle.geometry

    async def aclose(self) -> None:
        """End the input (the stream drains and ends) and close the session."""
        self._feed_q.close()
        if self._session is not None:
            try:
                await self._session.close()
            except Exception:  # the server may be gone already; nothing left to release here
                logger.warning("closing AvatarServe session %s failed", self._session.session_id, exc_info=True)

    def poster_frame(self) -> rtc.VideoFrame:
        """The reference photo at the session's size: something to show before the first block arrives."""
        from PIL import Image

        g = self.geometry
        with Image.open(io.BytesIO(self._image)) as img:
            rgb = np.asarray(img.convert("RGB").resize((g.width, g.height)))
        return rtc.VideoFrame(g.width, g.height, rtc.VideoBufferType.RGB24, np.ascontiguousarray(rgb).tobytes())

    # ----- audio in ---------------------------------------------------------------------------------------------

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            seg = self._open
            if seg is None:
                return  # e.g. the segment end a DataStreamAudioReceiver sends after a clear_buffer
            tail = self._flush_resampler()
            if len(tail):
                self._put_audio(tail, seg)
            self._open = None
            self._feed_q.put(("eou", seg))
            return
        if frame.samples_per_channel == 0:
            return
        if self._open is None:
            self._open = _Segment(seq=self._next_seq)
            self._next_seq += 1
            self._segments.append(self._open)
            self._resampler = None
        pcm = self._to_pcm16k(frame)
        if len(pcm):
            self._put_audio(pcm, self._open)

    def _put_audio(self, pcm: np.ndarray, seg: _Segment) -> None:
        seg.has_audio = True
        step = MAX_CHUNK_MS * SAMPLE_RATE // 1000
        for i in range(0, len(pcm), step):
            self._feed_q.put(("audio", pcm[i:i + step], seg))

    def _to_pcm16k(self, frame: rtc.AudioFrame) -> np.ndarray:
        """Mono int16 at 16 kHz (bit-exact when the frame is already that)."""
        data = np.frombuffer(bytes(frame.data), dtype=np.int16)
        if frame.num_channels > 1:
            mixed = data.reshape(-1, frame.num_channels).astype(np.float32).mean(axis=1)
            data = np.clip(np.round(mixed), -32768, 32767).astype(np.int16)
        if frame.sample_rate == SAMPLE_RATE and self._resampler is None:
            return data.copy()
        out = []
        if self._resampler is not None and self._resampler_rate != frame.sample_rate:
            out.append(self._flush_resampler())  # the rate changed within an utterance
        if frame.sample_rate == SAMPLE_RATE:
            out.append(data.copy())
            return np.concatenate(out)
        if self._resampler is None:
            self._resampler = rtc.AudioResampler(frame.sample_rate, SAMPLE_RATE, num_channels=1,
                                                 quality=rtc.AudioResamplerQuality.HIGH)
            self._resampler_rate = frame.sample_rate
        for f in self._resampler.push(rtc.AudioFrame(data.tobytes(), frame.sample_rate, 1, len(data))):
            out.append(np.frombuffer(bytes(f.data), dtype=np.int16))
        return np.concatenate(out) if out else np.zeros(0, np.int16)

    def _flush_resampler(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, np.int16)
        frames = self._resampler.flush()
        self._resampler = None
        parts = [np.frombuffer(bytes(f.data), dtype=np.int16) for f in frames]
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)

    async def _feed(self) -> AsyncIterator[Any]:
        """The SDK's audio iterable. An item yielded here is on its way to the server (the SDK only drops queued
        audio on its own interrupt(), which is not used), so a segment's server index is fixed when its first audio
        is yielded. Audio is paced: it goes out at most `lead_ms` ahead of the live stream clock (what the API asks
        of live clients: a client far ahead makes the server buffer what an interruption then throws away)."""
        chunk_samples = MAX_CHUNK_MS * SAMPLE_RATE // 1000
        while (item := await self._feed_q.peek()) is not None:
            kind = item[0]
            if kind == "audio":
                ahead = self._next_start() - self._live_sample() - self._lead_samples
                if ahead > 0:
                    await self._feed_q.wait_changed(ahead / SAMPLE_RATE)
                    continue  # re-read the queue: clear_buffer may have emptied it meanwhile
                q = self._feed_q.items
                q.popleft()
                seg: _Segment = item[2]
                parts, n = [item[1]], len(item[1])
                while q and q[0][0] == "audio" and q[0][2] is seg and n + len(q[0][1]) <= chunk_samples:
                    nxt = q.popleft()
                    parts.append(nxt[1])
                    n += len(nxt[1])
                if seg.server_index is None:
                    seg.server_index = self._next_server_index
                    self._next_server_index += 1
                yield self._stamp(np.concatenate(parts) if len(parts) > 1 else parts[0])
                continue
            self._feed_q.items.popleft()
            if kind == "eou":
                seg = item[1]
                if seg.server_index is None:  # no audio ever went out for it: nothing to play
                    seg.result = PlaybackFinished(0.0, seg.cleared)
                    self._report()
                    continue
                yield StreamMarker.END_OF_UTTERANCE
            else:  # the server places audio stamped inside its post-INTERRUPT idle block right after that block
                yield StreamMarker.INTERRUPT

    def _live_sample(self) -> int:
        """The live stream clock (the SDK's: time since its stream started), in samples."""
        assert self._session is not None
        return int((time.monotonic() - self._session.stats.started_at) * SAMPLE_RATE)

    def _next_start(self) -> int:
        """Where the next audio chunk goes on the stream clock: right after the audio sent so far, but never in the
        past of the live stream (the SDK's rule for arrays)."""
        start = max(self._stamp_end, self._live_sample())
        if start > self._stamp_end:  # a jump: start on a whole millisecond (pts_ms is in ms)
            start = -(-start // (SAMPLE_RATE // 1000)) * (SAMPLE_RATE // 1000)
        # else right after the previous chunk: pts_ms rounds down and the server places it at the end of what it got
        return start

    def _stamp(self, pcm: np.ndarray) -> pb.AudioChunk:
        start = self._next_start()
        chunk = pb.AudioChunk(seq=self._stamp_seq, pts_ms=start * 1000 // SAMPLE_RATE,
                              pcm=np.ascontiguousarray(pcm, dtype="<i2").tobytes())
        self._stamp_seq += 1
        self._stamp_end = start + len(pcm)
        self.sent_audio.append((time.monotonic(), chunk.pts_ms, len(pcm)))
        return chunk

    async def clear_buffer(self) -> None:
        """Stop speaking now: drop unsent audio, INTERRUPT the server (in band), drop speech not yet played."""
        self._clear_epoch += 1
        self._open = None
        self._resampler = None
        self._feed_q.keep_only("interrupt")
        cut_on_server = False
        for seg in self._segments:
            if seg.result is not None:
                continue
            seg.cleared = True
            if seg.server_index is None:  # none of its audio left here: the server never heard of it
                seg.result = PlaybackFinished(0.0, True)
            else:
                cut_on_server = True
        if cut_on_server:
            self._cuts_pending += 1
            self._feed_q.put(("interrupt",))
        self._report()

    # ----- media out --------------------------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        if self._stream is None:
            raise RuntimeError("start() first")
        return self._media()

    async def _media(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        assert self._stream is not None
        try:
            async for item in self._stream:
                if isinstance(item, StatusEvent):
                    if self._on_event(item):
                        yield AudioSegmentEnd()
                    continue
                if self._cuts_pending:
                    continue  # speech the agent cut off: never played
                if self._behind(item):
                    self.skipped_idle_blocks += 1
                    continue
                epoch = self._clear_epoch
                for out in self._block_items(item):
                    if isinstance(out, rtc.VideoFrame) and self._clear_epoch != epoch:
                        break  # clear_buffer while this block was being played (a frame keeps its audio)
                    yield out
        finally:
            # the stream is over: whatever was not reported ends here, cut
            for seg in self._segments:
                if seg.result is None:
                    seg.result = PlaybackFinished(self._played_s(seg), True)
            self._report()

    def _behind(self, block: VideoBlock) -> bool:
        """Skip this idle block to catch up? An idle block arrives about a block plus the pipeline's latency after
        its span on the live clock (the least such lag of recent idle blocks is the reference). When playing it now
        would put the video more than `max_extra_lag_ms` further behind than that, e.g. after a slow start or a
        starved event loop let a backlog build up, it is dropped, so that the next speech is not delayed by it."""
        if not block.is_idle or self._max_extra_lag_ms is None or self._session is None:
            return False
        started = self._session.stats.started_at
        if self._sample_lag:  # not the idle block an INTERRUPT sends at once (its pts is ahead of the clock)
            self._arrival_lags.append((block.received_at - started) * 1000.0 - block.pts_ms)
        self._sample_lag = True
        play_lag = (time.monotonic() - started) * 1000.0 - block.pts_ms
        return play_lag - min(self._arrival_lags, default=play_lag) > self._max_extra_lag_ms

    def _block_items(self, block: VideoBlock) -> Any:
        g = self.geometry
        spf = g.sample_rate // g.fps  # samples per frame (640)
        frame_ms = 1000.0 / g.fps
        audio = block.audio
        if audio is None or len(audio) != g.samples_per_block:
            audio = np.zeros(g.samples_per_block, np.int16) if audio is None else \
                np.resize(np.asarray(audio, np.int16), g.samples_per_block)
        n = len(block.frames)
        lead = max(g.samples_per_block - n * spf, 0)  # audio before the first (end-aligned) frame
        if lead:
            yield from self._audio_item(audio[:lead], block, block.pts_ms, lead * 1000.0 / g.sample_rate)
        for i, frame in enumerate(block.frames):
            t0 = block.pts_ms + block.duration_ms - (n - i) * frame_ms
            self.last_media = MediaInfo("video", t0, frame_ms, block.is_idle, block.block_index)
            h, w = frame.shape[:2]
            yield rtc.VideoFrame(w, h, rtc.VideoBufferType.RGB24, np.ascontiguousarray(frame).tobytes())
            a0 = lead + i * spf
            yield from self._audio_item(audio[a0:a0 + spf], block, t0, frame_ms)

    def _audio_item(self, pcm: np.ndarray, block: VideoBlock, t0: float, dur_ms: float) -> Any:
        t1 = t0 + dur_ms
        for seg in self._segments:
            if seg.result is not None or seg.start_pts_ms is None or seg.start_pts_ms >= t1:
                continue
            seg.played_end_ms = max(seg.played_end_ms, t1)
            if not seg.started:
                seg.started = True
                self.emit("playback_started")
        self.last_media = MediaInfo("audio", t0, dur_ms, block.is_idle, block.block_index)
        yield rtc.AudioFrame(np.ascontiguousarray(pcm, dtype=np.int16).tobytes(), self.geometry.sample_rate, 1,
                             len(pcm))

    # ----- server events -> playback ------------------------------------------------------------------------------

    def _segment_for(self, index: int) -> _Segment | None:
        for seg in self._segments:
            if seg.server_index == index:
                return seg
        return None

    @staticmethod
    def _played_s(seg: _Segment) -> float:
        if seg.start_pts_ms is None:
            return 0.0
        return max(seg.played_end_ms - seg.start_pts_ms, 0.0) / 1000.0

    def _on_event(self, ev: StatusEvent) -> bool:
        """Apply one server event; True when an utterance played out to its end (yield AudioSegmentEnd)."""
        self.stream_events.append(ev)
        if ev.kind is EventKind.INTERRUPTED:
            self._cuts_pending = max(self._cuts_pending - 1, 0)
            self._sample_lag = False
            return False
        u = ev.utterance
        if u is None or ev.kind not in (EventKind.UTTERANCE_STARTED, EventKind.UTTERANCE_ENDED):
            return False
        seg = self._segment_for(u.index)
        if seg is None:
            logger.warning("server reported utterance %d, which this worker does not know", u.index)
            return False
        seg.start_pts_ms = u.start_pts_ms
        if ev.kind is EventKind.UTTERANCE_STARTED:
            return False
        # Utterances end in order: one before it that never got its own event (all of its audio arrived too late
        # to be used) is over too.
        for older in self._segments:
            if older is seg:
                break
            if older.result is None and older.server_index is not None and older.server_index < u.index:
                older.result = PlaybackFinished(self._played_s(older), True)
        cut = u.interrupted or seg.cleared
        if cut:
            played = min(u.played_ms, u.duration_ms, max(seg.played_end_ms - u.start_pts_ms, 0.0))
        else:
            played = min(u.played_ms, u.duration_ms)
        seg.result = PlaybackFinished(played / 1000.0, cut)
        self._report()
        return not cut

    def _report(self) -> None:
        """Emit playback_finished for the finished utterances at the head of the queue, in order."""
        while self._segments and self._segments[0].result is not None:
            seg = self._segments.popleft()
            if seg is self._open:
                self._open = None
            assert seg.result is not None
            self.emit("playback_finished", seg.result)
