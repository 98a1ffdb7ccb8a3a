"""The toy world: one seed = one cartoon person talking (identity, voice, sway, blinks, speech).

Time base: 25 fps video, 16 kHz audio, so frame t owns audio samples [640 t, 640 (t + 1)). The
ground-truth mouth opening of frame t follows the loudness of exactly those samples (through the
envelope follower in `faces.MouthFollower`). A `ToyStream` renders the world chunk by chunk with
state carried across chunks; `make_clip` is the same stream read in one go, so a clip and the
concatenated chunks of a stream of the same seed are byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from avatarserve.toy.errors import ToyWorldError
from avatarserve.toy.faces import (
    FPS,
    BlinkSchedule,
    HeadMotion,
    Identity,
    MouthFollower,
    frame_rms,
    render,
    sample_identity,
)
from avatarserve.toy.speech import SAMPLE_RATE, SpeechTrack, VoiceProfile

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
DEFAULT_SIZE = 64


@dataclass
class Clip:
    """A finished clip of the toy world with its ground truth."""

    seed: int
    frames: np.ndarray  # uint8 [T, H, W, 3]
    audio: np.ndarray  # float32 [T * 640], 16 kHz mono
    mouth_open: np.ndarray  # float32 [T] in [0, 1], ground truth
    eye_open: np.ndarray  # float32 [T] in [0, 1], 1 = open
    head_pose: np.ndarray  # float32 [T, 3]: dx, dy (normalised units), angle (radians)
    identity: Identity
    voice: VoiceProfile
    reference_image: np.ndarray  # uint8 [H, W, 3]: rest pose, eyes open, mouth closed
    texts: List[str]
    fps: int = FPS
    sample_rate: int = SAMPLE_RATE

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def seconds(self) -> float:
        return self.num_frames / self.fps

    def metadata(self) -> Dict[str, Any]:
        return {
            "seed": self.seed,
            "num_frames": self.num_frames,
            "num_samples": int(self.audio.size),
            "fps": self.fps,
            "sample_rate": self.sample_rate,
            "size": int(self.frames.shape[1]),
            "identity": self.identity.to_dict(),
            "voice": self.voice.to_dict(),
            "texts": list(self.texts),
        }


@dataclass
class StreamChunk:
    """Frames [start_frame, start_frame + T) of a `ToyStream` with their audio and ground truth."""

    start_frame: int
    frames: np.ndarray
    audio: np.ndarray
    mouth_open: np.ndarray
    eye_open: np.ndarray
    head_pose: np.ndarray


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0 or seed >= 2**63:
        raise ToyWorldError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def _num_frames(seconds: Any) -> int:
    try:
        value = float(seconds)
    except (TypeError, ValueError) as exc:
        raise ToyWorldError(f"seconds must be a number, got {seconds!r}") from exc
    if not np.isfinite(value) or value <= 0:
        raise ToyWorldError(f"seconds must be positive and finite, got {seconds!r}")
    frames = int(round(value * FPS))
    if frames < 1:
        raise ToyWorldError(f"seconds={seconds!r} is shorter than one frame (1/{FPS} s)")
    return frames


class ToyStream:
    """A (possibly very long) toy-world stream of one seed, generated lazily chunk by chunk.

    Iterating yields `StreamChunk`s of `chunk_seconds` (the last one may be shorter); only one chunk
    is in memory at a time. A stream can be iterated once.
    """

    def __init__(
        self,
        seed: int,
        seconds: float,
        size: int = DEFAULT_SIZE,
        chunk_seconds: float = 2.0,
        espeak_binary: Optional[str] = None,
    ) -> None:
        self.seed = _check_seed(seed)
        self.num_frames = _num_frames(seconds)
        self.chunk_frames = _num_frames(chunk_seconds)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= size <= 1024:
            raise ToyWorldError(f"size must be an integer in [16, 1024], got {size!r}")
        self.size = int(size)
        self.fps = FPS
        self.sample_rate = SAMPLE_RATE
        self.identity = sample_identity(self.seed)
        self._speech = SpeechTrack(self.seed, SAMPLE_RATE, binary=espeak_binary)
        self.voice = self._speech.voice
        self._motion = HeadMotion(self.seed)
        self._blinks = BlinkSchedule(self.seed)
        self._mouth = MouthFollower(self.voice.peak_dbfs)
        self._position = 0
        self.reference_image = render(
            self.identity, self.size, np.zeros((1, 3)), np.ones(1), np.zeros(1)
        )[0]

    @property
    def texts(self) -> List[str]:
        """Sentences spoken so far."""
        return list(self._speech.texts)

    def next_chunk(self, num_frames: int) -> StreamChunk:
        """The next `num_frames` frames (fewer at the end of the stream; 0 when exhausted)."""
        if num_frames < 0:
            raise ToyWorldError(f"num_frames must be >= 0, got {num_frames}")
        n = min(num_frames, self.num_frames - self._position)
        start = self._position
        audio = self._speech.read(n * SAMPLES_PER_FRAME)
        mouth = self._mouth(frame_rms(audio, SAMPLES_PER_FRAME)) if n else np.zeros(0)
        pose = self._motion.pose(start, n)
        eyes = self._blinks.eye_open(start, n) if n else np.zeros(0)
        frames = render(self.identity, self.size, pose, eyes, mouth)
        self._position += n
        return StreamChunk(
            start_frame=start,
            frames=frames,
            audio=audio,
            mouth_open=mouth.astype(np.float32),
            eye_open=eyes.astype(np.float32),
            head_pose=pose.astype(np.float32),
        )

    def __iter__(self) -> Iterator[StreamChunk]:
        while self._position < self.num_frames:
            yield self.next_chunk(self.chunk_frames)


def make_stream(
    seed: int,
    seconds: float = 600.0,
    size: int = DEFAULT_SIZE,
    chunk_seconds: float = 2.0,
    espeak_binary: Optional[str] = None,
) -> ToyStream:
    """A lazily generated stream (default 10 minutes) of the person and voice of `seed`."""
    return ToyStream(seed, seconds, size=size, chunk_seconds=chunk_seconds, espeak_binary=espeak_binary)


def make_clip(seed: int, seconds: float, size: int = DEFAULT_SIZE, espeak_binary: Optional[str] = None) -> Clip:
    """One clip of `seconds` (rounded to whole frames at 25 fps) of the person and voice of `seed`."""
    stream = ToyStream(seed, seconds, size=size, chunk_seconds=seconds, espeak_binary=espeak_binary)
    chunk = stream.next_chunk(stream.num_frames)
    return Clip(
        seed=stream.seed,
        frames=chunk.frames,
        audio=chunk.audio,
        mouth_open=chunk.mouth_open,
        eye_open=chunk.eye_open,
        head_pose=chunk.head_pose,
        identity=stream.identity,
        voice=stream.voice,
        reference_image=stream.reference_image,
        texts=stream.texts,
    )
