"""Playout of a session's blocks on the stream clock: what the WebRTC audio and video tracks send.

Blocks arrive in bursts (one every 480 ms, with jitter); the browser wants a steady 25 fps video
and continuous audio. `Playout` holds the blocks' audio (`VideoBlock.audio`, the block's exact
span on the stream clock) and frames (end-aligned in that span) and plays them out through one
cursor on the stream clock:

* the audio track pulls 20 ms at a time (`pull_audio`); the cursor advances with it. The audio
  track is paced by the wall clock, so the cursor is the stream time being heard;
* the video track asks which frame covers the cursor's position at its own tick (`frame_at`), so
  a frame is sent at the same wall time as the audio of its span and the browser, which lines the
  two tracks up by their RTCP sender reports, shows them together.

Playback starts (and restarts after an underrun) once the block at the cursor has been held for
`jitter_ms`, the margin that absorbs late blocks; every underrun widens that margin (up to
`max_jitter_ms`), and `relax_s` without one narrows it again, step by step, to where it started.
Holding more than the margin plus a block is caught up by skipping idle (silent) audio, never
speech. While the cursor waits, the audio track sends silence and the video track repeats the last
frame. `interrupt()` drops the speech not yet played, so idle video follows
as soon as the next idle block arrives.
"""

from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..media import VideoBlock


@dataclass
class ShownFrame:
    """A frame and where it comes from (stream clock)."""

    image: np.ndarray  # HxWx3 uint8 RGB
    pts_ms: float  # presentation time on the stream clock (VideoBlock.frame_pts_ms)
    block_index: int
    is_idle: bool
    block_received_at: float  # monotonic time its block arrived
    block_end_ms: float  # end of its block's span on the stream clock


@dataclass
class _Piece:
    """The audio of one block: samples [start, start + len(pcm)) of the stream clock."""

    start: int
    pcm: np.ndarray  # int16 mono
    is_idle: bool
    block_index: int
    arrived: float

    @property
    def end(self) -> int:
        return self.start + len(self.pcm)


class Playout:
    """Blocks in, a steady audio cursor and the frame under it out. Single-threaded (one event loop)."""

    def __init__(self, *, sample_rate: int = 16000, fps: int = 25, jitter_ms: float = 200.0,
                 max_jitter_ms: float = 1000.0, jitter_step_ms: float = 80.0, relax_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if sample_rate <= 0 or fps <= 0:
            raise ValueError(f"sample_rate and fps must be positive, got {sample_rate}, {fps}")
        self.sample_rate = sample_rate
        self.fps = fps
        self.jitter_ms = float(jitter_ms)
        self.base_jitter_ms = float(jitter_ms)
        self.relax_s = float(relax_s)
        self._calm_since: float | None = None  # last underrun (or the last narrowing step)
        self.max_jitter_ms = float(max(max_jitter_ms, jitter_ms))
        self.jitter_step_ms = float(jitter_step_ms)
        self.clock = clock
        self._pieces: collections.deque[_Piece] = collections.deque()
        self._frames: list[ShownFrame] = []  # sorted by pts_ms
        self._frame_pts: list[float] = []
        self.cursor: int | None = None  # stream sample played next; None until playback starts
        self._waiting = True  # cursor holds still (not started, underrun, or after an interrupt)
        self._resume_at_once = False  # after interrupt(): play the next block as soon as it arrives
        # the audio being heard: stream sample `_heard` started playing at `_heard_at` (monotonic)
        self._heard: int | None = None
        self._heard_at = 0.0
        self._heard_len = 0
        self.current: ShownFrame | None = None
        # statistics
        self.underruns = 0
        self.skipped_ms = 0.0
        self.blocks = 0

    # -- input -----------------------------------------------------------------------------

    def push(self, block: VideoBlock, now: float | None = None) -> None:
        """Queue a delivered block (its `audio` and decoded `frames`)."""
        now = self.clock() if now is None else now
        self.blocks += 1
        start = block.pts_ms * self.sample_rate // 1000
        n = round(block.duration_ms * self.sample_rate / 1000)
        pcm = block.audio if block.audio is not None else np.zeros(n, dtype=np.int16)
        pcm = np.asarray(pcm, dtype=np.int16)
        if self.cursor is not None and start + len(pcm) <= self.cursor:
            pass  # its audio is already past: the frames below are dropped the same way
        else:
            piece = _Piece(start, pcm, block.is_idle, block.block_index, now)
            # blocks come in order; keep the deque sorted even if one does not
            idx = len(self._pieces)
            while idx > 0 and self._pieces[idx - 1].start > start:
                idx -= 1
            self._pieces.insert(idx, piece)
        for i, image in enumerate(block.frames):
            frame = ShownFrame(image, block.frame_pts_ms(i), block.block_index, block.is_idle, now,
                               float(block.pts_ms + block.duration_ms))
            k = bisect.bisect_right(self._frame_pts, frame.pts_ms)
            self._frame_pts.insert(k, frame.pts_ms)
            self._frames.insert(k, frame)

    def interrupt(self) -> None:
        """Drop the speech not played yet; play whatever (idle) comes next at once."""
        cut = self._heard_end()
        kept: collections.deque[_Piece] = collections.deque()
        for p in self._pieces:
            if p.is_idle:
                kept.append(p)
            elif cut is not None and p.start < cut:
                kept.append(_Piece(p.start, p.pcm[:cut - p.start], False, p.block_index, p.arrived))
        self._pieces = kept
        cut_ms = None if cut is None else cut * 1000.0 / self.sample_rate
        keep = [f for f in self._frames if f.is_idle or (cut_ms is not None and f.pts_ms < cut_ms)]
        self._frames = keep
        self._frame_pts = [f.pts_ms for f in keep]
        self._resume_at_once = True

    # -- audio -----------------------------------------------------------------------------

    @property
    def last_pulled(self) -> int | None:
        """Stream sample at which the last `pull_audio` started (None: it returned filler silence)."""
        return self._heard if self._heard_len else None

    def buffered_ms(self) -> float:
        """Audio held ahead of the cursor."""
        if not self._pieces:
            return 0.0
        start = self._pieces[0].start if self.cursor is None else max(self.cursor, self._pieces[0].start)
        return max(0, self._pieces[-1].end - start) * 1000.0 / self.sample_rate

    def _heard_end(self) -> int | None:
        return None if self._heard is None else self._heard + self._heard_len

    def _drop_played(self) -> None:
        while self._pieces and self.cursor is not None and self._pieces[0].end <= self.cursor:
            self._pieces.popleft()

    def _ready(self, piece: _Piece, now: float) -> bool:
        if self._resume_at_once:
            return True
        return (now - piece.arrived) * 1000.0 >= self.jitter_ms

    def pull_audio(self, n: int, now: float | None = None) -> np.ndarray:
        """The next `n` samples (int16) to play from `now`: the stream's audio under the cursor,
        or silence while waiting for data."""
        now = self.clock() if now is None else now
        self._drop_played()
        if not self._pieces:
            if self.cursor is not None and not self._waiting:
                self._waiting = True
                if not self._resume_at_once:  # an interrupt emptied it: not an underrun
                    self.underruns += 1
                    self.jitter_ms = min(self.max_jitter_ms, self.jitter_ms + self.jitter_step_ms)
                    self._calm_since = now
            self._heard_len = 0
            return np.zeros(n, dtype=np.int16)
        first = self._pieces[0]
        if self.cursor is None or self.cursor < first.start:
            # not started, or a gap (an interrupt cut, a lost block): the next audio is `first`
            if self._waiting and not self._ready(first, now):
                self._heard_len = 0
                return np.zeros(n, dtype=np.int16)
            self.cursor = first.start
        elif self._waiting and not self._ready(first, now):
            self._heard_len = 0
            return np.zeros(n, dtype=np.int16)
        self._waiting = False
        self._resume_at_once = False
        if self.jitter_ms > self.base_jitter_ms:
            if self._calm_since is None:
                self._calm_since = now
            elif now - self._calm_since >= self.relax_s:
                self.jitter_ms = max(self.base_jitter_ms, self.jitter_ms - self.jitter_step_ms / 2)
                self._calm_since = now
        self._catch_up()
        out = np.zeros(n, dtype=np.int16)
        pos = self.cursor
        for p in self._pieces:
            if p.start >= pos + n:
                break
            lo, hi = max(pos, p.start), min(pos + n, p.end)
            if hi > lo:
                out[lo - pos:hi - pos] = p.pcm[lo - p.start:hi - p.start]
        self._heard, self._heard_at, self._heard_len = pos, now, n
        self.cursor = pos + n
        return out

    def _catch_up(self) -> None:
        """Holding much more than the jitter margin: skip idle audio at the cursor."""
        assert self.cursor is not None
        block = 0.48 * self.sample_rate
        excess = self._pieces[-1].end - self.cursor - int((self.jitter_ms / 1000.0) * self.sample_rate + block)
        if excess <= 0:
            return
        for p in self._pieces:
            if p.end <= self.cursor:
                continue
            if p.start > self.cursor or not p.is_idle:
                break
            step = min(excess, p.end - self.cursor)
            self.cursor += step
            self.skipped_ms += step * 1000.0 / self.sample_rate
            excess -= step
            if excess <= 0:
                break

    # -- video -----------------------------------------------------------------------------

    def position_ms(self, now: float | None = None) -> float | None:
        """The stream time being heard at `now` (None before playback starts)."""
        if self._heard is None:
            return None
        now = self.clock() if now is None else now
        into = (now - self._heard_at) * self.sample_rate
        into = min(max(into, 0.0), float(self._heard_len))
        return (self._heard + into) * 1000.0 / self.sample_rate

    def frame_at(self, now: float | None = None) -> ShownFrame | None:
        """The frame covering the stream time heard at `now` (held while the audio waits)."""
        pos = self.position_ms(now)
        if pos is None:
            return self.current
        # frame i covers [pts, pts + 1/fps); a little slack for rounding of pts_ms
        k = bisect.bisect_right(self._frame_pts, pos + 0.5) - 1
        if k >= 0:
            self.current = self._frames[k]
            del self._frames[:k + 1]
            del self._frame_pts[:k + 1]
        return self.current
