"""The avatar worker's media loop: LiveKit audio in, AvatarServe video + audio out, playback RPCs back.

Built from livekit-agents' own pieces, wired the way its ``AvatarRunner`` wires them: an ``AudioReceiver``
(``DataStreamAudioReceiver`` in a room, or ``QueueAudioOutput`` in the same process) feeds a ``VideoGenerator``
(:class:`AvatarServeVideoGenerator`); its frames and audio go through ``rtc.AVSynchronizer`` into an
``rtc.VideoSource`` / ``rtc.AudioSource`` published as camera and microphone tracks.

What differs from ``AvatarRunner``: it counts playback from the audio frames it pushes, so every audio frame is
"speech" to it, and it reports an interrupted playback the moment ``clear_buffer`` arrives. AvatarServe publishes
continuous audio (idle blocks carry silence) and knows where each utterance starts and how much of it was played
(UTTERANCE_STARTED / UTTERANCE_ENDED), so here ``lk.playback_started`` / ``lk.playback_finished`` come from the
generator's ``playback_started`` / ``playback_finished`` events, and the tracks are published (with the reference
photo as a first frame) as soon as the worker starts rather than on the first frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from livekit import rtc
from livekit.agents.voice.avatar import AudioReceiver, AudioSegmentEnd

from .._streaming import wait_done
from .generator import AvatarServeVideoGenerator, MediaInfo, PlaybackFinished

logger = logging.getLogger("avatarserve_client.livekit")


@dataclass(frozen=True)
class MediaPushed:
    """One frame (video) or slice (audio) handed to the AVSynchronizer; the runner's ``media`` event."""

    info: MediaInfo
    frame: rtc.VideoFrame | rtc.AudioFrame
    pushed_at: float  # time.monotonic() after the push returned
    av_skew_s: float | None  # AVSynchronizer's last video time minus its last (playing) audio time


class AvatarServeRunner(rtc.EventEmitter[Literal["media"]]):
    """Runs one avatar: ``await start()``, then ``await wait_for_complete()`` (the media stream ended) or
    ``await aclose()``.

    Args:
        room: the connected room to publish in, or None to only produce the local tracks (``video_track``,
            ``audio_track``), e.g. to read them back in a test.
        audio_recv: where the agent's audio comes from (``DataStreamAudioReceiver``, ``QueueAudioOutput``).
        video_gen: the AvatarServe session (not started yet: ``start()`` starts it).
        queue_size_ms: buffering of the AudioSource and of the synchronizer's video queue (AvatarRunner's 100 ms).
        drain_timeout: at ``aclose()``, how long the media of the ended stream may take to finish before it is cut.
    """

    def __init__(self, room: rtc.Room | None, *, audio_recv: AudioReceiver, video_gen: AvatarServeVideoGenerator,
                 queue_size_ms: int = 100, drain_timeout: float = 10.0) -> None:
        super().__init__()
        if drain_timeout <= 0:
            raise ValueError(f"drain_timeout must be > 0, got {drain_timeout!r}")
        self._drain_timeout = drain_timeout
        self._room = room
        self._recv = audio_recv
        self._gen = video_gen
        self._queue_size_ms = queue_size_ms
        self._tasks: set[asyncio.Task[Any]] = set()
        self._read_task: asyncio.Task[None] | None = None
        self._forward_task: asyncio.Task[None] | None = None
        self._closed = False
        self.audio_source: rtc.AudioSource | None = None
        self.video_source: rtc.VideoSource | None = None
        self.av_sync: rtc.AVSynchronizer | None = None
        self.audio_track: rtc.LocalAudioTrack | None = None
        self.video_track: rtc.LocalVideoTrack | None = None

    async def start(self) -> None:
        g = await self._gen.start()
        self.audio_source = rtc.AudioSource(sample_rate=g.sample_rate, num_channels=1,
                                            queue_size_ms=self._queue_size_ms)
        self.video_source = rtc.VideoSource(width=g.width, height=g.height)
        self.av_sync = rtc.AVSynchronizer(audio_source=self.audio_source, video_source=self.video_source,
                                          video_fps=g.fps, video_queue_size_ms=self._queue_size_ms)
        self.audio_track = rtc.LocalAudioTrack.create_audio_track("avatarserve_audio", self.audio_source)
        self.video_track = rtc.LocalVideoTrack.create_video_track("avatarserve_video", self.video_source)

        # Listen before publishing: an agent's DataStreamAudioOutput starts streaming once it sees our video track.
        await self._recv.start()
        self._recv.on("clear_buffer", self._on_clear_buffer)
        self._gen.on("playback_started", self._on_playback_started)
        self._gen.on("playback_finished", self._on_playback_finished)

        self.video_source.capture_frame(self._gen.poster_frame())
        if self._room is not None:
            lp = self._room.local_participant
            await lp.publish_track(self.audio_track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
            await lp.publish_track(self.video_track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA))

        self._read_task = asyncio.create_task(self._read_audio(), name="avatarserve-read-audio")
        self._forward_task = asyncio.create_task(self._forward_media(), name="avatarserve-forward-media")

    async def wait_for_complete(self) -> None:
        """Until the AvatarServe stream ends (the session closed, the server went away, or aclose())."""
        if self._forward_task is None:
            raise RuntimeError("AvatarServeRunner not started")
        await self._forward_task

    async def _read_audio(self) -> None:
        try:
            async for frame in self._recv:
                await self._gen.push_audio(frame)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("reading the agent's audio failed")

    async def _forward_media(self) -> None:
        assert self.av_sync is not None and self.audio_source is not None
        sync = self.av_sync
        audio_pushed = False
        try:
            async for item in self._gen:
                if isinstance(item, AudioSegmentEnd):
                    continue  # playback_finished comes from the generator's event, in the same order
                info = self._gen.last_media
                assert info is not None
                if isinstance(item, rtc.AudioFrame):
                    await sync.push(item, timestamp=(info.pts_ms + info.duration_ms) / 1000.0)
                    audio_pushed = True
                else:
                    await sync.push(item, timestamp=info.pts_ms / 1000.0)
                skew = None
                if audio_pushed and sync.last_video_time:
                    skew = sync.last_video_time - sync.last_audio_time
                self.emit("media", MediaPushed(info, item, time.monotonic(), skew))
        except asyncio.CancelledError:
            raise
        except Exception:
            if not self._closed:
                logger.exception("the AvatarServe stream failed")
                raise

    # ----- protocol --------------------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_clear_buffer(self) -> None:
        """``lk.clear_buffer`` (already answered by the receiver): interrupt the session, drop queued media."""

        async def clear() -> None:
            try:
                await self._gen.clear_buffer()
                if self.av_sync is not None:
                    await self.av_sync.clear_queue()
            except Exception:
                logger.exception("clear_buffer failed")

        self._spawn(clear())

    def _on_playback_started(self) -> None:
        result = self._recv.notify_playback_started()
        if asyncio.iscoroutine(result):
            self._spawn(result)

    def _on_playback_finished(self, ev: PlaybackFinished) -> None:
        result = self._recv.notify_playback_finished(playback_position=ev.playback_position,
                                                     interrupted=ev.interrupted)
        if asyncio.iscoroutine(result):
            self._spawn(result)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._recv.off("clear_buffer", self._on_clear_buffer)
        if self._read_task is not None:
            self._read_task.cancel()
            await asyncio.gather(self._read_task, return_exceptions=True)
        await self._gen.aclose()  # ends the stream: the forward task finishes (reporting what was cut)
        if self._forward_task is not None:
            if not await wait_done(self._forward_task, self._drain_timeout):
                self._forward_task.cancel()  # closing: a slow stream is cut
            await asyncio.gather(self._forward_task, return_exceptions=True)  # a failed one was reported by its task
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._recv.aclose()
        if self.av_sync is not None:
            await self.av_sync.aclose()
        if self.audio_source is not None:
            await self.audio_source.aclose()
        if self.video_source is not None:
            await self.video_source.aclose()
