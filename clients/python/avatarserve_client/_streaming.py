"""Pieces shared by the sync and asyncio clients: input conversion, send queues, statistics."""

from __future__ import annotations

import asyncio
import collections
import enum
import io
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from avatarserve_client.v1 import avatar_service_pb2 as pb

from .audio import float_to_pcm16, pcm_to_bytes, pts_ms_for
from .errors import InvalidArgument
from .types import AudioEncoding

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a block of large JPEGs can exceed gRPC's 4 MiB default
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set (True) or `timeout` seconds passed (False). Not `asyncio.wait_for(event.wait())`:
    before Python 3.12 that swallows a cancellation arriving while the event is set, and a loop sleeping on it outlives
    the cancel meant to end it (the server's stream feeder did, and kept its session's stream lock; it uses this one)."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)


async def wait_done(awaitable: Any, timeout: float) -> bool:
    """Wait until `awaitable` (a task, future or coroutine, run as a task) is done (True) or `timeout` seconds passed
    (False, and it keeps running: the caller decides whether to cancel it). Not `asyncio.wait_for`: before Python
    3.12 that drops a cancellation of the caller arriving with the result, and it cancels the work on expiry."""
    future = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({future}, timeout=timeout)
    return bool(done)


class StreamMarker(enum.Enum):
    """In-band commands that may appear in an audio iterable; sent in order with the audio."""

    INTERRUPT = "interrupt"
    END_OF_INPUT = "end_of_input"
    # The audio so far completes an utterance (UTTERANCE_STARTED / UTTERANCE_ENDED report its playback).
    END_OF_UTTERANCE = "end_of_utterance"

    def to_message(self) -> pb.ClientMessage:
        kind = {StreamMarker.INTERRUPT: pb.Control.KIND_INTERRUPT,
                StreamMarker.END_OF_INPUT: pb.Control.KIND_END_OF_INPUT,
                StreamMarker.END_OF_UTTERANCE: pb.Control.KIND_END_OF_UTTERANCE}[self]
        return pb.ClientMessage(control=pb.Control(kind=kind))


def control_message(kind: int) -> pb.ClientMessage:
    return pb.ClientMessage(control=pb.Control(kind=kind))


def load_image_bytes(image: Any) -> bytes:
    """Reference image as PNG/JPEG bytes from a path, bytes, a PIL image or an HxWx3 array."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise InvalidArgument(f"cannot read reference image {os.fspath(image)!r}: {exc}") from exc
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidArgument("a reference image array must be HxWx3 uint8 RGB, got shape "
                                  f"{image.shape} dtype {image.dtype}")
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image, "RGB").save(buf, format="PNG")
        data = buf.getvalue()
    elif hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise InvalidArgument(f"reference image must be a path, bytes, PIL image or numpy array, "
                              f"got {type(image).__name__}")
    if not (data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC)):
        raise InvalidArgument(f"reference image is neither PNG nor JPEG (starts with {data[:8]!r}, "
                              f"{len(data)} bytes)")
    return data


class AudioStamper:
    """Turns audio-iterable items into ClientMessages with valid seq / pts.

    AudioChunk messages keep their own seq/pts (checked locally so mistakes fail fast with a
    clear message); numpy arrays and raw bytes get the next seq and the pts right after the
    audio sent so far, or `floor_ms()` if that is later (live sessions: audio stamped in the
    past would be dropped as late by a server that fills silence).
    """

    def __init__(self, encoding: AudioEncoding, sample_rate: int,
                 floor_ms: Callable[[], int] | None = None) -> None:
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.floor_ms = floor_ms
        self.next_seq = 0
        self.end_sample = 0  # end of the audio sent so far, on the stream clock

    def _array_bytes(self, pcm: np.ndarray) -> bytes:
        pcm = np.asarray(pcm)
        if self.encoding is AudioEncoding.PCM_S16LE and pcm.dtype != np.int16:
            if not np.issubdtype(pcm.dtype, np.floating):
                raise InvalidArgument(f"audio arrays must be int16 or float, got {pcm.dtype}")
            pcm = float_to_pcm16(pcm)
        elif self.encoding is AudioEncoding.PCM_F32LE and pcm.dtype != np.float32:
            if pcm.dtype == np.int16:
                pcm = pcm.astype(np.float32) / 32768.0
            elif np.issubdtype(pcm.dtype, np.floating):
                pcm = pcm.astype(np.float32)
            else:
                raise InvalidArgument(f"audio arrays must be int16 or float, got {pcm.dtype}")
        return pcm_to_bytes(pcm)

    def to_message(self, item: Any) -> pb.ClientMessage:
        if isinstance(item, StreamMarker):
            return item.to_message()
        if isinstance(item, pb.Control):
            return pb.ClientMessage(control=item)
        if isinstance(item, pb.AudioChunk):
            return pb.ClientMessage(audio=self._check_chunk(item))
        if isinstance(item, np.ndarray):
            data = self._array_bytes(item)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        else:
            raise InvalidArgument(f"cannot send {type(item).__name__} as audio; expected an "
                                  f"AudioChunk, a numpy PCM array, PCM bytes or a StreamMarker")
        start = self.end_sample
        if self.floor_ms is not None:
            start = max(start, self.floor_ms() * self.sample_rate // 1000)
        chunk = pb.AudioChunk(seq=self.next_seq, pts_ms=pts_ms_for(start, self.sample_rate), pcm=data)
        return pb.ClientMessage(audio=self._check_chunk(chunk, start_sample=start))

    def _check_chunk(self, chunk: pb.AudioChunk, start_sample: int | None = None) -> pb.AudioChunk:
        size = self.encoding.sample_size
        if len(chunk.pcm) % size:
            raise InvalidArgument(f"audio chunk seq={chunk.seq} has {len(chunk.pcm)} bytes, not a "
                                  f"multiple of the {size}-byte {self.encoding.value} sample")
        if chunk.seq < self.next_seq:
            raise InvalidArgument(f"audio chunk seq={chunk.seq} does not increase "
                                  f"(expected >= {self.next_seq})")
        end_ms = pts_ms_for(self.end_sample, self.sample_rate)
        if chunk.pts_ms < end_ms - 1:
            raise InvalidArgument(f"audio chunk seq={chunk.seq} pts_ms={chunk.pts_ms} overlaps audio "
                                  f"already sent (which ends at {end_ms} ms)")
        if start_sample is None:
            start_sample = max(self.end_sample, chunk.pts_ms * self.sample_rate // 1000)
        self.next_seq = chunk.seq + 1
        self.end_sample = start_sample + len(chunk.pcm) // size
        return chunk


@dataclass
class StreamStats:
    """Client-side timing of one stream (time.monotonic() seconds)."""

    started_at: float = 0.0
    first_audio_sent_at: float | None = None
    first_block_at: float | None = None
    last_block_at: float | None = None
    blocks: int = 0
    frames: int = 0
    idle_blocks: int = 0
    audio_chunks_sent: int = 0
    audio_chunks_dropped: int = 0  # discarded locally by interrupt()

    @property
    def ttff_s(self) -> float | None:
        """Time to first frame: first audio handed to gRPC (or stream start) -> first block."""
        if self.first_block_at is None:
            return None
        ref = self.first_audio_sent_at if self.first_audio_sent_at is not None else self.started_at
        return self.first_block_at - ref

    @property
    def fps(self) -> float | None:
        """Steady delivery rate: frames after the first block / time from first to last block."""
        if self.blocks < 2 or self.first_block_at is None or self.last_block_at is None:
            return None
        span = self.last_block_at - self.first_block_at
        return (self.frames - self._first_block_frames) / span if span > 0 else None

    _first_block_frames: int = field(default=0, repr=False)

    def on_block(self, num_frames: int, is_idle: bool, now: float) -> None:
        if self.first_block_at is None:
            self.first_block_at = now
            self._first_block_frames = num_frames
        self.last_block_at = now
        self.blocks += 1
        self.frames += num_frames
        self.idle_blocks += int(is_idle)

    def on_sent(self, msg: pb.ClientMessage) -> None:
        if msg.WhichOneof("kind") == "audio":
            if self.first_audio_sent_at is None:
                self.first_audio_sent_at = time.monotonic()
            self.audio_chunks_sent += 1


def _is_audio(msg: pb.ClientMessage) -> bool:
    return msg.WhichOneof("kind") == "audio"


class SendQueue:
    """Thread-safe send queue: audio is bounded (back-pressure), control messages never block.

    INTERRUPT drops the audio still queued locally (it belongs to the speech being cut off).
    """

    def __init__(self, max_audio: int) -> None:
        if max_audio < 1:
            raise InvalidArgument(f"max_queued_chunks must be >= 1, got {max_audio}")
        self.max_audio = max_audio
        self._items: collections.deque[pb.ClientMessage] = collections.deque()
        self._audio = 0
        self._closed = False
        self._cond = threading.Condition()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, msg: pb.ClientMessage, timeout: float | None = None) -> bool:
        """Queue a message; audio waits while the queue is full. False if the queue closed
        (or `timeout` passed) before the message was accepted."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if _is_audio(msg):
                while self._audio >= self.max_audio and not self._closed:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
            if self._closed:
                return False
            self._items.append(msg)
            self._audio += int(_is_audio(msg))
            self._cond.notify_all()
            return True

    def interrupt(self, msg: pb.ClientMessage) -> int:
        """Drop queued audio and queue `msg`; returns how many audio chunks were dropped."""
        with self._cond:
            if self._closed:
                return 0
            kept = collections.deque(m for m in self._items if not _is_audio(m))
            dropped = len(self._items) - len(kept)
            self._items, self._audio = kept, 0
            self._items.append(msg)
            self._cond.notify_all()
            return dropped

    def close(self, final: pb.ClientMessage | None = None) -> None:
        """Stop accepting messages (after queueing `final`); get() drains what is queued."""
        with self._cond:
            if not self._closed and final is not None:
                self._items.append(final)
            self._closed = True
            self._cond.notify_all()

    def abort(self) -> None:
        """Close and forget everything queued."""
        with self._cond:
            self._items.clear()
            self._audio = 0
            self._closed = True
            self._cond.notify_all()

    def get(self) -> pb.ClientMessage | None:
        """Next message, blocking; None once closed and drained."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return None
            msg = self._items.popleft()
            self._audio -= int(_is_audio(msg))
            self._cond.notify_all()
            return msg


class AsyncSendQueue:
    """asyncio twin of SendQueue (single event loop)."""

    def __init__(self, max_audio: int) -> None:
        if max_audio < 1:
            raise InvalidArgument(f"max_queued_chunks must be >= 1, got {max_audio}")
        self.max_audio = max_audio
        self._items: collections.deque[pb.ClientMessage] = collections.deque()
        self._audio = 0
        self._closed = False
        self._cond = asyncio.Condition()

    @property
    def closed(self) -> bool:
        return self._closed

    async def put(self, msg: pb.ClientMessage) -> bool:
        async with self._cond:
            if _is_audio(msg):
                await self._cond.wait_for(lambda: self._audio < self.max_audio or self._closed)
            if self._closed:
                return False
            self._items.append(msg)
            self._audio += int(_is_audio(msg))
            self._cond.notify_all()
            return True

    async def interrupt(self, msg: pb.ClientMessage) -> int:
        async with self._cond:
            if self._closed:
                return 0
            kept = collections.deque(m for m in self._items if not _is_audio(m))
            dropped = len(self._items) - len(kept)
            self._items, self._audio = kept, 0
            self._items.append(msg)
            self._cond.notify_all()
            return dropped

    async def close(self, final: pb.ClientMessage | None = None) -> None:
        async with self._cond:
            if not self._closed and final is not None:
                self._items.append(final)
            self._closed = True
            self._cond.notify_all()

    async def get(self) -> pb.ClientMessage | None:
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._items) or self._closed)
            if not self._items:
                return None
            msg = self._items.popleft()
            self._audio -= int(_is_audio(msg))
            self._cond.notify_all()
            return msg
