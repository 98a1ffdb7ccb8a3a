"""LiveKit Agents adapter (avatarserve_client.livekit) against the installed livekit-agents and the real cluster.

1. The protocol names (topic, RPC methods, byte-stream and participant attributes, JSON keys) are read from the
   installed livekit-agents and must equal ours.
2. The worker's media path, offline (no LiveKit server): livekit-agents' own ``QueueAudioOutput`` is the agent's audio
   output and the worker's audio receiver at once, exactly as livekit-agents' avatar examples run in one process;
   the runner publishes into real ``rtc.AudioSource`` / ``rtc.VideoSource`` tracks through ``rtc.AVSynchronizer``,
   which are read back with ``rtc.AudioStream`` / ``rtc.VideoStream``. Three utterances go through the tiny-model
   cluster: one played out, one cut by ``clear_buffer`` mid-way, one at 24 kHz stereo after the cut.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import inspect
import json
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np
import pytest

import livekit.agents  # noqa: F401 - the test extra installs it (avatarserve-client[livekit]): missing fails, not skips

from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import QueueAudioOutput  # noqa: E402

from avatarserve_client import AsyncAvatarClient, EventKind  # noqa: E402
from avatarserve_client.livekit import (AvatarServeRunner, AvatarServeVideoGenerator, MediaPushed,  # noqa: E402
                                        protocol)

from .conftest import APP, png  # noqa: E402

pytestmark = pytest.mark.integration

STEP_TIMEOUT_S = 300.0  # one step of the scenario on a busy 2-core machine (a block is ~0.5 s when idle)
SR = 16000


# ------------------------------------------------------------------------------------------ 1. protocol names


def _string_keys_of_dict_kwarg(tree: ast.AST, func_attr: str, kwarg: str) -> set[str]:
    keys: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == func_attr:
            for kw in node.keywords:
                if kw.arg == kwarg and isinstance(kw.value, ast.Dict):
                    keys |= {k.value for k in kw.value.keys if isinstance(k, ast.Constant)}
    return keys


def _subscripted_keys(tree: ast.AST, name: str) -> set[str]:
    return {node.slice.value for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == name
            and isinstance(node.slice, ast.Constant)}


def test_protocol_names_equal_installed_livekit_agents():
    from importlib.metadata import version

    from livekit.agents import types as lk_types
    from livekit.agents.voice import io as lk_io
    from livekit.agents.voice.avatar import _datastream_io as ds
    from packaging.specifiers import SpecifierSet

    assert version("livekit-agents") in SpecifierSet(protocol.VERIFIED_LIVEKIT_AGENTS)
    assert ds.AUDIO_STREAM_TOPIC == protocol.AUDIO_STREAM_TOPIC == "lk.audio_stream"
    assert ds.RPC_CLEAR_BUFFER == protocol.RPC_CLEAR_BUFFER == "lk.clear_buffer"
    assert ds.RPC_PLAYBACK_STARTED == protocol.RPC_PLAYBACK_STARTED == "lk.playback_started"
    assert ds.RPC_PLAYBACK_FINISHED == protocol.RPC_PLAYBACK_FINISHED == "lk.playback_finished"
    assert lk_types.ATTRIBUTE_PUBLISH_ON_BEHALF == protocol.ATTRIBUTE_PUBLISH_ON_BEHALF == "lk.publish_on_behalf"

    # Byte-stream attributes: what DataStreamAudioOutput writes and what DataStreamAudioReceiver reads.
    tree = ast.parse(inspect.getsource(ds))
    written = _string_keys_of_dict_kwarg(tree, "stream_bytes", "attributes")
    read = _subscripted_keys(tree, "attrs")
    assert written == read == {protocol.ATTR_SAMPLE_RATE, protocol.ATTR_NUM_CHANNELS}

    # lk.playback_finished JSON: the receiver sends asdict(PlaybackFinishedEvent(...)), the output parses it back
    # with PlaybackFinishedEvent(**payload). Our payload keys are exactly its required fields.
    fields = dataclasses.fields(lk_io.PlaybackFinishedEvent)
    required = {f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert required == {protocol.KEY_PLAYBACK_POSITION, protocol.KEY_INTERRUPTED}
    payload = json.dumps({protocol.KEY_PLAYBACK_POSITION: 1.25, protocol.KEY_INTERRUPTED: True})
    ev = lk_io.PlaybackFinishedEvent(**json.loads(payload))
    assert (ev.playback_position, ev.interrupted) == (1.25, True)
    assert "PlaybackFinishedEvent(**json.loads(data.payload))" in inspect.getsource(ds.DataStreamAudioOutput)
    assert "json.dumps(asdict(event))" in inspect.getsource(ds.DataStreamAudioReceiver)


def test_worker_command_fails_cleanly_without_a_livekit_server(tmp_path):
    """The worker command line against a LiveKit URL where nothing listens: a clear error, exit status 1."""
    from tests.conftest import free_port

    face = tmp_path / "face.png"
    face.write_bytes(png(5))
    proc = subprocess.run(
        [sys.executable, "-m", "avatarserve_client.livekit", "worker", "--url", f"ws://127.0.0.1:{free_port()}",
         "--token", "not-a-token", "--server", "127.0.0.1:1", "--image", str(face)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "avatar worker failed" in proc.stderr


# ------------------------------------------------------------------------------------------ 2. media path


def speech(seconds: float, rate: int, seed: int) -> np.ndarray:
    """TTS-like float speech: a voiced harmonic tone with a syllable envelope and a little noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.25 + 0.2 * np.abs(np.sin(2 * np.pi * 2.5 * t))
    return np.clip(0.5 * envelope * voiced + 0.01 * rng.standard_normal(len(t)), -1, 1)


def pcm16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


def tts_frames(pcm: np.ndarray, rate: int, channels: int = 1, frame_ms: int = 20) -> list[rtc.AudioFrame]:
    """Interleaved int16 (samples x channels) cut in frames, like a TTS stream."""
    n = rate * frame_ms // 1000
    pcm = pcm.reshape(-1, channels)
    return [rtc.AudioFrame(np.ascontiguousarray(pcm[i:i + n]).tobytes(), rate, channels, len(pcm[i:i + n]))
            for i in range(0, len(pcm), n)]


async def wait_until(cond: Callable[[], Any], what: str, timeout: float = STEP_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


def published_audio(pushed: list[MediaPushed]) -> tuple[int, np.ndarray]:
    """The audio the runner pushed, laid out on the stream clock: (first sample index, samples)."""
    slices = [(round(p.info.pts_ms * SR / 1000), np.frombuffer(bytes(p.frame.data), np.int16))
              for p in pushed if p.info.kind == "audio"]
    first = min(s for s, _ in slices)
    end = max(s + len(a) for s, a in slices)
    out = np.zeros(end - first, np.int16)
    for s, a in slices:
        out[s - first:s - first + len(a)] = a
    return first, out


def test_worker_media_path_with_queue_audio_output(cluster):
    report = asyncio.run(asyncio.wait_for(_media_path_scenario(cluster), timeout=6 * STEP_TIMEOUT_S))
    print("LIVEKIT_OFFLINE_REPORT", json.dumps(report))


async def _media_path_scenario(address: str) -> dict:
    t0 = time.monotonic()
    utt1 = pcm16(speech(1.2, SR, seed=1))  # 16 kHz mono: must come out bit-exact
    utt2 = pcm16(speech(4.0, SR, seed=2))  # cut by clear_buffer after ~0.6 s of it played
    utt3_float = speech(0.8, 24000, seed=3)
    utt3 = pcm16(np.stack([utt3_float, 0.5 * utt3_float], axis=1).reshape(-1))  # 24 kHz stereo, interleaved

    client = AsyncAvatarClient(address, application=APP, timeout=120)
    agent_out = QueueAudioOutput(sample_rate=None, wait_playback_start=True)  # the agent side ...
    gen = AvatarServeVideoGenerator(client, png(7), seed=3, session_options={"fill_grace_ms": 50})
    runner = AvatarServeRunner(None, audio_recv=agent_out, video_gen=gen)  # ... is the worker's receiver too

    events: list[tuple[str, float, Any]] = []
    agent_out.on("playback_started", lambda ev: events.append(("started", time.monotonic() - t0, ev)))
    agent_out.on("playback_finished", lambda ev: events.append(("finished", time.monotonic() - t0, ev)))
    pushed: list[MediaPushed] = []
    runner.on("media", pushed.append)
    readback_video: list[rtc.VideoFrame] = []
    readback_audio: list[np.ndarray] = []
    readers: list[asyncio.Task] = []
    streams: list[Any] = []
    try:
        await runner.start()
        g = gen.geometry
        vs = rtc.VideoStream(runner.video_track, format=rtc.VideoBufferType.RGB24)
        au = rtc.AudioStream(runner.audio_track, sample_rate=SR, num_channels=1)
        streams = [vs, au]

        async def read_video():
            async for ev in vs:
                readback_video.append(ev.frame)

        async def read_audio():
            async for ev in au:
                readback_audio.append(np.frombuffer(bytes(ev.frame.data), np.int16).copy())

        readers = [asyncio.create_task(read_video()), asyncio.create_task(read_audio())]

        # Idle video (and silent audio) flows before any speech.
        await wait_until(lambda: sum(p.info.kind == "video" for p in pushed) >= 2 * g.frames_per_block,
                         "idle video before speech")
        assert all(p.info.is_idle for p in pushed)

        # Utterance 1: pushed at TTS speed, then flushed; it plays out to its end.
        t_utt1 = time.monotonic() - t0
        for f in tts_frames(utt1, SR):
            await agent_out.capture_frame(f)
        agent_out.flush()
        fin1 = await asyncio.wait_for(agent_out.wait_for_playout(), STEP_TIMEOUT_S)
        assert fin1.interrupted is False and fin1.playback_position == pytest.approx(len(utt1) / SR, abs=0.002)

        # Utterance 2: cut by clear_buffer once ~0.6 s of it has been pushed out.
        for f in tts_frames(utt2, SR):
            await agent_out.capture_frame(f)
        agent_out.flush()
        await wait_until(lambda: sum(e[0] == "started" for e in events) == 2, "playback_started of utterance 2")
        start2 = [e.utterance.start_pts_ms for e in gen.stream_events
                  if e.kind is EventKind.UTTERANCE_STARTED and e.utterance.index == 1][0]
        await wait_until(lambda: any(p.info.kind == "audio" and p.info.pts_ms >= start2 + 600 for p in pushed),
                         "0.6 s of utterance 2 played")
        t_clear = time.monotonic() - t0
        n_pushed_at_clear = len(pushed)
        agent_out.clear_buffer()
        fin2 = await asyncio.wait_for(agent_out.wait_for_playout(), STEP_TIMEOUT_S)
        t_fin2 = time.monotonic() - t0
        played2 = max(p.info.pts_ms + p.info.duration_ms for p in pushed[:n_pushed_at_clear + 2]
                      if p.info.kind == "audio") - start2
        assert fin2.interrupted is True
        assert 0.5 < fin2.playback_position < len(utt2) / SR - 1.0
        assert fin2.playback_position == pytest.approx(played2 / 1000, abs=0.1)
        # Once the server confirmed the INTERRUPT, only idle blocks follow.
        await wait_until(lambda: any(p.info.kind == "video" and p.info.is_idle and p.info.pts_ms > start2
                                     for p in pushed), "idle video after the interrupt")

        # Utterance 3: 24 kHz stereo (downmixed, resampled to 16 kHz), after the cut; plays out.
        for f in tts_frames(utt3, 24000, channels=2):
            await agent_out.capture_frame(f)
        agent_out.flush()
        fin3 = await asyncio.wait_for(agent_out.wait_for_playout(), STEP_TIMEOUT_S)
        assert fin3.interrupted is False
        assert fin3.playback_position == pytest.approx(0.8, abs=0.01)
        end3 = [e.utterance.start_pts_ms + e.utterance.duration_ms for e in gen.stream_events
                if e.kind is EventKind.UTTERANCE_ENDED and e.utterance.index == 2][0]
        await wait_until(lambda: any(p.info.kind == "video" and p.info.is_idle and p.info.pts_ms > end3
                                     for p in pushed), "idle video after utterance 3")
        await asyncio.sleep(0.3)  # let the read-back streams receive what was pushed last
    finally:
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        await runner.aclose()
        await client.close()

    # ---- playback events, in order -------------------------------------------------------------------------------
    kinds = [(k, None if k == "started" else (round(ev.playback_position, 3), ev.interrupted)) for k, _, ev in events]
    assert [k for k, _ in kinds] == ["started", "finished"] * 3, kinds
    times = [t for _, t, _ in events]
    assert times == sorted(times)
    assert times[0] > t_utt1
    assert times[1] - times[0] >= len(utt1) / SR - 0.3  # played in real time, not faster
    assert times[3] >= t_clear and t_fin2 >= times[3]
    assert [ev.interrupted for k, _, ev in events if k == "finished"] == [False, True, False]
    ut = [e.utterance for e in gen.stream_events if e.kind is EventKind.UTTERANCE_ENDED]
    # The server may have delivered all of utterance 2 before the INTERRUPT reached it (the worker buffers what it
    # has not played yet); what the agent hears is the worker's account above.
    assert [u.index for u in ut] == [0, 1, 2] and not ut[0].interrupted and not ut[2].interrupted
    assert ut[0].played_ms == ut[0].duration_ms == len(utt1) * 1000 // SR

    # ---- video: every frame has the session's size; blocks of 12 frames; speech and idle where expected ----------
    video = [p for p in pushed if p.info.kind == "video"]
    assert all((p.frame.width, p.frame.height) == (g.width, g.height) for p in video)
    assert all(len(p.frame.data) == g.width * g.height * 3 for p in video)
    per_block: dict[int, list[MediaPushed]] = {}
    for p in video:
        per_block.setdefault(p.info.block_index, []).append(p)
    full = [b for b, ps in per_block.items() if len(ps) == g.frames_per_block]
    assert len(full) >= len(per_block) - 3  # the first block may be shorter; one may be cut by the clear
    speech_blocks = sorted({p.info.block_index for p in video if not p.info.is_idle})
    assert len(speech_blocks) >= 3 + 1 + 1
    assert video[0].info.is_idle and video[-1].info.is_idle

    # ---- audio: utterance 1 comes out bit-exact where the server put it; utterance 3 resampled ------------------
    first, timeline = published_audio(pushed)
    start1 = ut[0].start_pts_ms * SR // 1000 - first
    np.testing.assert_array_equal(timeline[start1:start1 + len(utt1)], utt1)
    start3 = ut[2].start_pts_ms * SR // 1000 - first
    got3 = timeline[start3:start3 + ut[2].duration_ms * SR // 1000].astype(np.float64)
    assert abs(len(got3) - 0.8 * SR) <= 32
    from avatarserve_client.audio import resample

    want3 = resample(0.75 * utt3_float, 24000, SR) * 32767  # the mono mix, resampled in one piece

    def corr_at(lag: int) -> float:  # the streaming resampler may delay its output by a few samples
        a, b = got3[max(lag, 0):], want3[max(-lag, 0):]
        n = min(len(a), len(b)) - 64
        return float(np.dot(a[:n], b[:n]) / np.sqrt(np.dot(a[:n], a[:n]) * np.dot(b[:n], b[:n])))

    lag3, corr = max(((lag, corr_at(lag)) for lag in range(-64, 65)), key=lambda lc: lc[1])
    assert corr > 0.98 and abs(lag3) <= 48, (lag3, corr, [c for c in gen.sent_audio if c[1] >= ut[2].start_pts_ms],
                                             [(e.kind, e.code, e.message) for e in gen.stream_events
                                              if e.kind is EventKind.WARNING])

    # ---- in sync: each frame is followed by its own 40 ms of audio; AVSynchronizer's own skew stays within a block
    for v, a in zip(pushed, pushed[1:]):
        if v.info.kind == "video":
            assert a.info.kind == "audio" and a.info.pts_ms == v.info.pts_ms
            assert a.info.block_index == v.info.block_index
    skews = [p.av_skew_s for p in pushed[4 * g.frames_per_block:] if p.av_skew_s is not None]
    assert skews and max(abs(s) for s in skews) < g.block_duration_ms / 1000

    # ---- read back from the real tracks ------------------------------------------------------------------------
    assert len(readback_video) >= len(video) // 2  # a VideoStream may drop frames when the reader lags
    assert all((f.width, f.height) == (g.width, g.height) for f in readback_video)
    # The track carries the samples unchanged, but on a starved machine the source can underrun and the track then
    # inserts silence: look for utterance 1 in 5 ms pieces, each bit-exact.
    heard = np.concatenate(readback_audio).tobytes()
    pieces = [utt1[i:i + 80].tobytes() for i in range(0, len(utt1) - 79, 80)]
    heard_fraction = sum(heard.find(piece) >= 0 for piece in pieces) / len(pieces)
    assert heard_fraction >= 0.9, heard_fraction

    return {
        "geometry": dataclasses.asdict(g),
        "events": [{"event": k, "t_s": round(t, 3),
                    **({} if k == "started" else {"playback_position": round(ev.playback_position, 3),
                                                  "interrupted": ev.interrupted})}
                   for k, t, ev in events],
        "utt1_pushed_at_s": round(t_utt1, 3), "clear_buffer_at_s": round(t_clear, 3),
        "server_utterances": [dataclasses.asdict(u) for u in ut],
        "utt1_heard_bit_exact_fraction": round(heard_fraction, 3), "video_frames_pushed": len(video),
        "video_frames_read_back": len(readback_video),
        "blocks": len(per_block), "speech_blocks": len(speech_blocks),
        "max_abs_av_skew_s": round(max(abs(s) for s in skews), 4), "utt3_corr": round(corr, 4),
        "utt3_resampler_lag_samples": lag3,
    }


def test_latency_bench_against_the_cluster(cluster):
    """bench/adapter_livekit.py's run(): first audio frame into the worker -> first speech frame out (printed)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "adapter_livekit.py"
    spec = importlib.util.spec_from_file_location("adapter_livekit", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = asyncio.run(bench.run(cluster, bench.face(), bench.speech(1.5), application=APP, rounds=2))
    print("LIVEKIT_LATENCY", json.dumps(result))
    for key in ("first_speech_frame_ms", "playback_started_ms"):
        assert 0 < result[key]["first"] <= result[key]["max"] < STEP_TIMEOUT_S * 1000
    assert result["playback_position_s"] == [1.5, 1.5]


def test_a_stalled_worker_skips_idle_backlog(cluster):
    """Idle blocks that piled up while the worker did not read (a slow start, a starved machine) are skipped, so the
    video catches up with the live stream instead of staying seconds behind it forever."""
    asyncio.run(asyncio.wait_for(_backlog_scenario(cluster), timeout=2 * STEP_TIMEOUT_S))


async def _backlog_scenario(address: str) -> None:
    async with AsyncAvatarClient(address, application=APP, timeout=120) as client:
        gen = AvatarServeVideoGenerator(client, png(8), seed=4, session_options={"fill_grace_ms": 50})
        await gen.start()
        items = gen.__aiter__()
        try:
            await items.__anext__()  # the stream is open; now nothing is read while blocks keep coming
            deadline = time.monotonic() + STEP_TIMEOUT_S
            while (await gen.session.info()).counters.blocks_delivered < 6:
                assert time.monotonic() < deadline, "the server delivered no backlog"
                await asyncio.sleep(0.1)
            lags = []  # how far behind the live clock each yielded video frame is
            while len(lags) < 3 * gen.geometry.frames_per_block:
                item = await asyncio.wait_for(items.__anext__(), STEP_TIMEOUT_S)
                if isinstance(item, rtc.VideoFrame):
                    lags.append((time.monotonic() - gen.session.stats.started_at) * 1000 - gen.last_media.pts_ms)
            assert gen.skipped_idle_blocks >= 2
            assert lags[-1] < lags[0] and lags[-1] < 2500, (lags[0], lags[-1])
        finally:
            await items.aclose()
            await gen.aclose()
