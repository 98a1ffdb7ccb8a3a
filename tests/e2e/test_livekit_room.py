"""The LiveKit adapter in a real room: livekit-server, an agent with AvatarSession, the avatar worker, a listener.

Runs only where a `livekit-server` binary is on PATH. None is installable on the build machine (it is not on PyPI,
in Debian or on npm), so there this test is skipped; the worker's media path and the protocol names are tested
without a server in tests/integration/test_livekit_adapter.py.

Flow: `livekit-server --dev` on loopback; the agent connects, builds an AgentSession (no models: the test plays the
TTS) and starts `AvatarSession(server=<tiny cluster>, ..., launch="task")`, which mints the worker's token and points
the session's audio output at the worker (`DataStreamAudioOutput`); a listener subscribes to the worker's tracks. The
agent speaks one utterance to its end and cuts a second one with clear_buffer; playback_started / playback_finished
come back over RPC, and the listener receives the avatar's camera video and microphone audio.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.request
from typing import Any

import numpy as np
import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("livekit-server") is None,
                       reason="no livekit-server binary on PATH (none is installable on the build machine: "
                              "not on PyPI, in Debian or on npm)"),
]

pytest.importorskip("livekit.agents")

from tests.conftest import free_port  # noqa: E402
from tests.integration.conftest import APP, cluster, png  # noqa: E402,F401  (cluster: the tiny-model app)

API_KEY, API_SECRET = "devkey", "secret"  # livekit-server --dev
ROOM = "avatarserve-e2e"
STEP_TIMEOUT_S = 300.0
SR = 16000


@pytest.fixture
def livekit_server():
    port = free_port()
    proc = subprocess.Popen([shutil.which("livekit-server"), "--dev", "--bind", "127.0.0.1", "--port", str(port),
                             "--node-ip", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None, f"livekit-server exited: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "livekit-server did not answer within 60 s"
        time.sleep(0.2)
    try:
        yield f"ws://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _token(identity: str, kind: str = "standard") -> str:
    from livekit import api

    return (api.AccessToken(API_KEY, API_SECRET).with_identity(identity).with_kind(kind)
            .with_grants(api.VideoGrants(room_join=True, room=ROOM)).to_jwt())


def _speech(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = (0.3 + 0.2 * np.abs(np.sin(2 * np.pi * 2.5 * t))) * np.sin(2 * np.pi * (150 + 20 * rng.random()) * t)
    return np.round(x * 32767).astype(np.int16)


def test_agent_avatar_and_listener_in_a_real_room(cluster, livekit_server):  # noqa: F811
    asyncio.run(asyncio.wait_for(_scenario(cluster, livekit_server), timeout=6 * STEP_TIMEOUT_S))


async def _scenario(address: str, url: str) -> None:
    from livekit import rtc
    from livekit.agents import AgentSession

    from avatarserve_client.livekit import AvatarSession, protocol

    agent_room, listener = rtc.Room(), rtc.Room()
    heard: list[np.ndarray] = []
    seen: list[Any] = []
    readers: list[asyncio.Task] = []

    def on_track(track: rtc.Track, pub: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant) -> None:
        if participant.identity != "avatarserve-avatar":
            return

        async def read_video() -> None:
            async for ev in rtc.VideoStream(track):
                seen.append((time.monotonic(), ev.frame.width, ev.frame.height, pub.source))

        async def read_audio() -> None:
            async for ev in rtc.AudioStream(track, sample_rate=SR, num_channels=1):
                heard.append(np.frombuffer(bytes(ev.frame.data), np.int16).copy())

        readers.append(asyncio.create_task(read_video() if track.kind == rtc.TrackKind.KIND_VIDEO
                                           else read_audio()))

    listener.on("track_subscribed", on_track)
    await listener.connect(url, _token("listener"))
    await agent_room.connect(url, _token("agent", "agent"))
    session = AgentSession()
    avatar = AvatarSession(server=address, image=png(9), application=APP, seed=5, launch="task")
    try:
        await avatar.start(session, room=agent_room, livekit_url=url, api_key=API_KEY, api_secret=API_SECRET)
        await avatar.wait_for_join(timeout=STEP_TIMEOUT_S)
        worker = listener.remote_participants["avatarserve-avatar"]
        assert worker.attributes[protocol.ATTRIBUTE_PUBLISH_ON_BEHALF] == "agent"
        sources = {p.source for p in worker.track_publications.values()}
        assert sources == {rtc.TrackSource.SOURCE_CAMERA, rtc.TrackSource.SOURCE_MICROPHONE}

        out = session.output.audio  # DataStreamAudioOutput -> the worker
        started: list[float] = []
        out.on("playback_started", lambda ev: started.append(time.monotonic()))

        utt1 = _speech(1.2, 1)
        for i in range(0, len(utt1), 320):
            await out.capture_frame(rtc.AudioFrame(utt1[i:i + 320].tobytes(), SR, 1, len(utt1[i:i + 320])))
        out.flush()
        ev1 = await asyncio.wait_for(out.wait_for_playout(), STEP_TIMEOUT_S)
        assert ev1.interrupted is False and abs(ev1.playback_position - 1.2) < 0.01
        assert len(started) == 1

        utt2 = _speech(4.0, 2)
        for i in range(0, len(utt2), 320):
            await out.capture_frame(rtc.AudioFrame(utt2[i:i + 320].tobytes(), SR, 1, len(utt2[i:i + 320])))
        out.flush()
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while len(started) < 2:
            assert time.monotonic() < deadline, "no playback_started for the second utterance"
            await asyncio.sleep(0.05)
        out.clear_buffer()  # lk.clear_buffer -> INTERRUPT -> lk.playback_finished(interrupted)
        ev2 = await asyncio.wait_for(out.wait_for_playout(), STEP_TIMEOUT_S)
        assert ev2.interrupted is True and 0.0 <= ev2.playback_position < 4.0

        # The listener got the avatar's video at the session's size and its speech (Opus: not bit-exact).
        assert len(seen) > 25 and all((w, h) == (64, 64) for _, w, h, _ in seen)
        audio = np.concatenate(heard).astype(np.float64)
        assert np.sqrt(np.mean(audio ** 2)) > 100
    finally:
        await avatar.aclose()
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await agent_room.disconnect()
        await listener.disconnect()
