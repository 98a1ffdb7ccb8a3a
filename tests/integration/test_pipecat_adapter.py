"""AvatarServeVideoService in Pipecat's own test harness (`pipecat.tests.utils.run_test`) against the real local
cluster (tiny model).

Frames go in as a TTS service sends them (TTSStartedFrame, TTSAudioRawFrame chunks, TTSStoppedFrame); what the
service pushes downstream is checked: video frames of the session's size every 40 ms of stream time, the avatar's
audio equal to the audio that went in (speech blocks) and silence (idle blocks), the TTS markers in step with the
avatar, an interruption in the middle of an utterance, idle video after it, and the session's teardown on the
server. Timing comes from events (the service's utterance events, frames it pushed), never from sleeps: a `Gate`
holds the interruption / end / cancel frame until the pipeline has reached the state the test needs.
"""

from __future__ import annotations

import asyncio
import collections
import json

import numpy as np
import pytest

# pipecat-ai comes with the test extra (avatarserve-client[pipecat]): a missing install fails here, it is not skipped.
from pipecat.frames.frames import (CancelFrame, EndFrame, ErrorFrame, Frame, InterruptionFrame, OutputAudioRawFrame,
                                   OutputImageRawFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import run_test

from avatarserve_client import AsyncAvatarClient, SessionNotFound, SessionState
from avatarserve_client.pipecat import AvatarServeVideoService

from .conftest import APP, png

pytestmark = pytest.mark.integration

SR = 16000
CHUNK = 320  # 20 ms TTS chunks
# Generous, named bounds: on a busy 2-core machine the cluster can be slow; they only stop a hung test.
EVENT_TIMEOUT_S = 240.0
SETUP_TIMEOUT_S = 240.0
RUN_TIMEOUT_S = 540.0


def speech(seconds: float, seed: int) -> np.ndarray:
    """Loud noise without a single zero sample: the avatar's audio is checked sample by sample against it."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR) // CHUNK * CHUNK
    return (rng.integers(500, 8000, n) * rng.choice([-1, 1], n)).astype(np.int16)


def tts_chunks(pcm: np.ndarray, context_id: str, *, rate: int = SR, channels: int = 1) -> list[TTSAudioRawFrame]:
    step = CHUNK * rate // SR * channels
    return [TTSAudioRawFrame(audio=pcm[i:i + step].tobytes(), sample_rate=rate, num_channels=channels,
                             context_id=context_id) for i in range(0, len(pcm), step)]


class Gate(FrameProcessor):
    """Holds chosen frames until an event is set. Direct mode: what comes behind a held frame waits too."""

    def __init__(self) -> None:
        super().__init__(enable_direct_mode=True)
        self._holds: dict[int, tuple[str, asyncio.Event]] = {}
        self.timed_out: list[str] = []

    def hold(self, frame: Frame, until: asyncio.Event, what: str) -> Frame:
        self._holds[frame.id] = (what, until)
        return frame

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        held = self._holds.pop(frame.id, None)
        if held is not None:
            what, until = held
            try:
                await asyncio.wait_for(until.wait(), EVENT_TIMEOUT_S)
            except asyncio.TimeoutError:
                self.timed_out.append(what)  # let it through: the test fails on this, it does not hang
        await self.push_frame(frame, direction)


class Watch(BaseObserver):
    """Follows what the service pushes downstream and sets the events the gate waits for."""

    def __init__(self, service: AvatarServeVideoService, interrupt_utterance: int = 2) -> None:
        super().__init__()
        self.service = service
        self.utterance_started: dict[int, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self.utterance_ended: dict[int, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self.started, self.ended = [], []
        self.speech_images_since: dict[int, int] = collections.Counter()  # utterance index -> speech images since
        self.interrupted = False
        self.idle_images_after_interrupt = 0
        self.speech_playing = asyncio.Event()  # a block of the utterance to interrupt was shown
        self.idle_after_interrupt = asyncio.Event()  # a block of idle video after the interruption
        self.interrupt_utterance = interrupt_utterance

        self.handle = None  # the session's handle, taken while the service holds it

        @service.event_handler("on_utterance_started")
        async def _started(svc, progress):
            self.handle = self.handle or svc.session_handle
            self.started.append(progress)
            self.utterance_started[progress.index].set()

        @service.event_handler("on_utterance_ended")
        async def _ended(svc, progress):
            self.ended.append(progress)
            self.utterance_ended[progress.index].set()

    async def on_push_frame(self, data: FramePushed) -> None:
        if data.source is not self.service or data.direction is not FrameDirection.DOWNSTREAM:
            return
        frame = data.frame
        if isinstance(frame, InterruptionFrame):
            self.interrupted = True
        elif isinstance(frame, OutputImageRawFrame):
            idle = frame.metadata["avatarserve"]["is_idle"]
            if self.interrupted:
                self.idle_images_after_interrupt += int(idle)
                if self.idle_images_after_interrupt >= 12:
                    self.idle_after_interrupt.set()
            elif not idle and self.utterance_started[self.interrupt_utterance].is_set():
                self.speech_images_since[self.interrupt_utterance] += 1
                if self.speech_images_since[self.interrupt_utterance] >= 24:
                    self.speech_playing.set()


def counts(frames) -> dict[str, int]:
    return dict(collections.Counter(type(f).__name__ for f in frames))


def service_for(cluster: str, **kwargs) -> AvatarServeVideoService:
    return AvatarServeVideoService(address=cluster, image=png(11), application=APP, seed=3, fill_grace_ms=50,
                                   rpc_timeout_s=SETUP_TIMEOUT_S, **kwargs)


async def session_state(cluster: str, handle) -> SessionState:
    """The session's state on the server; a closed session may already be forgotten (NOT_FOUND): CLOSED too."""
    async with AsyncAvatarClient(cluster, application=APP, timeout=60) as client:
        try:
            return (await client.get_session(handle)).state
        except SessionNotFound:
            return SessionState.CLOSED


async def test_utterances_interrupt_and_drain(cluster):
    service = service_for(cluster)
    watch = Watch(service)
    gate = Gate()
    utterances = [speech(1.0, 1), speech(0.8, 2), speech(6.0, 3)]
    frames = [
        TTSStartedFrame(context_id="a"), *tts_chunks(utterances[0], "a"), TTSStoppedFrame(context_id="a"),
        TTSStartedFrame(context_id="b"), *tts_chunks(utterances[1], "b"), TTSStoppedFrame(context_id="b"),
        TTSStartedFrame(context_id="c"), *tts_chunks(utterances[2], "c"),
        # mid-utterance: once two blocks of the third utterance were shown
        gate.hold(InterruptionFrame(), watch.speech_playing, "interrupt"),
        gate.hold(EndFrame(), watch.idle_after_interrupt, "end"),
    ]
    down, up = await asyncio.wait_for(
        run_test(Pipeline([gate, service]), frames_to_send=frames, send_end_frame=False, observers=[watch],
                 start_timeout=SETUP_TIMEOUT_S),
        RUN_TIMEOUT_S)
    assert not gate.timed_out, f"the pipeline never reached: {gate.timed_out}"
    assert not [f for f in up if isinstance(f, ErrorFrame)], [str(f) for f in up]
    report = {"frames_out": counts(down)}

    geometry = watch.handle.geometry
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    before, after = down[:cut], down[cut + 1:]
    assert isinstance(down[-1], EndFrame)

    # Video: the session's size, RGB, one frame every 40 ms of stream time (pts on the pipeline clock too).
    images = [f for f in down if isinstance(f, OutputImageRawFrame)]
    assert images and all(f.size == (geometry.width, geometry.height) and f.format == "RGB"
                          and len(f.image) == geometry.width * geometry.height * 3 for f in images)
    assert all(f.sync_with_audio for f in images)
    shown = [f for f in before if isinstance(f, OutputImageRawFrame)]
    stream_ms = [f.metadata["avatarserve"]["pts_ms"] for f in shown]
    assert np.array_equal(np.diff(stream_ms), np.full(len(shown) - 1, 1000.0 / geometry.fps))
    assert np.array_equal(np.diff([f.pts for f in shown]), np.full(len(shown) - 1, 40_000_000))

    # Audio: the blocks' audio tiles the stream clock from 0; its client samples (non-zero) are the utterances,
    # in order, all in speech frames (TTSAudioRawFrame); idle frames (OutputAudioRawFrame) are silence.
    audio_before = [f for f in before if isinstance(f, OutputAudioRawFrame)]
    assert all(f.sample_rate == SR and f.num_channels == 1 for f in audio_before)
    per_block = collections.Counter()
    for f in audio_before:
        per_block[f.metadata["avatarserve"]["block_index"]] += len(f.audio) // 2
    blocks = sorted(per_block)
    assert blocks == list(range(len(blocks)))  # every block from the first, none missing
    # each block's audio is complete (the last one may have been cut by the interruption)
    assert all(per_block[b] == geometry.samples_per_block for b in blocks[:-1])
    speech_pcm = np.concatenate([np.frombuffer(f.audio, "<i2") for f in audio_before if isinstance(f, TTSAudioRawFrame)])
    idle_pcm = [np.frombuffer(f.audio, "<i2") for f in audio_before if not isinstance(f, TTSAudioRawFrame)]
    assert all(not a.any() for a in idle_pcm)
    said = speech_pcm[speech_pcm != 0]
    head = np.concatenate(utterances[:2])
    assert np.array_equal(said[:len(head)], head)
    played3 = said[len(head):]
    assert 0 < len(played3) < len(utterances[2]) and np.array_equal(played3, utterances[2][:len(played3)])
    report["third_utterance_played_ms"] = len(played3) * 1000 // SR

    # The TTS markers come out in step with the avatar: started before the utterance's first audio, stopped after
    # its last; the cut utterance has no stop; the TTS's own audio never passes (every audio frame is the avatar's).
    assert [type(f).__name__ for f in down if isinstance(f, (TTSStartedFrame, TTSStoppedFrame))] == \
        ["TTSStartedFrame", "TTSStoppedFrame", "TTSStartedFrame", "TTSStoppedFrame", "TTSStartedFrame"]
    assert all("avatarserve" in f.metadata for f in down if isinstance(f, OutputAudioRawFrame))
    # TTSStartedFrame goes right before the first block holding its utterance's audio (right after the block where
    # the previous utterance ends, when they share it), TTSStoppedFrame right after the block holding its last audio.
    block_ms = 1000 * geometry.samples_per_block // SR
    started, ended = {p.index: p for p in watch.started}, {p.index: p for p in watch.ended}
    first_block = {i: started[i].start_pts_ms // block_ms for i in started}
    last_block = {i: (ended[i].start_pts_ms + ended[i].duration_ms - 1) // block_ms for i in (0, 1)}

    def next_block(pos: int) -> int:
        return next(f.metadata["avatarserve"]["block_index"] for f in down[pos:]
                    if isinstance(f, (OutputImageRawFrame, OutputAudioRawFrame)))

    marks = [i for i, f in enumerate(down) if isinstance(f, (TTSStartedFrame, TTSStoppedFrame))]
    assert [down[i].context_id for i in marks] == ["a", "a", "b", "b", "c"]
    assert next_block(marks[1]) == last_block[0] + 1 and next_block(marks[3]) == last_block[1] + 1
    for mark, utt in ((marks[0], 0), (marks[2], 1), (marks[4], 2)):
        shared = utt > 0 and last_block[utt - 1] == first_block[utt]
        assert next_block(mark) == first_block[utt] + int(shared)

    # Interruption: the cut utterance ends interrupted with what was played; idle video follows; no speech after.
    assert [ended[i].interrupted for i in (0, 1, 2)] == [False, False, True]
    assert ended[0].played_ms == ended[0].duration_ms == 1000 and ended[1].played_ms == ended[1].duration_ms == 800
    assert ended[2].played_ms < ended[2].duration_ms
    speech_after = [f for f in after if isinstance(f, (OutputImageRawFrame, OutputAudioRawFrame))
                    and not f.metadata["avatarserve"]["is_idle"]]
    assert len(speech_after) <= 1  # at most the frame being pushed as the interruption came
    idle_after = [f for f in after if isinstance(f, OutputImageRawFrame) and f.metadata["avatarserve"]["is_idle"]]
    assert len(idle_after) >= 12
    report["idle_images_after_interrupt"] = len(idle_after)
    report["speech_blocks_dropped"] = service.blocks_dropped

    # The EndFrame drained and closed the session on the server.
    assert await session_state(cluster, watch.handle) is SessionState.CLOSED
    assert service.close_summary is not None and service.close_summary.counters.interrupts == 1
    assert service.session_handle is None
    print("PIPECAT_REPORT", json.dumps(report))



async def test_cancel_mid_stream_closes_the_session(cluster):
    """24 kHz stereo TTS audio is resampled; a CancelFrame mid-utterance tears everything down at once."""
    service = service_for(cluster)
    watch = Watch(service, interrupt_utterance=1)
    gate = Gate()
    rate = 24000
    first = speech(1.2 * rate / SR, 4)  # 1.2 s at 24 kHz
    stereo = np.stack([first, first], axis=1).ravel()
    frames = [
        TTSStartedFrame(context_id="x"), *tts_chunks(stereo, "x", rate=rate, channels=2),
        TTSStoppedFrame(context_id="x"),
        TTSStartedFrame(context_id="y"), *tts_chunks(speech(8.0, 5), "y"),
        gate.hold(CancelFrame(), watch.speech_playing, "cancel"),  # two blocks into the second utterance
    ]
    before_tasks = {t for t in asyncio.all_tasks() if not t.done()}
    down, up = await asyncio.wait_for(
        run_test(Pipeline([gate, service]), frames_to_send=frames, send_end_frame=False, observers=[watch],
                 start_timeout=SETUP_TIMEOUT_S),
        RUN_TIMEOUT_S)
    assert not gate.timed_out, f"the pipeline never reached: {gate.timed_out}"
    assert not [f for f in up if isinstance(f, ErrorFrame)], [str(f) for f in up]
    print("PIPECAT_CANCEL_FRAMES", json.dumps(counts(down)))
    assert isinstance(down[-1], CancelFrame) and not any(isinstance(f, EndFrame) for f in down)

    # The resampled, downmixed first utterance reached the avatar whole (1.2 s at 16 kHz) and was played out.
    ended = {p.index: p for p in watch.ended}
    assert abs(ended[0].duration_ms - 1200) <= 2 and ended[0].played_ms == ended[0].duration_ms
    assert all(f.sample_rate == SR and f.num_channels == 1 for f in down if isinstance(f, OutputAudioRawFrame))

    # Nothing is left: no task of the service (nor the SDK's stream tasks), the session is closed on the server.
    leftover = [t for t in asyncio.all_tasks() if not t.done() and t not in before_tasks]
    assert not leftover, leftover
    assert service.session_handle is None and service.close_summary is not None
    assert await session_state(cluster, watch.handle) is SessionState.CLOSED


async def test_unreachable_server_is_an_error_frame_and_the_bot_still_speaks():
    """No avatar (the session cannot be created): an ErrorFrame goes upstream and the TTS frames pass unchanged."""
    service = AvatarServeVideoService(address="127.0.0.1:1", image=png(12), rpc_timeout_s=30)
    audio = speech(0.2, 6)
    frames = [TTSStartedFrame(context_id="z"), *tts_chunks(audio, "z"), TTSStoppedFrame(context_id="z")]
    down, up = await asyncio.wait_for(run_test(service, frames_to_send=frames, start_timeout=SETUP_TIMEOUT_S),
                                      RUN_TIMEOUT_S)
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "UNAVAILABLE" in errors[0].error, [str(f) for f in up]
    assert [type(f) for f in down] == [type(f) for f in frames]
    assert b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame)) == audio.tobytes()
