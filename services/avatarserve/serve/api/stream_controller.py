"""One open StreamSession: client audio in, pipeline blocks out, video chunks back, on the audio clock.

The controller owns the session's *timeline*. The audio clock is the master: every position is a sample index of
the stream clock (0 = the stream's first sample). The gateway keeps client audio in a bounded buffer and feeds the
pipeline one whole block of PCM at a time, at most `max_in_flight` blocks ahead of delivery, so:

- TPP stays full (while stage k works on block n, stage k-1 works on block n+1);
- INTERRUPT is cheap: buffered audio is dropped at once, and blocks already in flight are generated but not
  delivered; the next block is fed immediately as an idle (silence) block;
- a client that stops sending (IDLE_MODE_FILL_SILENCE) gets idle blocks: block n is filled with silence once its
  whole span is due on the wall clock plus `fill_grace_ms`; audio that arrives later for a filled span is counted
  late and dropped;
- a slow reader stalls the receiver, then the pipeline, then the feeder, then reading client audio (back-pressure
  all the way to the client; nothing grows without bound);
- a client that sends no audio for `idle_timeout_s` (counted from the last audio before the stream too:
  `idle_since_s`) gets its input ended (END_OF_STREAM code `idle_timeout`), whether or not blocks are in flight at
  that moment; the gateway then closes the session;
- `request_end(code)` (CloseSession, the idle sweep, a draining server) ends the stream at once: blocks in flight are
  not delivered, END_OF_STREAM carries the code; a client that cancels the call ends it at once too
  (`StreamCancelled`), without draining;
- WARNING events, at most one per code per `warning_interval_s`: `audio_late` when client audio is dropped because its
  span was already filled with silence, `behind_realtime` when a block is delivered more than `behind_realtime_s` after
  its audio ended on the stream's wall clock;
- positions are the pipe's: the pipe numbers this stream's blocks from 0 (the stages key their state by it); the
  client sees session-level indices, `block_base` (the blocks of the session's earlier streams) added at the edge;
  events carry the session's totals (`base` counters of the earlier streams plus this stream's);
- utterances (client audio between END_OF_UTTERANCE / INTERRUPT / end-of-input boundaries) are reported as their
  blocks are delivered: UTTERANCE_STARTED before the first chunk holding their audio, UTTERANCE_ENDED after the
  chunk holding their last audio, or at an INTERRUPT with how much of them was played out (`_Utterance`).

Many sessions share one event loop (the gateway's), so no loop here may run a pass without awaiting something that
suspends: the feeder sleeps until it is woken (audio, INTERRUPT, end of input, a block delivered) or until its next
deadline (the next block falling due, the idle timeout), and never polls; back-pressure waits on the feeder taking
audio out of the buffer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Optional

import grpc
import numpy as np
from avatarserve_client._streaming import wait_event  # one cancel-safe wait for the SDK and the server
from avatarserve_client.v1 import avatar_service_pb2 as pb

from avatarserve.engine.idle import is_idle as is_idle_rms
from avatarserve.serve.api.errors import ApiError, from_pipeline_error
from avatarserve.serve.cancel_safe import cancel_requested
from avatarserve.serve.dataplane.transport import DEADLINE_KEY, BlockItem, ControlItem, PipelineError

# Shortest sleep of the feeder: a deadline reached within the clock's rounding still sleeps, never spins.
_MIN_SLEEP_S = 1e-3


@dataclass
class StreamSettings:
    sample_rate: int
    samples_per_block: int
    frames_per_block: int
    fps: int
    width: int
    height: int
    encoding: str = "s16le"  # or "f32le"
    idle_mode: str = "fill"  # or "wait"
    fill_grace_ms: int = 200
    idle_timeout_s: float = 300.0
    max_chunk_ms: int = 1000
    max_buffer_s: float = 30.0
    max_in_flight: int = 7
    return_audio: bool = False  # VideoChunk.audio_pcm: the block's audio span as s16le
    idle_since_s: float = 0.0  # seconds the session had been without client audio when this stream started
    block_base: int = 0  # session-level index of this stream's first block (blocks of the session's earlier streams)
    behind_realtime_s: float = 3.0  # WARNING `behind_realtime` when a block's delivery lag exceeds this
    warning_interval_s: float = 5.0  # least time between two WARNING events of one code

    @property
    def block_ms(self) -> float:
        return self.samples_per_block * 1000.0 / self.sample_rate


@dataclass
class _InFlight:
    pts_ms: int
    is_idle: bool
    sent_at: float
    start: int = 0  # stream-clock sample where the block's span starts
    anchor: float = 0.0  # the stream's wall-clock anchor when the block was fed (its audio complete)
    pcm: Optional[np.ndarray] = None  # the block's audio, kept only to return it (StreamSettings.return_audio)
    discard: bool = False


@dataclass
class _Utterance:
    """Client audio between two boundaries, on the stream clock [start, end) in samples."""

    index: int
    start: int
    end: int
    closed: bool = False  # END_OF_UTTERANCE / end of input: `end` is final
    started: bool = False  # UTTERANCE_STARTED sent


@dataclass
class Counters:
    audio_samples_received: int = 0
    audio_chunks_received: int = 0
    audio_samples_late: int = 0
    audio_samples_discarded: int = 0
    blocks_generated: int = 0
    blocks_delivered: int = 0
    idle_blocks_delivered: int = 0
    frames_delivered: int = 0
    interrupts: int = 0
    streams_opened: int = 1

    def proto(self) -> pb.SessionCounters:
        return pb.SessionCounters(**self.__dict__)

    def __add__(self, other: "Counters") -> "Counters":
        return Counters(**{k: v + getattr(other, k) for k, v in self.__dict__.items()})

    def as_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)


class _Done:
    pass


class _EndNow:
    """Queued by `request_end`: the stream ends at once with END_OF_STREAM `code`."""

    def __init__(self, code: str) -> None:
        self.code = code


class StreamCancelled(Exception):
    """The client cancelled the call (or vanished): the stream ends at once, nothing more is sent."""


async def next_request(requests: AsyncIterator):
    """The client's next message, None at the end of its request stream. A request stream that breaks (instead of
    ending) raises StreamCancelled: under Serve, fetching the next message is a Ray call to the proxy, and Ray cancels
    it (TaskCancelledError) when the client cancels the call; our own parsing never raises (api/grpc_service.py)."""
    try:
        return await requests.__anext__()
    except StopAsyncIteration:
        return None
    except Exception as exc:  # noqa: BLE001 - whatever broke the request stream, nothing more comes from this client
        raise StreamCancelled(f"the request stream broke: {type(exc).__name__}: {exc}") from exc


# End codes that drain (what the client sent is still delivered, then DRAINED) instead of ending at once.
DRAINING_ENDS = frozenset({"idle_timeout", "server_draining"})

# END_OF_STREAM / DRAINED codes (StatusEvent.code) and their human-readable message.
END_MESSAGES = {
    "end_of_input": "end of input: every block of this stream's audio was delivered",
    "closed": "the session was closed (CloseSession)",
    "idle_timeout": "idle timeout: no client audio for the session's idle_timeout_s; the session is closed",
    "server_draining": "the server is draining; reopen the stream on the same session to continue",
}


class StreamController:
    def __init__(self, session_id: str, settings: StreamSettings, pipe: Any, *,
                 on_block: Optional[Callable[[dict], Any]] = None, clock: Callable[[], float] = time.monotonic,
                 geometry: Optional[pb.SessionGeometry] = None, base: Optional[Counters] = None,
                 on_cancel: Optional[Callable[[], Awaitable[None]]] = None):
        self.sid = session_id
        self.s = settings
        self.pipe = pipe
        self.clock = clock
        self.on_block = on_block  # async callback with per-block stats (metrics, Redis counters)
        self.geometry = geometry
        self.counters = Counters()  # this stream's
        # the session's totals before this stream (streams_opened 0: this stream is counted in `counters`)
        self.base = base if base is not None else Counters(streams_opened=0)
        self.last_audio_wall_ms = 0  # Unix ms of the last accepted AudioChunk with audio (0: none on this stream)
        self._warned_at: Dict[str, float] = {}  # WARNING code -> clock time it was last sent
        self._late_unreported = 0  # late samples dropped since the last `audio_late` WARNING
        self._ending = False  # request_end was called
        # Awaited when the client cancels, before the stream unwinds: whoever consumes `run` may be gone already
        # (Serve dropped the call), so the gateway frees the session here, not only when the generator unwinds.
        self.on_cancel = on_cancel
        self.cancelled = False
        self._tasks: list = []
        self._end_task: Optional[asyncio.Task] = None  # queues the _EndNow marker (cancelled if the stream ends first)
        self.out_q: asyncio.Queue = asyncio.Queue(maxsize=4)
        self._wake = asyncio.Event()  # the feeder's state changed: audio, INTERRUPT, end of input, a block delivered
        self._room = asyncio.Event()  # audio left the buffer (or the stream failed): back-pressure may release
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf_real = 0  # real client samples in the buffer (not gap-filled)
        self.clock_pos = 0  # stream-clock sample index where the next fed block starts
        self.real_end = 0  # end of real client audio received (stream clock)
        self.next_block = 0
        self.in_flight: Dict[int, _InFlight] = {}
        self.end_of_input = False
        self.force_idle = False
        self._forced_idle_span: Optional[tuple] = None  # stream-clock span of the idle block sent at an INTERRUPT
        self._pts_shift = 0  # samples the server's stream clock is ahead of the client's (INTERRUPT idle blocks)
        self.last_seq = -1
        self.t0 = 0.0
        self.last_audio_at = 0.0
        self.speaking: Optional[bool] = None
        self.interrupted_at: Optional[float] = None
        self.interrupt_to_idle_s: list = []
        self.utterances: list = []  # not yet ended, in order (_Utterance)
        self.utterances_begun = 0
        self.delivered_end = 0  # stream-clock sample where the last delivered block's span ends
        self.ttff_s: Optional[float] = None
        self.first_sent_at: Optional[float] = None
        # Wall-clock time of stream-clock sample 0: the stream start while filling silence; in wait-for-audio mode it
        # moves forward when audio arrives later than its pts says (the client paused), so delivery lag is measured
        # against when the audio could have been there.
        self.anchor = 0.0
        self._fatal: Optional[BaseException] = None
        self.end_reason = "end_of_input"

    # ----- public -------------------------------------------------------------------------------------------
    @property
    def totals(self) -> Counters:
        """The session's counters now: its earlier streams plus this one."""
        return self.base + self.counters

    @property
    def next_session_block(self) -> int:
        """Session-level index of the block after the last one this stream fed (where the next stream starts)."""
        return self.s.block_base + self.next_block

    def request_end(self, code: str, *, drain: bool = False) -> None:
        """End the stream with END_OF_STREAM `code` (see END_MESSAGES): now (blocks in flight are not delivered), or
        with `drain` like an end of input (what was received is still delivered, then DRAINED). Safe to call from any
        task of the loop, more than once (the first code wins)."""
        if self._ending:
            return
        if drain:
            self._ending = True
            if not self.end_of_input:
                self.end_reason = code
                self.end_of_input = True
                self._wake.set()
            return
        self._ending = True
        self.end_reason = code
        self._end_task = asyncio.get_running_loop().create_task(self._put(_EndNow(code)), name=f"{self.sid}/end")

    async def run(self, requests: AsyncIterator) -> AsyncIterator[pb.ServerMessage]:
        self.t0 = self.anchor = self.clock()
        self.last_audio_at = self.t0 - max(0.0, self.s.idle_since_s)
        yield pb.ServerMessage(status=pb.StatusEvent(kind=pb.StatusEvent.KIND_STARTED, pts_ms=0,
                                                      block_index=self.s.block_base, geometry=self.geometry,
                                                      counters=self.totals.proto()))
        tasks = [asyncio.create_task(self._guard(self._read(requests)), name="read"),
                 asyncio.create_task(self._guard(self._feed()), name="feed"),
                 asyncio.create_task(self._guard(self._receive()), name="receive")]
        self._tasks = list(tasks)
        try:
            while True:
                msg = await self.out_q.get()
                if isinstance(msg, _Done):
                    break
                if isinstance(msg, _EndNow):
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    yield self._status(pb.StatusEvent.KIND_END_OF_STREAM, END_MESSAGES.get(msg.code, msg.code),
                                       pts_ms=self._ms(self.delivered_end), block_index=self.next_block, code=msg.code)
                    return
                yield msg
            if self._fatal is not None:
                raise self._fatal
        finally:
            if self._end_task is not None:
                tasks.append(self._end_task)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ----- internals ------------------------------------------------------------------------------------------
    async def _guard(self, coro) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # first failure ends the stream with its status
            if self.cancelled:  # the client is gone: whatever failed after that (the pipe we closed) is moot
                self._fatal = StreamCancelled(f"session {self.sid}: the client cancelled the stream")
                while not self.out_q.empty():  # nobody may read these any more: never block on a full queue
                    self.out_q.get_nowait()
            elif self._fatal is None:
                self._fatal = exc if isinstance(exc, ApiError) else _api_error_for(exc)
            self._room.set()
            await self._put(_Done())

    async def _put(self, msg) -> None:
        await self.out_q.put(msg)

    def _status(self, kind: int, message: str = "", pts_ms: int = 0, block_index: int = 0, code: str = "",
                utterance: Optional[pb.UtteranceProgress] = None) -> pb.ServerMessage:
        """A status event; `block_index` is the pipe's (this stream's), sent as the session-level index."""
        return pb.ServerMessage(status=pb.StatusEvent(kind=kind, message=message, pts_ms=pts_ms,
                                                      block_index=self.s.block_base + block_index, code=code,
                                                      counters=self.totals.proto(), utterance=utterance))

    async def _warn(self, code: str, message: str, pts_ms: int) -> bool:
        """WARNING `code`, unless one of that code went out less than `warning_interval_s` ago. True if sent."""
        now = self.clock()
        last = self._warned_at.get(code)
        if last is not None and now - last < self.s.warning_interval_s:
            return False
        self._warned_at[code] = now
        await self._put(self._status(pb.StatusEvent.KIND_WARNING, message, pts_ms=pts_ms, block_index=self.next_block,
                                     code=code))
        return True

    # ----- utterances -------------------------------------------------------------------------------------------
    def _utterance_audio(self, start: int, end: int) -> None:
        """Client audio placed at [start, end): it extends the open utterance or begins the next one."""
        last = self.utterances[-1] if self.utterances else None
        if last is None or last.closed:
            self.utterances.append(_Utterance(index=self.utterances_begun, start=start, end=end))
            self.utterances_begun += 1
        else:
            last.end = end

    def _progress(self, u: _Utterance, interrupted: bool = False, upto: Optional[int] = None) -> pb.UtteranceProgress:
        """Its playback so far: delivered up to `upto` (default: the end of the last delivered chunk)."""
        delivered = self.delivered_end if upto is None else upto
        played = min(max(delivered - u.start, 0), u.end - u.start)
        return pb.UtteranceProgress(index=u.index, start_pts_ms=self._ms(u.start), duration_ms=self._ms(u.end - u.start),
                                    played_ms=self._ms(played), interrupted=interrupted)

    async def _utterance_event(self, kind: int, u: _Utterance, interrupted: bool = False,
                               upto: Optional[int] = None) -> None:
        await self._put(self._status(kind, pts_ms=self._ms(u.start), block_index=self.next_block,
                                     utterance=self._progress(u, interrupted, upto)))

    async def _end_utterance(self) -> None:
        """END_OF_UTTERANCE / end of input: the open utterance's audio is complete."""
        if self.utterances and not self.utterances[-1].closed:
            self.utterances[-1].closed = True
            await self._ended_utterances()

    async def _ended_utterances(self) -> None:
        """UTTERANCE_ENDED for every complete utterance whose audio has all been delivered, in order."""
        while self.utterances and self.utterances[0].closed and self.utterances[0].end <= self.delivered_end:
            u = self.utterances.pop(0)
            if not u.started:  # its audio was delivered within the same chunk it began in
                await self._utterance_event(pb.StatusEvent.KIND_UTTERANCE_STARTED, u)
            await self._utterance_event(pb.StatusEvent.KIND_UTTERANCE_ENDED, u)

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self.s.sample_rate

    def _decode_pcm(self, data: bytes) -> np.ndarray:
        if self.s.encoding == "f32le":
            if len(data) % 4:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"f32le pcm of {len(data)} bytes is not a multiple of 4")
            x = np.frombuffer(data, dtype="<f4").astype(np.float32)
            if not np.isfinite(x).all():
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "f32le audio contains NaN or Inf")
            return np.clip(x, -1.0, 1.0)
        if len(data) % 2:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"s16le pcm of {len(data)} bytes is not a multiple of 2")
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0

    async def _read(self, requests: AsyncIterator) -> None:
        while True:
            try:
                msg = await next_request(requests)
            except StreamCancelled:
                await self._client_gone()
            if msg is None:
                break
            if not isinstance(msg, pb.ClientMessage):  # a message the server could not parse (api/grpc_service.py)
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed ClientMessage: {msg}")
            kind = msg.WhichOneof("kind")
            if kind == "audio":
                await self._on_audio(msg.audio)
            elif kind == "control":
                if msg.control.kind == pb.Control.KIND_INTERRUPT:
                    await self._interrupt()
                elif msg.control.kind == pb.Control.KIND_END_OF_INPUT:
                    break
                elif msg.control.kind == pb.Control.KIND_END_OF_UTTERANCE:
                    await self._end_utterance()
                else:
                    raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown control kind {msg.control.kind}")
            elif kind == "hello":
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "Hello may only be the first message of a stream")
            else:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "empty ClientMessage")
        cancelled = getattr(requests, "is_cancelled", None)  # Serve's gRPCInputStream: the client went away
        if callable(cancelled) and cancelled():
            await self._client_gone()
        self.end_of_input = True  # END_OF_INPUT or half-close
        await self._end_utterance()
        self._wake.set()

    async def _client_gone(self) -> None:
        self.cancelled = True
        for t in self._tasks:  # stop generating at once (this task ends with the raise below)
            if t is not asyncio.current_task():
                t.cancel()
        if self.on_cancel is not None:
            await self.on_cancel()
        raise StreamCancelled(f"session {self.sid}: the client cancelled the stream")

    async def _on_audio(self, chunk: pb.AudioChunk) -> None:
        if chunk.seq <= self.last_seq:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"audio seq {chunk.seq} does not increase (last {self.last_seq})")
        self.last_seq = chunk.seq
        pcm = self._decode_pcm(chunk.pcm)
        if len(pcm) * 1000 > self.s.max_chunk_ms * self.s.sample_rate:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"audio chunk of {self._ms(len(pcm))} ms is longer than "
                                                  f"{self.s.max_chunk_ms} ms")
        if chunk.pts_ms < 0:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"negative pts_ms {chunk.pts_ms}")
        self.counters.audio_chunks_received += 1
        if not len(pcm):
            return  # keep-alive
        self.last_audio_at = self.clock()
        self.last_audio_wall_ms = int(time.time() * 1000)
        # The client's stream clock, plus how far INTERRUPTs moved the server's ahead of it (see below).
        start = chunk.pts_ms * self.s.sample_rate // 1000 + self._pts_shift
        tol = self.s.sample_rate // 1000
        if start < self.real_end - tol:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"audio pts_ms {chunk.pts_ms} overlaps audio already received "
                                                  f"(received up to {self._ms(self.real_end - self._pts_shift)} ms)")
        start = max(start, self.real_end)  # absorb the rounding tolerance
        forced = self._forced_idle_span
        if forced is not None:
            # The first audio after an INTERRUPT. The idle block sent at once at the INTERRUPTED pts was not due on
            # the wall clock: audio stamped inside its span follows it instead of being dropped as late, and so does
            # the rest of this client's audio (its clock keeps that offset), so its next chunks stay contiguous.
            self._forced_idle_span = None
            if forced[0] <= start < forced[1]:
                self._pts_shift += forced[1] - start
                start = forced[1]
        if self.s.idle_mode == "wait":
            self.anchor = max(self.anchor, self.last_audio_at - start / self.s.sample_rate)
        timeline_end = self.clock_pos + len(self._buf)
        if start < timeline_end:  # its span was already filled with silence: late
            late = min(len(pcm), timeline_end - start)
            self.counters.audio_samples_late += late
            self._late_unreported += late
            at_ms = self._ms(start - self._pts_shift)
            if await self._warn("audio_late", f"dropped {self._ms(self._late_unreported)} ms of client audio that "
                                              f"arrived after its span was filled with silence (latest at pts "
                                              f"{at_ms} ms, {self._ms(self.counters.audio_samples_late)} ms late on "
                                              "this stream so far); send audio no later than real time",
                                pts_ms=at_ms):
                self._late_unreported = 0
            pcm = pcm[late:]
            start += late
        elif start > timeline_end:  # a gap on the client's clock: silence
            room = int(self.s.max_buffer_s * self.s.sample_rate) - len(self._buf)
            if start - timeline_end > room:  # checked before allocating: the gap would be buffered as silence
                raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"audio pts_ms {chunk.pts_ms} leaves a gap of {self._ms(start - timeline_end)} ms after "
                               f"the audio received; at most {self.s.max_buffer_s:g} s of audio may be buffered")
            self._buf = np.concatenate([self._buf, np.zeros(start - timeline_end, np.float32)])
        self.real_end = start + len(pcm) if len(pcm) else max(self.real_end, start)
        if len(pcm):
            self._buf = np.concatenate([self._buf, pcm])
            self._buf_real += len(pcm)
            self.counters.audio_samples_received += len(pcm)
            self._utterance_audio(start, start + len(pcm))
        self._wake.set()
        # Back-pressure: stop reading the client while too much audio waits; the feeder wakes us when it takes some.
        while len(self._buf) > self.s.max_buffer_s * self.s.sample_rate and self._fatal is None:
            self._room.clear()
            await self._room.wait()

    async def _interrupt(self) -> None:
        self.counters.interrupts += 1
        self.counters.audio_samples_discarded += self._buf_real
        for f in self.in_flight.values():
            f.discard = True
        self.clock_pos = max(self.clock_pos + len(self._buf), self.real_end)
        self._buf = np.zeros(0, np.float32)
        self._buf_real = 0
        self._room.set()
        self.force_idle = True
        self.interrupted_at = self.clock()
        # The output resumes at the end of the audio received, which may lie far ahead of the wall clock (a client
        # sending faster than real time): re-anchor the stream clock so that point is now, or idle video would stall
        # until the wall clock caught up with it.
        self.t0 = min(self.t0, self.interrupted_at - self.clock_pos / self.s.sample_rate)
        await self._put(self._status(pb.StatusEvent.KIND_INTERRUPTED, "interrupt", pts_ms=self._ms(self.clock_pos),
                                     block_index=self.next_block))
        cut, self.utterances = self.utterances, []  # none of their undelivered audio will be delivered
        for u in cut:
            await self._utterance_event(pb.StatusEvent.KIND_UTTERANCE_ENDED, u, interrupted=True)
        self._wake.set()

    @property
    def buffered_seconds(self) -> float:
        """Client audio waiting in the gateway, not yet fed to the pipeline."""
        return len(self._buf) / self.s.sample_rate

    def _due_at(self) -> float:
        """Clock time at which the next block's span is fully due on the wall clock (plus grace)."""
        end_s = (self.clock_pos + self.s.samples_per_block) / self.s.sample_rate
        return self.t0 + end_s + self.s.fill_grace_ms / 1000.0

    def _due(self) -> bool:
        """Is the next block's span fully due on the wall clock (plus grace)?"""
        return self.clock() >= self._due_at()

    def _idle_expired(self) -> bool:
        return bool(self.s.idle_timeout_s) and self.clock() - self.last_audio_at > self.s.idle_timeout_s

    async def _send_block(self, pcm: np.ndarray, real_samples: int) -> None:
        spb = self.s.samples_per_block
        rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if real_samples else 0.0
        is_idle = real_samples == 0 or is_idle_rms(rms)
        b = self.next_block
        pts = self._ms(self.clock_pos)
        self.in_flight[b] = _InFlight(pts_ms=pts, is_idle=is_idle, sent_at=self.clock(), start=self.clock_pos,
                                      anchor=self.anchor,
                                      pcm=pcm.copy() if self.s.return_audio else None)
        if self.first_sent_at is None:
            self.first_sent_at = self.clock()
        self.next_block += 1
        self.clock_pos += spb
        # Its deadline for the stages (unix ms: they run in other processes): the end of its audio span on the
        # stream's wall clock plus the lag after which a frame counts as late.
        audio_end_s = self.anchor + (self.clock_pos / self.s.sample_rate)  # clock_pos is this block's end now
        deadline_ms = round((time.time() + audio_end_s - self.clock() + self.s.behind_realtime_s) * 1000)
        await self.pipe.send(BlockItem(block_index=b, pts_ms=pts, tensors={"pcm": pcm.astype(np.float32)},
                                       metadata={"idle": "1" if is_idle else "0", DEADLINE_KEY: str(deadline_ms)}))

    async def _take_block(self, pad: bool) -> None:
        spb = self.s.samples_per_block
        take = self._buf[:spb]
        real = min(self._buf_real, len(take))
        if len(take) < spb:
            if not pad:
                return
            take = np.concatenate([take, np.zeros(spb - len(take), np.float32)])
        self._buf = self._buf[spb:]
        self._buf_real -= real
        self._room.set()
        await self._send_block(take, real)

    async def _feed(self) -> None:
        """Feed whole blocks to the pipeline, at most `max_in_flight` ahead of delivery.

        Every pass sends a block (at most `max_in_flight` passes in a row before the cap stops it), ends the input and
        returns, or sleeps (`_sleep`). The idle timeout fires once: it ends the input like END_OF_INPUT does (what is
        buffered is still fed), so a pass after it never sees it again.
        """
        spb = self.s.samples_per_block
        while True:
            # A cancelled feeder (the client went away) must not generate the rest of the buffered audio, even if a
            # library call of its last send dropped the cancel (serve/cancel_safe.py).
            if cancel_requested():
                raise asyncio.CancelledError()
            self._wake.clear()
            room = len(self.in_flight) < self.s.max_in_flight
            if room:
                if self.force_idle:
                    # After an INTERRUPT (which emptied the buffer), the output turns idle at once, unless new audio
                    # already arrived: it starts at the INTERRUPTED pts and is played, not overwritten with silence.
                    self.force_idle = False
                    if not len(self._buf):
                        self._forced_idle_span = (self.clock_pos, self.clock_pos + spb)
                        await self._send_block(np.zeros(spb, np.float32), 0)
                        continue
                if len(self._buf) >= spb:
                    await self._take_block(pad=False)
                    continue
                if self.end_of_input:
                    if len(self._buf):
                        await self._take_block(pad=True)
                    await self.pipe.end("end_of_input")
                    return
                if self.s.idle_mode == "fill" and self._due():
                    await self._take_block(pad=True)
                    continue
            if not self.end_of_input and self._idle_expired():
                self.end_reason = "idle_timeout"
                self.end_of_input = True
                if room:
                    continue  # the next pass feeds what is buffered and ends the input
                # At the cap: wait below for a block to be delivered, like any other end of input.
            await self._sleep(room)

    async def _sleep(self, room: bool) -> None:
        """Sleep until woken (`_wake`) or until the feeder's next deadline, whichever comes first.

        Deadlines: the next block falling due (fill mode, only with room under the cap: at the cap a delivered block
        wakes the feeder) and the idle timeout (until it fired or the input ended). Without either, only a wake-up.
        """
        deadlines = []
        if not self.end_of_input:
            if room and self.s.idle_mode == "fill":
                deadlines.append(self._due_at())
            if self.s.idle_timeout_s:
                deadlines.append(self.last_audio_at + self.s.idle_timeout_s)
        if not deadlines:
            await self._wake.wait()
            return
        timeout = max(min(deadlines) - self.clock(), _MIN_SLEEP_S)
        await wait_event(self._wake, timeout)

    async def _receive(self) -> None:
        while True:
            # A library call of the last delivery (its Redis write) may have dropped the cancel that stops this
            # task (serve/cancel_safe.py): a stopped receiver must not go on and queue events nobody reads any more.
            if cancel_requested():
                raise asyncio.CancelledError()
            item = await self.pipe.receive()
            if item is None:
                break
            if isinstance(item, ControlItem):
                continue  # e.g. the adaptive-sink latent on its way to the head: not for the client
            await self._deliver(item)
        for u in self.utterances:  # the input ended (idle timeout) with an utterance still open: all of it played
            u.closed = True
        await self._ended_utterances()
        code = self.end_reason
        await self._put(self._status(pb.StatusEvent.KIND_DRAINED, "every block of this stream's audio was delivered",
                                     pts_ms=self._ms(self.clock_pos), block_index=self.next_block, code=code))
        await self._put(self._status(pb.StatusEvent.KIND_END_OF_STREAM, END_MESSAGES.get(code, code),
                                     pts_ms=self._ms(self.clock_pos), block_index=self.next_block, code=code))
        await self._put(_Done())

    async def _deliver(self, item: BlockItem) -> None:
        b = item.block_index
        meta = self.in_flight.pop(b, None)
        if meta is None:
            raise ApiError(grpc.StatusCode.INTERNAL, f"pipeline returned block {b}, which was not in flight")
        self._wake.set()  # room under the cap: the feeder may send the next block while this one is delivered
        self.counters.blocks_generated += 1
        now = self.clock()
        received_ns = time.time_ns()
        if meta.discard:
            if self.on_block is not None:
                await self.on_block({"block_index": b, "is_idle": meta.is_idle, "latency_s": now - meta.sent_at,
                                     "pts_ms": meta.pts_ms, "wall_s": now - self.t0, "delivered": False,
                                     "frames": self.s.frames_per_block, "stamps": item.stamps,
                                     "received_ns": received_ns})
            return
        if self.ttff_s is None:
            self.ttff_s = now - (self.first_sent_at or now)
        if meta.is_idle and self.interrupted_at is not None:
            self.interrupt_to_idle_s.append(now - self.interrupted_at)
            self.interrupted_at = None
        if self.speaking is None or self.speaking == meta.is_idle:
            self.speaking = not meta.is_idle
            kind = pb.StatusEvent.KIND_SPEAKING if self.speaking else pb.StatusEvent.KIND_IDLE
            await self._put(self._status(kind, pts_ms=meta.pts_ms, block_index=b))
        chunk = pb.VideoChunk(block_index=self.s.block_base + b, pts_ms=meta.pts_ms, duration_ms=int(round(self.s.block_ms)),
                              is_idle=meta.is_idle, width=self.s.width, height=self.s.height,
                              num_frames=self.s.frames_per_block)
        frames = self.s.frames_per_block
        if "jpeg" in item.tensors:
            data = _as_bytes(item.tensors["jpeg"])
            sizes = _as_numpy(item.tensors["jpeg_sizes"]).tolist()
            off = 0
            for n in sizes:
                chunk.jpeg_frames.append(data[off:off + n])
                off += n
            frames = len(sizes)
        if "h264" in item.tensors:
            chunk.h264 = _as_bytes(item.tensors["h264"])
        if meta.pcm is not None:
            chunk.audio_pcm = np.clip(np.round(meta.pcm * 32768.0), -32768, 32767).astype("<i2").tobytes()
        self.counters.blocks_delivered += 1
        self.counters.frames_delivered += self.s.frames_per_block
        self.counters.idle_blocks_delivered += int(meta.is_idle)
        block_end = meta.start + self.s.samples_per_block
        for u in list(self.utterances):  # utterances whose first audio is in this chunk (the list may change at awaits)
            if not u.started and u.start < block_end:
                u.started = True
                await self._utterance_event(pb.StatusEvent.KIND_UTTERANCE_STARTED, u, upto=block_end)
        await self._put(pb.ServerMessage(video=chunk))
        self.delivered_end = max(self.delivered_end, block_end)
        await self._ended_utterances()
        done = self.clock()
        audio_end_s = (meta.pts_ms + self.s.block_ms) / 1000.0
        # delivery lag behind the audio span's end on the stream's wall clock, as anchored when the block's audio was
        # complete (later audio arriving late must not make this block look early)
        lag_s = done - (meta.anchor + audio_end_s)
        if lag_s > self.s.behind_realtime_s:
            await self._warn("behind_realtime", f"the video is {lag_s:.2f} s behind real time (block at pts "
                                                f"{meta.pts_ms} ms delivered {lag_s:.2f} s after its audio ended; "
                                                f"threshold {self.s.behind_realtime_s:g} s): generation is slower "
                                                "than real time", pts_ms=meta.pts_ms)
        if self.on_block is not None:
            await self.on_block({"block_index": b, "is_idle": meta.is_idle, "latency_s": now - meta.sent_at,
                                 "pts_ms": meta.pts_ms, "wall_s": now - self.t0, "delivered": True,
                                 "frames": frames, "stamps": item.stamps, "received_ns": received_ns,
                                 "lag_s": lag_s,
                                 # video shown (frames / fps) minus the audio span the chunk was made from
                                 "av_skew_s": frames / self.s.fps - self.s.block_ms / 1000.0})


def _as_numpy(t) -> np.ndarray:
    from avatarserve.serve.dataplane.transport import WireTensor

    return WireTensor.of(t).numpy()


def _as_bytes(t) -> bytes:
    return _as_numpy(t).tobytes()


def _api_error_for(exc: BaseException) -> ApiError:
    if isinstance(exc, PipelineError):
        return from_pipeline_error(exc)
    return ApiError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
