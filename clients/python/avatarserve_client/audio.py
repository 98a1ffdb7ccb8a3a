"""Audio helpers: load/resample to the API's PCM format, cut it into AudioChunks, pace it.

The API takes mono PCM at 16 kHz (s16le, optionally f32le). Timestamps are milliseconds on the
stream's audio clock: chunk pts = floor(samples_before * 1000 / sample_rate).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator

import numpy as np

from avatarserve_client.v1 import avatar_service_pb2 as pb

from .errors import InvalidArgument, MissingDependency

SAMPLE_RATE = 16000
MAX_CHUNK_MS = 1000  # server-side limit per AudioChunk (see the proto)


def resample(x: np.ndarray, src_rate: int, dst_rate: int, *, half_width: int = 16) -> np.ndarray:
    """Band-limited resampling of a 1-D float signal (Kaiser-windowed sinc).

    `half_width` is the filter half-length in zero crossings of the (lower) cutoff; 16 gives
    > 60 dB stop-band rejection, plenty for speech going into a speech model.
    """
    if src_rate <= 0 or dst_rate <= 0:
        raise InvalidArgument(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise InvalidArgument(f"resample expects a 1-D signal, got shape {x.shape}")
    if src_rate == dst_rate or x.size == 0:
        return x.astype(np.float32)
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    n_out = (x.size * up + down - 1) // down
    # Cutoff relative to the input Nyquist: below the output Nyquist when downsampling.
    cutoff = min(1.0, dst_rate / src_rate)
    radius = half_width / cutoff  # filter support in input samples, each side
    offsets = np.arange(-math.ceil(radius) + 1, math.ceil(radius) + 1)
    beta = 8.6
    out = np.empty(n_out, dtype=np.float64)
    step = 4096  # bounds the (step x taps) working arrays
    for start in range(0, n_out, step):
        n = np.arange(start, min(start + step, n_out))
        t = n * down / up  # position of each output sample on the input grid
        idx = np.floor(t).astype(np.int64)[:, None] + offsets[None, :]
        d = t[:, None] - idx
        window = np.where(np.abs(d) < radius,
                          np.i0(beta * np.sqrt(np.clip(1.0 - (d / radius) ** 2, 0.0, 1.0))) / np.i0(beta),
                          0.0)
        taps = cutoff * np.sinc(cutoff * d) * window
        valid = (idx >= 0) & (idx < x.size)
        samples = np.where(valid, x[np.clip(idx, 0, x.size - 1)], 0.0)
        out[n] = np.sum(taps * samples, axis=1)
    return out.astype(np.float32)


def float_to_pcm16(x: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16 (clipped, rounded). NaN/Inf raise InvalidArgument."""
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise InvalidArgument("audio contains NaN or Inf samples")
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def require_soundfile(feature: str, extra: str = "audio") -> Any:
    """soundfile, an optional dependency (the `audio` extra); MissingDependency naming `feature` if absent."""
    try:
        import soundfile
    except ImportError as exc:
        raise MissingDependency("soundfile", extra, feature) from exc
    return soundfile


def read_wav(path: str | os.PathLike[str], *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file (WAV/FLAC/OGG via libsndfile) as mono int16 PCM at `sample_rate`.

    Multi-channel audio is averaged to mono; other rates are resampled. Needs the `audio` extra
    (soundfile).
    """
    sf = require_soundfile("read_wav (audio file reading)")
    try:
        data, rate = sf.read(os.fspath(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise InvalidArgument(f"cannot read audio file {os.fspath(path)!r}: {exc}") from exc
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate:
        mono = resample(mono, int(rate), sample_rate)
    return float_to_pcm16(mono)


def silence(ms: float, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`ms` milliseconds of digital silence as int16 PCM (rounded to whole samples)."""
    if ms < 0 or not math.isfinite(ms):
        raise InvalidArgument(f"silence duration must be a non-negative number of ms, got {ms!r}")
    return np.zeros(int(round(ms * sample_rate / 1000.0)), dtype=np.int16)


def pcm_to_bytes(pcm: np.ndarray) -> bytes:
    """int16 -> s16le bytes, float32 -> f32le bytes (the two encodings the API accepts)."""
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise InvalidArgument(f"PCM must be 1-D mono samples, got shape {pcm.shape}")
    if pcm.dtype == np.int16:
        return pcm.astype("<i2", copy=False).tobytes()
    if pcm.dtype == np.float32:
        if not np.all(np.isfinite(pcm)):
            raise InvalidArgument("f32 PCM contains NaN or Inf samples")
        return pcm.astype("<f4", copy=False).tobytes()
    raise InvalidArgument(f"PCM must be int16 (s16le) or float32 (f32le), got dtype {pcm.dtype}")


def pts_ms_for(samples_before: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Audio-clock timestamp (ms) of the sample at index `samples_before`."""
    return (samples_before * 1000) // sample_rate


def chunk_pcm(
    pcm: np.ndarray,
    *,
    chunk_ms: float = 40,
    sample_rate: int = SAMPLE_RATE,
    start_seq: int = 0,
    start_sample: int = 0,
) -> list[pb.AudioChunk]:
    """Cut mono PCM into AudioChunk messages with consecutive seq and audio-clock pts.

    int16 input gives s16le chunks, float32 gives f32le. The last chunk may be shorter.
    `start_sample` offsets the clock (e.g. to continue a stream).
    """
    chunk_samples = chunk_ms * sample_rate / 1000.0
    if not (0 < chunk_ms <= MAX_CHUNK_MS) or chunk_samples != int(chunk_samples):
        raise InvalidArgument(
            f"chunk_ms must be in (0, {MAX_CHUNK_MS}] and a whole number of samples at "
            f"{sample_rate} Hz, got {chunk_ms}")
    if start_seq < 0 or start_sample < 0:
        raise InvalidArgument("start_seq and start_sample must be non-negative")
    pcm = np.asarray(pcm)
    pcm_to_bytes(pcm[:0])  # validates dtype and shape once, up front
    n = int(chunk_samples)
    chunks = []
    for i, off in enumerate(range(0, pcm.shape[0], n)):
        chunks.append(pb.AudioChunk(seq=start_seq + i,
                                    pts_ms=pts_ms_for(start_sample + off, sample_rate),
                                    pcm=pcm_to_bytes(pcm[off:off + n])))
    return chunks


def _item_offset_s(item: Any, position_s: float, sample_rate: int, bytes_per_sample: int,
                   first_pts_ms: list[int]) -> tuple[float, float]:
    """(release offset in s since the start, new running position = end of audio so far)."""
    if isinstance(item, pb.AudioChunk):
        if not first_pts_ms:
            first_pts_ms.append(item.pts_ms)
        offset = (item.pts_ms - first_pts_ms[0]) / 1000.0
        duration = len(item.pcm) / bytes_per_sample / sample_rate
        return offset, max(position_s, offset + duration)
    if isinstance(item, np.ndarray):
        return position_s, position_s + item.shape[0] / sample_rate
    if isinstance(item, (bytes, bytearray, memoryview)):
        return position_s, position_s + len(item) / bytes_per_sample / sample_rate
    # Control markers take effect where the audio before them ends.
    return position_s, position_s


class RealtimePacer:
    """Release audio items no faster than real time, optionally `lead_ms` ahead of it.

    Items are AudioChunk messages (timed by their pts_ms, relative to the first one), numpy
    PCM arrays or raw PCM bytes (timed by their accumulated duration). Anything else (stream
    markers) is released when the audio before it has been released in full. Item k is released at start + offset_k - lead, where start is the time the
    first item is requested. A consumer that falls behind gets the overdue items immediately;
    the schedule stays anchored to the start (no drift).

    `clock`/`sleep` (and `async_sleep` for `async for`) are injectable for tests and for
    interruptible waits.
    """

    def __init__(
        self,
        items: Iterable[Any],
        *,
        lead_ms: float = 0.0,
        sample_rate: int = SAMPLE_RATE,
        bytes_per_sample: int = 2,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = time.sleep,
        async_sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        if lead_ms < 0 or not math.isfinite(lead_ms):
            raise InvalidArgument(f"lead_ms must be a non-negative number, got {lead_ms!r}")
        self._items = items
        self.lead_s = lead_ms / 1000.0
        self.sample_rate = sample_rate
        self.bytes_per_sample = bytes_per_sample
        self._clock = clock
        self._sleep = sleep
        self._async_sleep = async_sleep
        self.start_time: float | None = None

    def _schedule(self, item: Any, position_s: float, first_pts: list[int]) -> tuple[float, float]:
        offset, position_s = _item_offset_s(item, position_s, self.sample_rate,
                                            self.bytes_per_sample, first_pts)
        assert self.start_time is not None
        return self.start_time + offset - self.lead_s, position_s

    def __iter__(self) -> Iterator[Any]:
        position_s, first_pts = 0.0, []
        for item in self._items:
            if self.start_time is None:
                self.start_time = self._clock()
            due, position_s = self._schedule(item, position_s, first_pts)
            wait = due - self._clock()
            if wait > 0:
                self._sleep(wait)
            yield item

    async def __aiter__(self) -> AsyncIterator[Any]:
        position_s, first_pts = 0.0, []
        async for item in _aiter(self._items):
            if self.start_time is None:
                self.start_time = self._clock()
            due, position_s = self._schedule(item, position_s, first_pts)
            wait = due - self._clock()
            if wait > 0:
                await self._async_sleep(wait)
            yield item


async def _aiter(items: Any) -> AsyncIterator[Any]:
    """Iterate a sync or async iterable from async code."""
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
