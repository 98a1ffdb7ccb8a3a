"""The WebRTC tracks the browser receives: the avatar's video (25 fps) and its audio, from a Playout.

Both are paced by the wall clock (asyncio sleeps to each frame's scheduled time) and read the same
Playout at their scheduled times, so a frame leaves at the wall time its audio span leaves; aiortc's
RTCP sender reports then map both RTP clocks to that wall clock and the browser plays them in sync.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from typing import Callable

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame

from .playout import Playout, ShownFrame

VIDEO_CLOCK_RATE = 90000
AUDIO_PTIME_S = 0.020  # 20 ms of audio per frame (the Opus frame size)


class _Pacer:
    """Frame k of a track is due at start + k * period (monotonic).

    A loop that wakes late either catches up without sleeping (audio: every sample must be played, the
    receiver's jitter buffer absorbs the burst) or, with `skip_late`, jumps to the latest frame already due
    (video: a frame that is late is stale; sending the backlog in a burst costs encoding the machine does not
    have and makes the receiver grow its jitter buffer, delaying every later frame). Frame numbers keep
    counting periods either way, so RTP timestamps stay on the wall clock.
    """

    def __init__(self, period_s: float, *, skip_late: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = period_s
        self.skip_late = skip_late
        self.clock = clock
        self.start: float | None = None
        self.count = -1
        self.skipped = 0  # frames never sent because the loop woke after the next one was due

    async def next(self) -> tuple[int, float]:
        """Wait for the next frame's time; returns (frame number, its scheduled monotonic time)."""
        self.count += 1
        now = self.clock()
        if self.start is None:
            self.start = now
        due = self.start + self.count * self.period_s
        if self.skip_late and now - due >= self.period_s:
            latest = int((now - self.start) // self.period_s)
            self.skipped += latest - self.count
            self.count = latest
            due = self.start + latest * self.period_s
        if due > now:
            await asyncio.sleep(due - now)
        return self.count, due


class AvatarAudioTrack(MediaStreamTrack):
    """The session's block audio as 20 ms s16 mono frames at the session's sample rate.

    `on_frame(n, start, due, pcm)` is called for every frame sent: n counts frames from 0 (the RTP
    timestamp advances by the frame's duration), `start` is the stream sample it begins at (None: filler
    silence while the playout waits).
    """

    kind = "audio"

    def __init__(self, playout: Playout,
                 on_frame: Callable[[int, int | None, float, np.ndarray], None] | None = None) -> None:
        super().__init__()
        self.playout = playout
        self.on_frame = on_frame
        self.sample_rate = playout.sample_rate
        self.samples = int(round(AUDIO_PTIME_S * self.sample_rate))
        self._pacer = _Pacer(self.samples / self.sample_rate)
        self._time_base = fractions.Fraction(1, self.sample_rate)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        n, due = await self._pacer.next()
        pcm = self.playout.pull_audio(self.samples, now=due)
        if self.on_frame is not None:
            self.on_frame(n, self.playout.last_pulled, due, pcm)
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = n * self.samples
        frame.time_base = self._time_base
        return frame


class AvatarVideoTrack(MediaStreamTrack):
    """The frame under the playout cursor, `fps` times a second (a placeholder before the first block).

    `on_frame(n, shown, due)` is called for every frame sent: n counts frame periods from 0 (the RTP
    timestamp advances 90000 / fps per period), `shown` is the ShownFrame (None: the placeholder). When the
    machine wakes the track late, the frames already past are skipped (`frames_skipped`), never sent late.
    """

    kind = "video"

    def __init__(self, playout: Playout, placeholder: np.ndarray,
                 on_frame: Callable[[int, ShownFrame | None, float], None] | None = None) -> None:
        super().__init__()
        self.playout = playout
        self.placeholder = np.ascontiguousarray(placeholder, dtype=np.uint8)
        self.on_frame = on_frame
        self.fps = playout.fps
        self._pacer = _Pacer(1.0 / self.fps, skip_late=True)
        self._ticks = VIDEO_CLOCK_RATE // self.fps
        self._time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)

    @property
    def frames_skipped(self) -> int:
        return self._pacer.skipped

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        n, due = await self._pacer.next()
        shown = self.playout.frame_at(due)
        image = self.placeholder if shown is None else shown.image
        if image.shape != self.placeholder.shape:  # frames keep one size: the encoder restarts on a change
            image = self.placeholder
        if self.on_frame is not None:
            self.on_frame(n, shown, due)
        frame = VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = n * self._ticks
        frame.time_base = self._time_base
        return frame
