"""Video blocks as the SDK returns them, frame decoding, and MP4 writing (PyAV)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable

import numpy as np

from avatarserve_client.v1 import avatar_service_pb2 as pb

from .errors import InvalidArgument, MediaError, MissingDependency, ProtocolError


def require_av(feature: str, extra: str = "media") -> Any:
    """PyAV, an optional dependency (the `media` extra); MissingDependency naming `feature` if absent."""
    try:
        import av
    except ImportError as exc:
        raise MissingDependency("av", extra, feature) from exc
    return av


@dataclass
class VideoBlock:
    """One delivered block of video.

    `frames` are HxWx3 uint8 RGB arrays in display order (empty when decoding was disabled).
    Frames are end-aligned in the block's span: see :meth:`frame_pts_ms`.
    """

    block_index: int
    pts_ms: int
    duration_ms: int
    frames: list[np.ndarray]
    h264: bytes | None
    is_idle: bool
    width: int
    height: int
    num_frames: int
    fps: int = 25
    jpeg_frames: list[bytes] = field(default_factory=list, repr=False)
    received_at: float = 0.0  # local time.monotonic() when the block arrived
    # With return_audio: the block's audio span [pts_ms, pts_ms + duration_ms), int16 mono at the session's sample
    # rate (the client's audio, server-filled silence where none came); None otherwise.
    audio: np.ndarray | None = field(default=None, repr=False)

    def frame_pts_ms(self, i: int) -> float:
        """Presentation time (ms, stream audio clock) of frame i of this block."""
        if not 0 <= i < self.num_frames:
            raise IndexError(f"frame {i} out of range for a block of {self.num_frames} frames")
        return self.pts_ms + self.duration_ms - (self.num_frames - i) * 1000.0 / self.fps


def decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # PIL raises many types for corrupt input
        raise ProtocolError(f"server sent an undecodable JPEG frame ({len(data)} bytes): {exc}") from exc


def decode_h264(data: bytes) -> list[np.ndarray]:
    """Decode one self-contained Annex-B H.264 GOP into RGB frames."""
    av = require_av("H.264 decoding")

    try:
        ctx = av.CodecContext.create("h264", "r")
        frames = []
        for packet in ctx.parse(data) + ctx.parse(None):
            frames.extend(ctx.decode(packet))
        frames.extend(ctx.decode(None))  # drain the decoder's delay
    except av.FFmpegError as exc:
        raise ProtocolError(f"server sent undecodable H.264 ({len(data)} bytes): {exc}") from exc
    return [f.to_ndarray(format="rgb24") for f in frames]


def video_block_from_proto(msg: pb.VideoChunk, *, fps: int, received_at: float,
                           decode: bool = True) -> VideoBlock:
    """Turn a VideoChunk into a VideoBlock, decoding JPEG (preferred) or H.264 frames."""
    h264 = msg.h264 if msg.HasField("h264") else None
    jpegs = list(msg.jpeg_frames)
    frames: list[np.ndarray] = []
    if decode:
        if jpegs:
            frames = [decode_jpeg(b) for b in jpegs]
        elif h264 is not None:
            frames = decode_h264(h264)
        if frames or jpegs or h264 is not None:
            if len(frames) != msg.num_frames:
                raise ProtocolError(f"block {msg.block_index}: num_frames is {msg.num_frames} but "
                                    f"{len(frames)} frames decoded")
            for f in frames:
                if f.shape != (msg.height, msg.width, 3):
                    raise ProtocolError(f"block {msg.block_index}: frame is {f.shape[1]}x{f.shape[0]}, "
                                        f"announced {msg.width}x{msg.height}")
    return VideoBlock(block_index=msg.block_index, pts_ms=msg.pts_ms, duration_ms=msg.duration_ms,
                      frames=frames, h264=h264, is_idle=msg.is_idle, width=msg.width,
                      height=msg.height, num_frames=msg.num_frames, fps=fps, jpeg_frames=jpegs,
                      received_at=received_at,
                      audio=np.frombuffer(msg.audio_pcm, dtype="<i2").astype(np.int16) if msg.audio_pcm else None)


class Mp4Writer:
    """Incrementally write blocks as H.264 (yuv420p) video, plus an optional AAC audio track.

    Frames are placed by their presentation time (:meth:`VideoBlock.frame_pts_ms`), so video
    stays in sync with the audio track, which starts at audio-clock 0. With `audio_pcm` given
    up front, audio is interleaved as video advances and the rest is written on close.
    """

    def __init__(self, path: str | os.PathLike[str], *, fps: int = 25, sample_rate: int = 16000,
                 audio_pcm: np.ndarray | None = None, crf: int = 20, preset: str = "veryfast") -> None:
        if fps <= 0 or sample_rate <= 0:
            raise InvalidArgument(f"fps and sample_rate must be positive, got {fps}, {sample_rate}")
        if audio_pcm is not None:
            audio_pcm = np.asarray(audio_pcm)
            if audio_pcm.ndim != 1 or audio_pcm.dtype not in (np.int16, np.float32):
                raise InvalidArgument("audio_pcm must be 1-D int16 or float32 mono samples, got "
                                      f"shape {audio_pcm.shape} dtype {audio_pcm.dtype}")
        require_av("MP4 writing")  # fail before any video is produced, not at the first frame
        self.path = os.fspath(path)
        self.fps = fps
        self.sample_rate = sample_rate
        self._audio = audio_pcm
        self._audio_written = 0  # samples
        self._crf, self._preset = crf, preset
        self._container: Any = None
        self._video: Any = None
        self._astream: Any = None
        self._size: tuple[int, int] | None = None
        self._last_pts = -1
        self.frames_written = 0
        self._closed = False

    def _open(self, width: int, height: int) -> None:
        av = require_av("MP4 writing")

        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise MediaError(f"H.264 yuv420p needs positive even dimensions, got {width}x{height}")
        try:
            self._container = av.open(self.path, mode="w")
        except (av.FFmpegError, OSError) as exc:
            raise MediaError(f"cannot open {self.path!r} for writing: {exc}") from exc
        video = self._container.add_stream("libx264", rate=self.fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.time_base = Fraction(1, self.fps)
        video.codec_context.options = {"crf": str(self._crf), "preset": self._preset}
        self._video = video
        if self._audio is not None:
            self._astream = self._container.add_stream("aac", rate=self.sample_rate, layout="mono")
        self._size = (width, height)

    def add_block(self, block: VideoBlock) -> None:
        if not block.frames and block.num_frames:
            raise MediaError(f"block {block.block_index} has no decoded frames (stream with decode=True)")
        if block.fps != self.fps:
            raise MediaError(f"block {block.block_index} is {block.fps} fps, writer is {self.fps} fps")
        self.add_frames(block.frames, [block.frame_pts_ms(i) for i in range(len(block.frames))])

    def add_frames(self, frames: Iterable[np.ndarray], pts_ms: Iterable[float]) -> None:
        """Add RGB frames at the given presentation times (ms); times must increase."""
        av = require_av("MP4 writing")

        if self._closed:
            raise MediaError("Mp4Writer is closed")
        for frame, t_ms in zip(frames, pts_ms, strict=True):
            frame = np.asarray(frame)
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise MediaError(f"frames must be HxWx3 uint8, got shape {frame.shape} dtype {frame.dtype}")
            if self._container is None:
                self._open(frame.shape[1], frame.shape[0])
            if (frame.shape[1], frame.shape[0]) != self._size:
                raise MediaError(f"frame size changed from {self._size[0]}x{self._size[1]} to "
                                 f"{frame.shape[1]}x{frame.shape[0]}")
            pts = int(round(t_ms * self.fps / 1000.0))
            if pts <= self._last_pts:
                raise MediaError(f"frame at {t_ms:.1f} ms is not after the previous frame "
                                 f"(blocks out of order or duplicated)")
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = pts
            vf.time_base = Fraction(1, self.fps)
            self._container.mux(self._video.encode(vf))
            self._last_pts = pts
            self.frames_written += 1
        # Keep audio roughly interleaved with video: write it up to the current video time.
        if self._audio is not None and self._container is not None:
            self._write_audio_until((self._last_pts + 1) * self.sample_rate // self.fps)

    def _write_audio_until(self, end_sample: int) -> None:
        av = require_av("MP4 writing")

        end_sample = min(end_sample, self._audio.shape[0])
        frame_size = 1024  # AAC frame length
        while self._audio_written < end_sample:
            n = min(frame_size, end_sample - self._audio_written)
            # Only the final frame may be short; wait for more video otherwise.
            if n < frame_size and end_sample < self._audio.shape[0]:
                break
            chunk = self._audio[self._audio_written:self._audio_written + n]
            samples = (chunk.astype(np.float32) / 32768.0 if chunk.dtype == np.int16
                       else chunk.astype(np.float32))
            af = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="fltp", layout="mono")
            af.sample_rate = self.sample_rate
            af.pts = self._audio_written
            af.time_base = Fraction(1, self.sample_rate)
            self._container.mux(self._astream.encode(af))
            self._audio_written += n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._container is None:
            raise MediaError(f"no video frames were added; {self.path!r} not written")
        try:
            self._container.mux(self._video.encode(None))
            if self._astream is not None:
                self._write_audio_until(self._audio.shape[0])
                self._container.mux(self._astream.encode(None))
        finally:
            self._container.close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._container is not None and not self._closed:
            self._closed = True
            self._container.close()


def write_mp4(path: str | os.PathLike[str], blocks: Iterable[VideoBlock],
              audio_pcm: np.ndarray | None, fps: int = 25, sample_rate: int = 16000) -> int:
    """Write blocks (in order) and the audio they were made from to an MP4; returns frame count."""
    writer = Mp4Writer(path, fps=fps, sample_rate=sample_rate, audio_pcm=audio_pcm)
    with writer:
        for block in blocks:
            writer.add_block(block)
    return writer.frames_written
