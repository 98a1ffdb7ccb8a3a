"""Pipecat adapter latency: first TTS audio into AvatarServeVideoService -> first speech video frame out of it.

Runs a real Pipecat pipeline (PipelineWorker) whose only processor is the service, against a running AvatarServe
cluster. Each round waits until the avatar is idle (idle frames flowing), then pushes one utterance the way a TTS
service does (TTSStartedFrame, 20 ms TTSAudioRawFrames all at once, TTSStoppedFrame) and measures, with an observer
on the pipeline, the time from the first TTSAudioRawFrame pushed into the service to the first non-idle
OutputImageRawFrame it pushes out; the round ends when the utterance has been played out (UTTERANCE_ENDED).

    python bench/adapter_pipecat.py --server 127.0.0.1:PORT --json [--application avatarserve] [--rounds 5]

Prints ONE JSON object with `--json` (a readable summary otherwise). Needs `avatarserve-client[pipecat]`.
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
CHUNK = 320  # 20 ms TTS frames
WAIT_S = 300.0  # generous bound on each wait: a busy machine is slow, a hung cluster must not hang the bench


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Syllable-like bursts of a voiced tone (not silence, so its blocks are not idle)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 140 + 40 * rng.random()
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.5 * t + rng.random() * 6)
    x = 0.35 * env * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 2.7 * f0 * t)
    return (x * 32767).astype(np.int16)


def _image(seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((96, 80, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _pct(xs: List[float], q: float) -> Optional[float]:
    return round(float(np.percentile(xs, q)), 1) if xs else None


async def run(address: str, image: bytes, pcm: np.ndarray, *, application: Optional[str] = None,
              rounds: int = 3) -> Dict[str, Any]:
    """Latency of the service (ms) over `rounds` utterances of `pcm` (16 kHz mono int16)."""
    try:  # optional: pipecat-ai is not a dependency of the project (see the README's Pipecat section)
        from pipecat.frames.frames import (EndFrame, OutputImageRawFrame, TTSAudioRawFrame, TTSStartedFrame,
                                           TTSStoppedFrame)
        from pipecat.observers.base_observer import BaseObserver, FramePushed
        from pipecat.pipeline.pipeline import Pipeline
        from pipecat.pipeline.worker import PipelineWorker
        from pipecat.processors.frame_processor import FrameDirection
        from pipecat.workers.runner import WorkerRunner
    except ImportError as exc:
        raise SystemExit(f"bench/adapter_pipecat.py needs pipecat-ai (README, section Pipecat): {exc}") from exc

    from avatarserve_client.pipecat import AvatarServeVideoService

    service = AvatarServeVideoService(address=address, image=image, application=application, rpc_timeout_s=WAIT_S)

    class Probe(BaseObserver):
        def __init__(self) -> None:
            super().__init__()
            self.first_audio_at: Optional[float] = None
            self.first_speech_at: Optional[float] = None
            self.idle_seen = asyncio.Event()
            self.speech_seen = asyncio.Event()

        async def on_push_frame(self, data: FramePushed) -> None:
            now = time.monotonic()
            frame = data.frame
            if data.destination is service and isinstance(frame, TTSAudioRawFrame):
                if self.first_audio_at is None:
                    self.first_audio_at = now
            elif (data.source is service and data.direction is FrameDirection.DOWNSTREAM
                  and isinstance(frame, OutputImageRawFrame)):
                if frame.metadata["avatarserve"]["is_idle"]:
                    self.idle_seen.set()
                elif self.first_audio_at is not None and self.first_speech_at is None:
                    self.first_speech_at = now
                    self.speech_seen.set()

    probe = Probe()
    ended: asyncio.Queue = asyncio.Queue()

    @service.event_handler("on_utterance_ended")
    async def _ended(svc, progress):
        await ended.put(progress)

    created_at = time.monotonic()
    started = asyncio.Event()
    worker = PipelineWorker(Pipeline([service]), observers=[probe], cancel_on_idle_timeout=False)

    @worker.event_handler("on_pipeline_started")
    async def _started(w, frame):
        started.set()

    runner = WorkerRunner()
    await runner.add_workers(worker)
    run_task = asyncio.create_task(runner.run())
    latencies: List[float] = []
    played: List[int] = []
    try:
        await asyncio.wait_for(started.wait(), WAIT_S)
        setup_ms = (time.monotonic() - created_at) * 1000
        for i in range(rounds):
            probe.idle_seen.clear()
            await asyncio.wait_for(probe.idle_seen.wait(), WAIT_S)  # the avatar is idle: nothing queued ahead
            probe.first_audio_at = probe.first_speech_at = None
            probe.speech_seen.clear()
            ctx = f"round-{i}"
            await worker.queue_frames([TTSStartedFrame(context_id=ctx)]
                                      + [TTSAudioRawFrame(audio=pcm[j:j + CHUNK].tobytes(), sample_rate=SR,
                                                          num_channels=1, context_id=ctx)
                                         for j in range(0, len(pcm), CHUNK)]
                                      + [TTSStoppedFrame(context_id=ctx)])
            await asyncio.wait_for(probe.speech_seen.wait(), WAIT_S)
            latencies.append((probe.first_speech_at - probe.first_audio_at) * 1000)
            progress = await asyncio.wait_for(ended.get(), WAIT_S)
            played.append(progress.played_ms)
        await worker.queue_frame(EndFrame())
        await asyncio.wait_for(run_task, WAIT_S)
    finally:
        if not run_task.done():
            await worker.cancel()
            await asyncio.gather(run_task, return_exceptions=True)
    return {
        "bench": "adapter_pipecat",
        "metric": "first TTSAudioRawFrame into AvatarServeVideoService -> first non-idle OutputImageRawFrame out",
        "rounds": rounds,
        "utterance_ms": len(pcm) * 1000 // SR,
        "first_frame_ms": [round(x, 1) for x in latencies],
        "first_frame_ms_p50": _pct(latencies, 50),
        "first_frame_ms_min": round(min(latencies), 1) if latencies else None,
        "first_frame_ms_max": round(max(latencies), 1) if latencies else None,
        "pipeline_start_ms": round(setup_ms, 1),
        "played_ms": played,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="gRPC address of a running AvatarServe cluster (host:port)")
    p.add_argument("--application", default=None, help="Ray Serve application name (if the cluster runs several)")
    p.add_argument("--image", default=None, help="reference photo (default: a generated one)")
    p.add_argument("--seconds", type=float, default=2.0, help="length of each utterance (generated speech)")
    p.add_argument("--rounds", type=int, default=3, help="utterances measured")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    image = open(args.image, "rb").read() if args.image else _image()
    result = asyncio.run(run(args.server, image, _speech(args.seconds), application=args.application,
                             rounds=args.rounds))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"first speech frame after first TTS audio: p50 {result['first_frame_ms_p50']} ms "
              f"(min {result['first_frame_ms_min']}, max {result['first_frame_ms_max']}) over {args.rounds} "
              f"utterances of {result['utterance_ms']} ms; pipeline start {result['pipeline_start_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
