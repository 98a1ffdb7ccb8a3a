"""LiveKit Agents adapter latency: first audio frame handed to the avatar worker -> first speech video frame out.

Runs the worker's media path (avatarserve_client.livekit: AvatarServeRunner + AvatarServeVideoGenerator) offline,
with livekit-agents' own QueueAudioOutput as the agent's audio output and the worker's receiver, against a running
AvatarServe cluster; the frames go through rtc.AVSynchronizer into real rtc.VideoSource / rtc.AudioSource tracks
(no LiveKit server: the tracks are not published). Each round waits until idle video flows, then hands one utterance
to the worker the way an agent does (20 ms frames, all at once, then flush()) and measures from the first
capture_frame() to

- first_speech_frame_ms: the first video frame of a non-idle block pushed into the synchronizer;
- playback_started_ms: the agent's playback_started event (the audio slice holding the utterance's first sample is
  being pushed);

the round ends with the agent's playback_finished (its playback_position is reported too).

    python bench/adapter_livekit.py --server 127.0.0.1:PORT --json [--application avatarserve] [--rounds 3]

Prints ONE JSON object with `--json` (a readable summary otherwise). Needs `avatarserve-client[livekit]`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

SR = 16000
FRAME = 320  # 20 ms frames, as a TTS produces them
WAIT_S = 300.0  # bound on each wait: a busy machine is slow, a hung cluster must not hang the bench


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-like tone (loud enough that its blocks are not idle), int16 at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 60 * rng.random()
    envelope = 0.3 + 0.3 * np.abs(np.sin(2 * np.pi * 3.0 * t + 6 * rng.random()))
    x = envelope * (np.sin(2 * np.pi * f0 * t) + 0.3 * np.sin(2 * np.pi * 3 * f0 * t))
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


def face(seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((96, 80, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


async def _until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {WAIT_S:.0f} s")
        await asyncio.sleep(0.005)


def _stat(xs: List[float]) -> Dict[str, Optional[float]]:
    if not xs:
        return {"first": None, "median": None, "max": None}
    return {"first": round(xs[0], 1), "median": round(float(np.median(xs)), 1), "max": round(max(xs), 1)}


async def run(address: str, image: bytes, pcm: np.ndarray, *, application: Optional[str] = "avatarserve",
              rounds: int = 1) -> Dict[str, Any]:
    """Latencies (ms) of the worker over `rounds` utterances of `pcm` (16 kHz mono int16)."""
    from livekit import rtc
    from livekit.agents.voice.avatar import QueueAudioOutput

    from avatarserve_client import AsyncAvatarClient
    from avatarserve_client.livekit import AvatarServeRunner, AvatarServeVideoGenerator, MediaPushed

    pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
    frames = [rtc.AudioFrame(pcm[i:i + FRAME].tobytes(), SR, 1, len(pcm[i:i + FRAME]))
              for i in range(0, len(pcm), FRAME)]
    pushed: List[MediaPushed] = []
    started: List[float] = []
    finished: List[Any] = []
    out: Dict[str, Any] = {"rounds": rounds, "utterance_s": round(len(pcm) / SR, 3)}
    first_speech: List[float] = []
    playback_started: List[float] = []
    positions: List[float] = []
    lags: List[float] = []

    client = AsyncAvatarClient(address, application=application, timeout=120)
    agent_out = QueueAudioOutput(wait_playback_start=True)
    gen = AvatarServeVideoGenerator(client, image, seed=0)
    runner = AvatarServeRunner(None, audio_recv=agent_out, video_gen=gen)
    runner.on("media", pushed.append)
    agent_out.on("playback_started", lambda ev: started.append(time.monotonic()))
    agent_out.on("playback_finished", lambda ev: finished.append(ev))
    t_start = time.monotonic()
    try:
        await runner.start()
        g = gen.geometry
        out["geometry"] = f"{g.width}x{g.height}@{g.fps}"
        for r in range(rounds):
            # idle video flows (two idle blocks pushed since the previous round)
            mark = len(pushed)
            await _until(lambda: sum(p.info.kind == "video" and p.info.is_idle for p in pushed[mark:])
                         >= 2 * g.frames_per_block, "idle video")
            if r == 0:
                out["first_idle_frames_after_start_ms"] = round(
                    (next(p.pushed_at for p in pushed if p.info.kind == "video") - t_start) * 1000, 1)
            mark, n_started, n_finished = len(pushed), len(started), len(finished)
            t0 = time.monotonic()
            for f in frames:
                await agent_out.capture_frame(f)
            agent_out.flush()
            await _until(lambda: any(p.info.kind == "video" and not p.info.is_idle for p in pushed[mark:]),
                         "speech video frame")
            first = next(p for p in pushed[mark:] if p.info.kind == "video" and not p.info.is_idle)
            first_speech.append((first.pushed_at - t0) * 1000)
            # how far the published video is behind the live stream clock when the speech starts
            lags.append((first.pushed_at - gen.session.stats.started_at) * 1000 - first.info.pts_ms)
            await _until(lambda: len(started) > n_started, "playback_started")
            playback_started.append((started[n_started] - t0) * 1000)
            await _until(lambda: len(finished) > n_finished, "playback_finished")
            positions.append(finished[n_finished].playback_position)
        out["first_speech_frame_ms"] = _stat(first_speech)
        out["playback_started_ms"] = _stat(playback_started)
        out["playback_position_s"] = positions
        out["playout_lag_ms"] = _stat(lags)
        skews = [abs(p.av_skew_s) for p in pushed if p.av_skew_s is not None]
        out["max_abs_av_skew_ms"] = round(max(skews) * 1000, 1) if skews else None
        out["video_frames_pushed"] = sum(p.info.kind == "video" for p in pushed)
        out["idle_blocks_skipped_to_catch_up"] = gen.skipped_idle_blocks
    finally:
        await runner.aclose()
        await client.close()
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True, help="AvatarServe gRPC address HOST:PORT")
    p.add_argument("--application", default="avatarserve", help="Serve application name ('' for none)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="length of each utterance")
    p.add_argument("--image", default=None, help="reference photo (default: a random 80x96 image)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    image = open(args.image, "rb").read() if args.image else face()
    result = asyncio.run(run(args.server, image, speech(args.seconds), application=args.application or None,
                             rounds=args.rounds))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
