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
from avatarserve.serve.api.stream_controller import StreamController, StreamSettings
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
                assert (end_b.kind, end_b.message) == (pb.StatusEvent.KIND_END_OF_STREAM, "end_of_input")
                assert len(ctl_a.in_flight) == CAP and not task_a.done()  # A was at the cap all along

                # Open A's gate: its blocks in flight, then the rest of its buffered audio, are delivered, then it ends.
                slow.release("sess-a")
                msgs_a = await task_a
                watchdog.check()
                got = videos(msgs_a)
                assert [v.block_index for v in got] == list(range(ctl_a.next_block))
                assert len(got) >= 12 and ctl_a.counters.blocks_delivered == len(got)
                kinds = [(s.kind, s.message) for s in statuses(msgs_a)]
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
    assert (end.kind, end.message) == (pb.StatusEvent.KIND_END_OF_STREAM, "idle_timeout")


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
    assert (end.kind, end.message) == (pb.StatusEvent.KIND_END_OF_STREAM, "end_of_input")


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
