"""StreamController with real parts: an in-process chain of StageHosts (SyntheticStage handlers) on loopback gRPC.

The middle stage is the slow one, deterministically: it holds every block of a "gated" session until the test opens
the gate, so a session's blocks pile up to the in-flight cap and stay there for exactly as long as the test needs.

Everything shares one event loop, as sessions do in the gateway. A coroutine that loops without awaiting freezes that
loop, and then `asyncio.wait_for` cannot fire either (its timer needs the loop), so the tests run under
`LoopWatchdog`, which breaks a starved loop from a thread and lets the test fail with a message instead of hanging.
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
import threading
import time
import traceback
from typing import AsyncIterator, Callable, Optional

import numpy as np
import pytest

from avatarserve.serve.dataplane.stage_host import StageHost, StageHostConfig
from avatarserve.serve.api.errors import ApiError
from avatarserve.serve.api.grpc_service import MalformedMessage
from avatarserve.serve.api.stream_controller import Counters, StreamCancelled, StreamController, StreamSettings
from tests.support.synthetic import SyntheticStage
from avatarserve.serve.dataplane.transport import BlockItem, Item, PipelineClient, TransportOptions
from avatarserve_client.v1 import avatar_service_pb2 as pb

SR = 16000
SPB = 7680  # 480 ms blocks, as the shipped presets
CAP = 8
GUARD_S = 120.0  # whole-test guard: generous, these machines are slow and noisy
STALL_S = 20.0  # the event loop running no callback for this long is a failure, not noise


# ------------------------------------------------------------------------------------ harness


class EventLoopStalled(Exception):
    """Raised inside the event loop's thread by `LoopWatchdog` when the loop stopped running callbacks."""


class LoopWatchdog:
    """Fails a test whose event loop is starved, instead of letting it hang forever.

    A heartbeat task stamps the time every 50 ms; a thread watches the stamp. When no heartbeat ran for `stall_s`,
    some coroutine is running without ever suspending: the thread raises `EventLoopStalled` asynchronously in the
    loop's thread (CPython's PyThreadState_SetAsyncExc), which lands in the spinning code and unwinds it.
    """

    def __init__(self, stall_s: float = STALL_S) -> None:
        self.stall_s = stall_s
        self.stalled_s: Optional[float] = None  # how long the loop had not run when the watchdog broke it
        self.stalled_at = ""  # the loop thread's innermost frames at that moment (where it spun)
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._tid = 0
        self._task: Optional[asyncio.Task] = None
        self._thread: Optional[threading.Thread] = None

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(0.05)

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            quiet = time.monotonic() - self._beat
            if quiet > self.stall_s:
                frame = sys._current_frames().get(self._tid)
                self.stalled_at = "".join(traceback.format_stack(frame)[-2:]) if frame is not None else "?"
                self.stalled_s = quiet
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._tid),
                                                           ctypes.py_object(EventLoopStalled))
                return

    def check(self) -> None:
        assert self.stalled_s is None, (
            f"the event loop ran nothing for {self.stalled_s:.0f} s: a coroutine looped without awaiting "
            f"(the watchdog broke it with EventLoopStalled); it was at:\n{self.stalled_at}")

    async def __aenter__(self) -> "LoopWatchdog":
        self._tid = threading.get_ident()
        self._beat = time.monotonic()
        self._task = asyncio.create_task(self._heartbeat(), name="watchdog-heartbeat")
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None and self._task is not None
        self._thread.join()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class GatedStage(SyntheticStage):
    """The slow stage: holds every block of a gated session until `release(session_id)`; other sessions pass."""

    def __init__(self, name: str) -> None:
        super().__init__(0.0, name=name)
        self.gates: dict[str, asyncio.Event] = {}

    def gate(self, session_id: str) -> None:
        self.gates[session_id] = asyncio.Event()

    def release(self, session_id: str) -> None:
        self.gates[session_id].set()

    async def process(self, session_id: str, item: BlockItem) -> list[Item]:
        gate = self.gates.get(session_id)
        if gate is not None:
            await gate.wait()
        return await super().process(session_id, item)


@pytest.fixture
async def chain() -> AsyncIterator[tuple[list[str], GatedStage]]:
    """stage0 (instant) -> stage1 (gated, the slow one) -> stage2 (instant): route and the gated handler."""
    slow = GatedStage("stage1")
    handlers = [SyntheticStage(0.0, name="stage0"), slow, SyntheticStage(0.0, name="stage2")]
    hosts = []
    try:
        for h in handlers:
            transport = TransportOptions(queue_size=2, open_timeout_s=10.0)
            host = StageHost(h, StageHostConfig(name=h.name, transport=transport))
            await host.start()
            hosts.append(host)
        yield [h.address for h in hosts], slow
    finally:
        for host in reversed(hosts):
            await host.stop(grace_s=0.5)


def settings(**kw) -> StreamSettings:
    base = dict(sample_rate=SR, samples_per_block=SPB, frames_per_block=12, fps=25, width=64, height=64,
                max_in_flight=CAP)
    base.update(kw)
    return StreamSettings(**base)


def tone_chunks(n: int) -> list[bytes]:
    """n chunks of 480 ms of a 200 Hz tone, s16le."""
    t = np.arange(n * SPB) / SR
    pcm = (0.4 * np.sin(2 * np.pi * 200 * t) * 32767).astype("<i2")
    return [pcm[i * SPB:(i + 1) * SPB].tobytes() for i in range(n)]


def audio(seq: int, pcm: bytes) -> pb.ClientMessage:
    return pb.ClientMessage(audio=pb.AudioChunk(seq=seq, pts_ms=seq * 480, pcm=pcm))


END_OF_INPUT = pb.ClientMessage(control=pb.Control(kind=pb.Control.KIND_END_OF_INPUT))


async def requests(msgs: list[pb.ClientMessage],
                   then_wait: Optional[asyncio.Event] = None) -> AsyncIterator[pb.ClientMessage]:
    """The client's request stream: `msgs` at once, then (with `then_wait`) silence with the stream left open."""
    for m in msgs:
        yield m
    if then_wait is not None:
        await then_wait.wait()


async def collect(ctl: StreamController, reqs: AsyncIterator[pb.ClientMessage]) -> list[pb.ServerMessage]:
    return [m async for m in ctl.run(reqs)]


async def wait_until(cond: Callable[[], bool], watchdog: LoopWatchdog) -> None:
    """Wait for a state of the controllers (checked each loop turn); the test's guard bounds it."""
    while not cond():
        watchdog.check()
        await asyncio.sleep(0.01)
    watchdog.check()


def videos(msgs: list[pb.ServerMessage]) -> list[pb.VideoChunk]:
    return [m.video for m in msgs if m.WhichOneof("kind") == "video"]


def statuses(msgs: list[pb.ServerMessage]) -> list[pb.StatusEvent]:
    return [m.status for m in msgs if m.WhichOneof("kind") == "status"]


# ------------------------------------------------------------------------------------ tests


async def test_idle_timeout_at_the_cap_ends_the_stream_and_other_sessions_keep_flowing(chain) -> None:
    """A session reaching its idle timeout with CAP blocks in flight must not spin the loop (issue: the gateway froze
    in StreamController._feed). It ends with END_OF_STREAM `idle_timeout` once its blocks are delivered, and a second
    session on the same loop streams all the while."""
    route, slow = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:

        async def scenario() -> None:
            quiet = asyncio.Event()  # A's request stream stays open until the very end
            task_a: Optional[asyncio.Task] = None
            try:
                pipe_a = await client.open("sess-a", route)
                pipe_b = await client.open("sess-b", route)
                slow.gate("sess-a")
                # A: a burst of 12 blocks of audio, then silence with the stream open; idle timeout 1 s.
                ctl_a = StreamController("sess-a", settings(idle_timeout_s=1.0), pipe_a)
                task_a = asyncio.create_task(collect(ctl_a, requests(
                    [audio(i, c) for i, c in enumerate(tone_chunks(12))], then_wait=quiet)))
                # A is at the cap, past its idle deadline, and its feeder has seen the timeout.
                await wait_until(lambda: len(ctl_a.in_flight) == CAP and ctl_a.end_reason == "idle_timeout", watchdog)
                assert not task_a.done()

                # B streams a whole stream on the same loop (and the same chain) while A stays there.
                ctl_b = StreamController("sess-b", settings(idle_mode="wait"), pipe_b)
                msgs_b = await collect(ctl_b, requests([audio(i, c) for i, c in enumerate(tone_chunks(5))]
                                                       + [END_OF_INPUT]))
                watchdog.check()
                assert [v.block_index for v in videos(msgs_b)] == [0, 1, 2, 3, 4]
                assert [v.pts_ms for v in videos(msgs_b)] == [0, 480, 960, 1440, 1920]
                end_b = statuses(msgs_b)[-1]
                assert (end_b.kind, end_b.code) == (pb.StatusEvent.KIND_END_OF_STREAM, "end_of_input")
                assert end_b.message  # human-readable detail besides the code
                assert len(ctl_a.in_flight) == CAP and not task_a.done()  # A was at the cap all along

                # Open A's gate: its blocks in flight, then the rest of its buffered audio, are delivered, then it ends.
                slow.release("sess-a")
                msgs_a = await task_a
                watchdog.check()
                got = videos(msgs_a)
                assert [v.block_index for v in got] == list(range(ctl_a.next_block))
                assert len(got) >= 12 and ctl_a.counters.blocks_delivered == len(got)
                kinds = [(s.kind, s.code) for s in statuses(msgs_a)]
                assert kinds[-2:] == [(pb.StatusEvent.KIND_DRAINED, "idle_timeout"),
                                      (pb.StatusEvent.KIND_END_OF_STREAM, "idle_timeout")]
            finally:
                quiet.set()
                if slow.gates.get("sess-a") is not None:
                    slow.release("sess-a")
                if task_a is not None and not task_a.done():
                    task_a.cancel()
                if task_a is not None:
                    await asyncio.gather(task_a, return_exceptions=True)

        try:
            await asyncio.wait_for(scenario(), GUARD_S)
        except ApiError as exc:
            watchdog.check()
            raise AssertionError(f"a stream failed: {exc.code} {exc.message}") from exc
        watchdog.check()


@pytest.mark.parametrize("idle_mode", ["fill", "wait"])
async def test_idle_timeout_with_nothing_in_flight(chain, idle_mode: str) -> None:
    """A client that never sends audio: idle blocks (fill mode) until the idle timeout, then END_OF_STREAM."""
    route, _ = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:

        async def scenario() -> list[pb.ServerMessage]:
            quiet = asyncio.Event()
            try:
                pipe = await client.open(f"sess-idle-{idle_mode}", route)
                ctl = StreamController(f"sess-idle-{idle_mode}", settings(idle_mode=idle_mode, idle_timeout_s=1.0,
                                                                          fill_grace_ms=50), pipe)
                return await collect(ctl, requests([], then_wait=quiet))
            finally:
                quiet.set()

        msgs = await asyncio.wait_for(scenario(), GUARD_S)
        watchdog.check()
    got = videos(msgs)
    assert all(v.is_idle for v in got)
    assert [v.pts_ms for v in got] == [480 * i for i in range(len(got))]
    if idle_mode == "wait":
        assert got == []
    end = statuses(msgs)[-1]
    assert (end.kind, end.code) == (pb.StatusEvent.KIND_END_OF_STREAM, "idle_timeout")


async def test_back_pressure_stalls_reading_and_releases(chain) -> None:
    """More audio than `max_buffer_s` while the pipeline is stalled: the controller stops reading the client, then
    resumes as the feeder takes audio out of the buffer, and every block comes out in order."""
    route, slow = chain
    n = 10
    async with LoopWatchdog() as watchdog, PipelineClient() as client:

        async def scenario() -> tuple[StreamController, list[pb.ServerMessage]]:
            try:
                pipe = await client.open("sess-bp", route)
                slow.gate("sess-bp")
                ctl = StreamController("sess-bp", settings(idle_mode="wait", max_buffer_s=1.0, max_in_flight=2), pipe)
                task = asyncio.create_task(collect(ctl, requests([audio(i, c) for i, c in enumerate(tone_chunks(n))]
                                                                 + [END_OF_INPUT])))
                # Stalled: the cap is reached, the buffer is over its bound and the reader stopped reading.
                await wait_until(lambda: len(ctl.in_flight) == 2 and ctl.buffered_seconds > 1.0, watchdog)
                assert ctl.counters.audio_chunks_received < n and not task.done()
                slow.release("sess-bp")
                return ctl, await task
            finally:
                if slow.gates.get("sess-bp") is not None:
                    slow.release("sess-bp")

        ctl, msgs = await asyncio.wait_for(scenario(), GUARD_S)
        watchdog.check()
    assert [v.block_index for v in videos(msgs)] == list(range(n))
    assert not any(v.is_idle for v in videos(msgs))
    assert ctl.counters.audio_chunks_received == n and ctl.counters.audio_samples_late == 0
    end = statuses(msgs)[-1]
    assert (end.kind, end.code) == (pb.StatusEvent.KIND_END_OF_STREAM, "end_of_input")


END_OF_UTTERANCE = pb.ClientMessage(control=pb.Control(kind=pb.Control.KIND_END_OF_UTTERANCE))
INTERRUPT = pb.ClientMessage(control=pb.Control(kind=pb.Control.KIND_INTERRUPT))


def timeline(msgs: list[pb.ServerMessage]) -> list[tuple]:
    """Video chunks and utterance events in delivery order: ("video", block) / ("started"|"ended", index)."""
    out = []
    for m in msgs:
        if m.WhichOneof("kind") == "video":
            out.append(("video", m.video.block_index))
        elif m.status.kind == pb.StatusEvent.KIND_UTTERANCE_STARTED:
            out.append(("started", m.status.utterance.index))
        elif m.status.kind == pb.StatusEvent.KIND_UTTERANCE_ENDED:
            out.append(("ended", m.status.utterance.index))
    return out


def utterance_events(msgs: list[pb.ServerMessage], kind: int) -> list[pb.UtteranceProgress]:
    return [s.utterance for s in statuses(msgs) if s.kind == kind]


class LiveStream:
    """A controller run on a request stream that the test writes into as it goes; replies collect in `out`."""

    def __init__(self, ctl: StreamController) -> None:
        self.ctl = ctl
        self.out: list[pb.ServerMessage] = []
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._reader: Optional[asyncio.Task] = None

    async def _requests(self) -> AsyncIterator[pb.ClientMessage]:
        while (m := await self._inbox.get()) is not None:
            yield m

    async def _read(self) -> None:
        async for m in self.ctl.run(self._requests()):
            self.out.append(m)

    async def send(self, *msgs: pb.ClientMessage) -> None:
        for m in msgs:
            await self._inbox.put(m)

    async def finish(self) -> None:
        """END_OF_INPUT, close the request stream, wait for the controller to end."""
        await self.send(END_OF_INPUT)
        await self._inbox.put(None)
        await asyncio.wait_for(self._reader, GUARD_S)

    async def __aenter__(self) -> "LiveStream":
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


async def test_block_audio_is_returned_and_utterances_are_reported_in_delivery_order(chain) -> None:
    """return_audio: each chunk carries exactly its span of the client's audio (zeros where none came). Two
    utterances, 1200 ms and 720 ms, sent back to back: each is STARTED right before the chunk holding its first audio
    and ENDED right after the chunk holding its last, with its duration and played time."""
    route, _ = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-utt", route)
        t = np.arange(4 * SPB) / SR
        pcm = (0.4 * np.sin(2 * np.pi * 200 * t) * 32767).astype("<i2")
        half = SPB // 2  # 240 ms chunks: 5 for the first utterance (1200 ms), 3 for the second (720 ms)
        chunk = [pb.ClientMessage(audio=pb.AudioChunk(seq=i, pts_ms=240 * i, pcm=pcm[i * half:(i + 1) * half].tobytes()))
                 for i in range(8)]
        msgs = [*chunk[:5], END_OF_UTTERANCE, *chunk[5:], END_OF_INPUT]
        ctl = StreamController("sess-utt", settings(idle_mode="wait", return_audio=True), pipe)
        out = await asyncio.wait_for(collect(ctl, requests(msgs)), GUARD_S)
        watchdog.check()
    got = videos(out)
    assert [v.block_index for v in got] == [0, 1, 2, 3]
    assert b"".join(v.audio_pcm for v in got) == pcm.tobytes()  # bit-exact, span by span
    assert all(len(v.audio_pcm) == 2 * SPB for v in got)
    assert timeline(out) == [("started", 0), ("video", 0), ("video", 1), ("started", 1), ("video", 2), ("ended", 0),
                             ("video", 3), ("ended", 1)]
    started = utterance_events(out, pb.StatusEvent.KIND_UTTERANCE_STARTED)
    ended = utterance_events(out, pb.StatusEvent.KIND_UTTERANCE_ENDED)
    assert [(u.start_pts_ms, u.played_ms) for u in started] == [(0, 480), (1200, 240)]
    assert [(u.start_pts_ms, u.duration_ms, u.played_ms, u.interrupted) for u in ended] == \
        [(0, 1200, 1200, False), (1200, 720, 720, False)]


async def test_an_interrupt_ends_every_undelivered_utterance_with_what_was_played(chain) -> None:
    """Utterance 0 has one block delivered, then its next blocks (and a queued utterance 1) are held in the slow
    stage: INTERRUPT ends both right after INTERRUPTED, 0 with played 480 ms of 1440, 1 never started (played 0).
    Audio after the INTERRUPT starts utterance 2. Without return_audio no chunk carries audio."""
    route, slow = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-int", route)
        ctl = StreamController("sess-int", settings(idle_mode="wait"), pipe)
        chunks = tone_chunks(5)
        async with LiveStream(ctl) as live:
            out = live.out
            try:
                await live.send(audio(0, chunks[0]))
                await wait_until(lambda: any(m.WhichOneof("kind") == "video" for m in out), watchdog)
                slow.gate("sess-int")
                await live.send(audio(1, chunks[1]), audio(2, chunks[2]), END_OF_UTTERANCE, audio(3, chunks[3]))
                await wait_until(lambda: ctl.next_block == 4, watchdog)  # blocks 1-3 held in the slow stage
                await live.send(INTERRUPT)
                await wait_until(lambda: len(utterance_events(out, pb.StatusEvent.KIND_UTTERANCE_ENDED)) == 2,
                                 watchdog)
                slow.release("sess-int")
                # The output resumes with an idle block at the INTERRUPTED pts (1920 ms); new audio follows it.
                await wait_until(lambda: ctl.next_block == 5, watchdog)
                await live.send(pb.ClientMessage(audio=pb.AudioChunk(seq=4, pts_ms=2400, pcm=chunks[4])))
                await live.finish()
            finally:
                if "sess-int" in slow.gates:
                    slow.release("sess-int")
        watchdog.check()
    kinds = [s.kind for s in statuses(out)]
    at = kinds.index(pb.StatusEvent.KIND_INTERRUPTED)
    assert kinds[at + 1: at + 3] == [pb.StatusEvent.KIND_UTTERANCE_ENDED] * 2
    ended = utterance_events(out, pb.StatusEvent.KIND_UTTERANCE_ENDED)
    assert [(u.index, u.duration_ms, u.played_ms, u.interrupted) for u in ended[:2]] == \
        [(0, 1440, 480, True), (1, 480, 0, True)]
    # After the INTERRUPT: the held blocks are not delivered; the new audio is utterance 2, played out in full.
    assert timeline(out)[-6:] == [("ended", 0), ("ended", 1), ("video", 4), ("started", 2), ("video", 5),
                                  ("ended", 2)]
    assert [v.block_index for v in videos(out)] == [0, 4, 5]
    assert (ended[2].index, ended[2].duration_ms, ended[2].played_ms, ended[2].interrupted) == (2, 480, 480, False)
    assert all(not v.audio_pcm for v in videos(out))


async def test_audio_sent_right_after_an_interrupt_is_played_not_overwritten(chain) -> None:
    """New audio at the INTERRUPTED pts that reaches the gateway before the feeder turned the output idle is played
    from that pts (it used to be cleared with the interrupted audio, counted as received and never played)."""
    route, slow = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-int2", route)
        ctl = StreamController("sess-int2", settings(idle_mode="wait", max_in_flight=1), pipe)
        slow.gate("sess-int2")
        chunks = tone_chunks(3)
        async with LiveStream(ctl) as live:
            out = live.out
            try:
                await live.send(audio(0, chunks[0]), audio(1, chunks[1]))
                await wait_until(lambda: ctl.next_block == 1, watchdog)  # block 0 held; the cap of 1 keeps block 1 out
                # INTERRUPT and new audio at its pts (the end of the audio received) arrive together, while the
                # feeder is still at the cap and cannot turn the output idle yet.
                await live.send(INTERRUPT, pb.ClientMessage(audio=pb.AudioChunk(seq=2, pts_ms=960, pcm=chunks[2])))
                await wait_until(lambda: ctl.real_end == 3 * SPB, watchdog)
                slow.release("sess-int2")
                await live.finish()
            finally:
                if "sess-int2" in slow.gates:
                    slow.release("sess-int2")
        watchdog.check()
    interrupted = [s for s in statuses(out) if s.kind == pb.StatusEvent.KIND_INTERRUPTED][0]
    got = videos(out)
    assert interrupted.pts_ms == 960 and [(v.pts_ms, v.is_idle) for v in got] == [(960, False)]
    assert ctl.counters.audio_samples_received == 3 * SPB and ctl.counters.audio_samples_discarded == SPB


async def test_after_an_interrupt_new_audio_follows_the_idle_block_and_idle_video_does_not_stall(chain) -> None:
    """A client far ahead of real time (TTS) interrupts: the output resumes at the end of the audio received, now,
    not when the wall clock reaches that point (the idle block is due within one block); audio stamped at the
    INTERRUPTED pts, arriving after the idle block went out, follows that block instead of being dropped as late."""
    route, slow = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-int3", route)
        ctl = StreamController("sess-int3", settings(idle_mode="fill", fill_grace_ms=100), pipe)
        chunks = tone_chunks(12)
        async with LiveStream(ctl) as live:
            out = live.out
            await live.send(*(audio(i, chunks[i]) for i in range(10)))  # 4.8 s of speech at once
            await wait_until(lambda: ctl.real_end == 10 * SPB, watchdog)
            await live.send(INTERRUPT)
            await wait_until(lambda: ctl._forced_idle_span is not None, watchdog)  # the idle block went out
            resume = [s for s in statuses(out) if s.kind == pb.StatusEvent.KIND_INTERRUPTED][0].pts_ms
            assert resume == 4800
            # Re-anchored: the block after the idle one is due one block (+ grace) from now, not ~4.8 s later.
            assert ctl._due_at() - ctl.clock() <= 2 * SPB / SR + 0.1
            # The client goes on with its own clock: two chunks, contiguous from the INTERRUPTED pts.
            await live.send(pb.ClientMessage(audio=pb.AudioChunk(seq=10, pts_ms=resume, pcm=chunks[10])),
                            pb.ClientMessage(audio=pb.AudioChunk(seq=11, pts_ms=resume + 480, pcm=chunks[11])))
            await wait_until(lambda: ctl.real_end > 12 * SPB, watchdog)
            await live.finish()
        watchdog.check()
    after = [(v.pts_ms, v.is_idle) for v in videos(out) if v.pts_ms >= 4800]
    assert after[:3] == [(4800, True), (5280, False), (5760, False)]
    assert ctl.counters.audio_samples_late == 0 and ctl.counters.audio_samples_received == 12 * SPB


# ------------------------------------------------------------------------------------ contract fields (codes, totals)


class CancellableRequests:
    """A request stream like Serve's gRPCInputStream: it ends when the client cancels, and `is_cancelled()` says so."""

    def __init__(self, msgs: list[pb.ClientMessage]) -> None:
        self._msgs = list(msgs)
        self._cancel = asyncio.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def is_cancelled(self) -> bool:
        return self._cancel.is_set()

    def __aiter__(self) -> "CancellableRequests":
        return self

    async def __anext__(self) -> pb.ClientMessage:
        if self._msgs:
            return self._msgs.pop(0)
        await self._cancel.wait()
        raise StopAsyncIteration


async def test_block_index_continues_the_session_and_events_carry_session_totals(chain) -> None:
    """A second stream of a session: VideoChunk/StatusEvent block indices continue from `block_base` (the pipe still
    numbers from 0), and every event's counters are the session's totals (earlier streams + this one)."""
    route, _ = chain
    base = Counters(audio_samples_received=3 * SPB, audio_chunks_received=3, audio_samples_late=5,
                    audio_samples_discarded=7, blocks_generated=4, blocks_delivered=3, idle_blocks_delivered=1,
                    frames_delivered=36, interrupts=1, streams_opened=1)
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-base", route)
        ctl = StreamController("sess-base", settings(idle_mode="wait", block_base=4), pipe, base=base)
        out = await asyncio.wait_for(collect(ctl, requests([audio(i, c) for i, c in enumerate(tone_chunks(2))]
                                                           + [END_OF_INPUT])), GUARD_S)
        watchdog.check()
    st = statuses(out)
    assert st[0].kind == pb.StatusEvent.KIND_STARTED and st[0].block_index == 4
    assert st[0].counters.streams_opened == 2 and st[0].counters.blocks_delivered == 3
    assert [v.block_index for v in videos(out)] == [4, 5]
    assert ctl.next_block == 2 and ctl.next_session_block == 6
    end = st[-1]
    assert (end.kind, end.code, end.block_index) == (pb.StatusEvent.KIND_END_OF_STREAM, "end_of_input", 6)
    drained = st[-2]
    assert (drained.kind, drained.code) == (pb.StatusEvent.KIND_DRAINED, "end_of_input")
    assert end.counters == pb.SessionCounters(
        audio_samples_received=5 * SPB, audio_chunks_received=5, audio_samples_late=5, audio_samples_discarded=7,
        blocks_generated=6, blocks_delivered=5, idle_blocks_delivered=1, frames_delivered=60, interrupts=1,
        streams_opened=2)
    assert ctl.counters.streams_opened == 1 and ctl.counters.blocks_delivered == 2  # this stream's own
    assert ctl.last_audio_wall_ms > 0


async def test_request_end_ends_the_stream_at_once_with_its_code(chain) -> None:
    """CloseSession / the idle sweep: blocks held in the pipeline are not waited for; END_OF_STREAM carries the code
    (no DRAINED: not every block was delivered) and the run ends."""
    route, slow = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-close", route)
        slow.gate("sess-close")
        try:
            ctl = StreamController("sess-close", settings(idle_mode="wait"), pipe)
            async with LiveStream(ctl) as live:
                await live.send(*(audio(i, c) for i, c in enumerate(tone_chunks(3))))
                await wait_until(lambda: ctl.next_block == 3, watchdog)  # all three held in the slow stage
                ctl.request_end("closed")
                ctl.request_end("idle_timeout")  # the first code wins
                await asyncio.wait_for(live._reader, GUARD_S)
                out = live.out
        finally:
            slow.release("sess-close")
        watchdog.check()
    st = statuses(out)
    assert (st[-1].kind, st[-1].code) == (pb.StatusEvent.KIND_END_OF_STREAM, "closed")
    assert "CloseSession" in st[-1].message
    assert pb.StatusEvent.KIND_DRAINED not in [s.kind for s in st]
    assert videos(out) == [] and ctl.end_reason == "closed"


async def test_a_cancelled_client_ends_the_stream_without_draining(chain) -> None:
    """The client cancels (Serve ends the request stream and flags it cancelled): the controller raises
    StreamCancelled at once instead of generating everything still buffered and in flight."""
    route, slow = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-cancel", route)
        slow.gate("sess-cancel")
        try:
            ctl = StreamController("sess-cancel", settings(idle_mode="wait"), pipe)
            reqs = CancellableRequests([audio(i, c) for i, c in enumerate(tone_chunks(4))])
            task = asyncio.create_task(collect(ctl, reqs))
            await wait_until(lambda: ctl.next_block == 4, watchdog)
            reqs.cancel()  # the gated blocks are never released before the run ends
            with pytest.raises(StreamCancelled):
                await asyncio.wait_for(task, GUARD_S)
        finally:
            slow.release("sess-cancel")
        watchdog.check()


async def test_a_malformed_client_message_is_invalid_argument(chain) -> None:
    route, _ = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-bad", route)
        ctl = StreamController("sess-bad", settings(), pipe)
        bad = MalformedMessage("avatarserve.v1.ClientMessage", "Error parsing message", 7)
        with pytest.raises(ApiError) as err:
            await asyncio.wait_for(collect(ctl, requests([bad])), GUARD_S)  # type: ignore[list-item]
        watchdog.check()
    assert err.value.code.name == "INVALID_ARGUMENT" and "do not parse as avatarserve.v1.ClientMessage" in err.value.message


async def test_late_audio_is_dropped_with_one_rate_limited_warning(chain) -> None:
    """Fill mode: the first blocks are filled with silence while the client is silent; audio sent afterwards for
    those spans is dropped, counted in audio_samples_late and reported by ONE WARNING `audio_late` per interval,
    whose message says how much was dropped."""
    route, _ = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-late", route)
        ctl = StreamController("sess-late", settings(idle_mode="fill", fill_grace_ms=0, warning_interval_s=600.0),
                               pipe)
        chunks = tone_chunks(2)
        async with LiveStream(ctl) as live:
            await wait_until(lambda: ctl.next_block >= 2, watchdog)  # [0, 960) ms filled with silence
            await live.send(audio(0, chunks[0]), audio(1, chunks[1]))  # both entirely late
            await wait_until(lambda: ctl.counters.audio_chunks_received == 2, watchdog)
            await live.finish()
        watchdog.check()
    warnings = [s for s in statuses(live.out) if s.kind == pb.StatusEvent.KIND_WARNING]
    assert [w.code for w in warnings] == ["audio_late"]
    assert "dropped 480 ms" in warnings[0].message and warnings[0].pts_ms == 0
    assert ctl.counters.audio_samples_late == 2 * SPB and ctl.counters.audio_samples_received == 0
    assert statuses(live.out)[-1].counters.audio_samples_late == 2 * SPB


async def test_a_block_delivered_behind_real_time_gets_a_warning(chain) -> None:
    """A block held in the pipeline until well after its audio ended: WARNING `behind_realtime` saying by how much,
    once per interval however many blocks are late."""
    route, slow = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-behind", route)
        slow.gate("sess-behind")
        try:
            ctl = StreamController("sess-behind", settings(idle_mode="wait", behind_realtime_s=0.2,
                                                           warning_interval_s=600.0), pipe)
            async with LiveStream(ctl) as live:
                await live.send(*(audio(i, c) for i, c in enumerate(tone_chunks(2))))
                await wait_until(lambda: ctl.next_block == 2, watchdog)
                # block 1's audio ends at 0.96 s on the stream clock: hold both blocks until it is 0.3 s past that
                await wait_until(lambda: ctl.clock() > ctl.anchor + 0.96 + 0.3, watchdog)
                slow.release("sess-behind")
                await live.finish()
        finally:
            if not slow.gates["sess-behind"].is_set():
                slow.release("sess-behind")
        watchdog.check()
    warnings = [s for s in statuses(live.out) if s.kind == pb.StatusEvent.KIND_WARNING]
    assert [w.code for w in warnings] == ["behind_realtime"]
    assert "behind real time" in warnings[0].message and "threshold 0.2 s" in warnings[0].message


async def test_the_idle_timeout_counts_the_silence_before_the_stream(chain) -> None:
    """A session already silent for its whole idle timeout when the stream opens (`idle_since_s`): the stream ends
    with `idle_timeout` at once instead of granting a fresh timeout."""
    route, _ = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-since", route)
        ctl = StreamController("sess-since", settings(idle_mode="wait", idle_timeout_s=60.0, idle_since_s=60.0), pipe)
        quiet = asyncio.Event()
        started = time.monotonic()
        try:
            out = await asyncio.wait_for(collect(ctl, requests([], then_wait=quiet)), GUARD_S)
        finally:
            quiet.set()
        watchdog.check()
    assert time.monotonic() - started < 30.0  # not the 60 s a fresh timeout would take
    assert (statuses(out)[-1].kind, statuses(out)[-1].code) == (pb.StatusEvent.KIND_END_OF_STREAM, "idle_timeout")


def _freed_on_cancel():
    """An `on_cancel` for a StreamController and the event it sets (where the gateway would free the session)."""
    freed = asyncio.Event()

    async def on_cancel() -> None:
        freed.set()

    return freed, on_cancel


async def test_a_cancel_frees_the_session_even_when_nobody_reads_the_stream_any_more(chain) -> None:
    """Serve may drop the call's generator without unwinding it: the reader still sees the cancel and awaits
    `on_cancel` (the gateway frees the session there) although the output queue is full and nobody reads it."""
    route, _ = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-gone", route)
        freed, on_cancel = _freed_on_cancel()

        ctl = StreamController("sess-gone", settings(idle_mode="wait"), pipe, on_cancel=on_cancel)
        reqs = CancellableRequests([audio(i, c) for i, c in enumerate(tone_chunks(8))])
        gen = ctl.run(reqs)
        first = await asyncio.wait_for(gen.__anext__(), GUARD_S)  # STARTED (the stream's tasks start on the next)
        assert first.status.kind == pb.StatusEvent.KIND_STARTED
        await asyncio.wait_for(gen.__anext__(), GUARD_S)  # then the consumer stops reading
        await asyncio.wait_for(wait_until(lambda: ctl.out_q.full(), watchdog), GUARD_S)
        reqs.cancel()
        await asyncio.wait_for(freed.wait(), GUARD_S)
        assert ctl.cancelled
        with pytest.raises(StreamCancelled):  # a consumer that comes back gets the cancel, not stale blocks
            await asyncio.wait_for(gen.__anext__(), GUARD_S)
        watchdog.check()


async def test_a_request_stream_that_breaks_is_a_cancelled_client(chain) -> None:
    """Under Serve, fetching the client's next message is a Ray call that Ray cancels (TaskCancelledError) when the
    client cancels: the stream ends as cancelled and frees the session (`on_cancel`), it is not a server error (which
    would mark the session FAILED)."""
    route, _ = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-broken", route)
        freed, on_cancel = _freed_on_cancel()

        class TaskCancelledLike(Exception):
            pass

        async def breaking_requests():
            yield audio(0, tone_chunks(1)[0])
            raise TaskCancelledLike("Task: 4f75c05 was cancelled.")

        ctl = StreamController("sess-broken", settings(idle_mode="wait"), pipe, on_cancel=on_cancel)
        with pytest.raises(StreamCancelled):
            await asyncio.wait_for(collect(ctl, breaking_requests()), GUARD_S)
        assert freed.is_set() and ctl.cancelled
        watchdog.check()


async def test_wait_event_never_swallows_a_cancel() -> None:
    """The feeder sleeps on its wake-up event with a deadline. A cancel that arrives while the event is being set
    must still end the sleeper (asyncio.wait_for before Python 3.12 returns instead: the stream's feeder then
    outlived the cancel and its session kept the stream lock)."""
    from avatarserve_client._streaming import wait_event

    for order in ("set, then cancel", "cancel, then set"):
        ev = asyncio.Event()
        sleeper = asyncio.ensure_future(wait_event(ev, 60.0))
        await asyncio.sleep(0)  # the sleeper waits on the event now
        if order == "set, then cancel":
            ev.set()
            sleeper.cancel()
        else:
            sleeper.cancel()
            ev.set()
        with pytest.raises(asyncio.CancelledError):
            await sleeper
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    ev.set()
    assert await wait_event(ev, 60.0) is True


async def test_an_idle_timeout_request_drains_like_end_of_input(chain) -> None:
    """The idle sweep's close request (`idle_timeout`) ends the input: what was received is still delivered, then
    DRAINED and END_OF_STREAM `idle_timeout` (CloseSession's `closed` ends at once instead)."""
    route, slow = chain
    async with LoopWatchdog() as watchdog, PipelineClient() as client:
        pipe = await client.open("sess-drain", route)
        slow.gate("sess-drain")
        try:
            ctl = StreamController("sess-drain", settings(idle_mode="wait"), pipe)
            async with LiveStream(ctl) as live:
                await live.send(*(audio(i, c) for i, c in enumerate(tone_chunks(3))))
                await wait_until(lambda: ctl.next_block == 3, watchdog)
                ctl.request_end("idle_timeout", drain=True)
                ctl.request_end("closed")  # ignored: the first request wins
                slow.release("sess-drain")
                await asyncio.wait_for(live._reader, GUARD_S)
                out = live.out
        finally:
            if not slow.gates["sess-drain"].is_set():
                slow.release("sess-drain")
        watchdog.check()
    assert [v.block_index for v in videos(out)] == [0, 1, 2]
    assert [(s.kind, s.code) for s in statuses(out)][-2:] == [(pb.StatusEvent.KIND_DRAINED, "idle_timeout"),
                                                             (pb.StatusEvent.KIND_END_OF_STREAM, "idle_timeout")]
