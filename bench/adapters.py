"""Latency from audio in to the first video frame out, measured the same way through every way of driving an avatar:
the SDK itself (the baseline), the Pipecat service, the LiveKit worker and the browser page (WebRTC, headless
Chromium with a fake microphone).

One local cluster (`avatarserve up`, deploy/local.yaml: the embedded toy model) serves every adapter in turn. Each
adapter waits until idle video flows, then gets one utterance of speech the way its framework delivers it (the SDK
and Pipecat: the whole utterance at once; LiveKit: 20 ms frames through livekit-agents' queue audio output; the
browser: the fake microphone), and the clock runs from the first audio handed to the adapter to the first video
frame made from speech that comes out of it. The per-adapter measurements live in bench/adapter_<name>.py (run
them alone with `--server`).

    python bench/adapters.py --json [--rounds 3] [--skip web]

Prints ONE JSON object with `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
SR = 16000
WAIT_S = 300.0  # bound on any one wait (idle video, first speech frame): a busy 2-core machine is slow


def _stat(xs: List[float]) -> Dict[str, Optional[float]]:
    if not xs:
        return {"p50": None, "min": None, "max": None}
    return {"p50": round(float(np.percentile(xs, 50)), 1), "min": round(min(xs), 1), "max": round(max(xs), 1)}


async def run_sdk(address: str, image: bytes, pcm: np.ndarray, *, rounds: int = 3,
                  application: Optional[str] = "avatarserve") -> Dict[str, Any]:
    """The baseline: the asyncio SDK in the live idle mode; audio pushed through the stream's source queue."""
    from avatarserve_client import AsyncAvatarClient, VideoBlock, chunk_pcm

    inbox: asyncio.Queue = asyncio.Queue()

    async def source():
        while (item := await inbox.get()) is not None:
            yield item

    firsts: List[float] = []
    async with AsyncAvatarClient(address, application=application, timeout=120) as client:
        async with client.session(image, idle_mode="fill_silence") as s:
            stream = s.stream(source(), end_of_input=False)
            it = stream.__aiter__()

            async def next_block() -> VideoBlock:
                return await asyncio.wait_for(it.__anext__(), WAIT_S)

            for _ in range(rounds):
                idle = 0
                while idle < 2:  # idle video flows: nothing queued ahead of the utterance
                    idle += int((await next_block()).is_idle)
                t0 = time.monotonic()
                for chunk in chunk_pcm(pcm, chunk_ms=20):
                    await inbox.put(chunk.pcm)
                while (await next_block()).is_idle:
                    pass
                firsts.append((time.monotonic() - t0) * 1000)
            await inbox.put(None)
            await s.end_of_input()
            async for _ in it:
                pass
    return {"metric": "first audio chunk into the SDK -> first speech block out", "first_frame_ms": _stat(firsts)}


class LocalCluster:
    """`avatarserve up` / `down` with a private state folder."""

    def __init__(self, config: str) -> None:
        self.config = config
        self.state = Path(tempfile.mkdtemp(prefix="avatarserve-bench-"))
        self.env = {**os.environ, "AVATARSERVE_STATE_DIR": str(self.state)}
        self.env.pop("REDIS_URL", None)
        self.info: Dict[str, Any] = {}

    def __enter__(self) -> "LocalCluster":
        up = subprocess.run([sys.executable, "-m", "avatarserve.cli", "up", "--config", self.config],
                            env=self.env, capture_output=True, text=True)
        if up.returncode != 0:
            raise SystemExit(f"avatarserve up failed:\n{up.stderr[-3000:]}")
        self.info = json.loads(up.stdout.strip().splitlines()[-1])
        if self.info.get("api_key_file"):  # the SDK and every adapter read AVATARSERVE_API_KEY
            os.environ["AVATARSERVE_API_KEY"] = Path(self.info["api_key_file"]).read_text().strip()
        return self

    def __exit__(self, *exc: Any) -> None:
        subprocess.run([sys.executable, "-m", "avatarserve.cli", "down"], env=self.env, capture_output=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "deploy" / "local.yaml"))
    p.add_argument("--server", default=None, help="use a running cluster instead of starting one")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="length of each utterance")
    p.add_argument("--skip", action="append", default=[], choices=["sdk", "pipecat", "livekit", "web"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from avatarserve.toy.demo import write_demo_inputs

    work = Path(tempfile.mkdtemp(prefix="avatarserve-adapters-"))
    demo = write_demo_inputs(str(work), seconds=args.seconds)
    import soundfile

    pcm, _ = soundfile.read(demo["audio"], dtype="int16")
    image = Path(demo["image"]).read_bytes()
    out: Dict[str, Any] = {"bench": "adapters", "model": "toy", "utterance_s": round(len(pcm) / SR, 3),
                           "rounds": args.rounds, "adapters": {}}

    def measure(address: str) -> None:
        runs = {
            "sdk": lambda: asyncio.run(run_sdk(address, image, pcm, rounds=args.rounds)),
            "pipecat": lambda: asyncio.run(__import__("adapter_pipecat").run(address, image, pcm, rounds=args.rounds,
                                                                             application="avatarserve")),
            "livekit": lambda: asyncio.run(__import__("adapter_livekit").run(address, image, pcm, rounds=args.rounds,
                                                                             application="avatarserve")),
            "web": lambda: __import__("adapter_web").measure(address, demo, rounds=args.rounds),
        }
        for name, fn in runs.items():
            if name in args.skip:
                continue
            try:
                out["adapters"][name] = fn()
            except Exception as exc:  # noqa: BLE001 - one adapter failing does not hide the others' numbers
                out["adapters"][name] = {"error": f"{type(exc).__name__}: {exc}"}

    def summary() -> Dict[str, Optional[float]]:
        """The p50 of audio in -> first speech frame out, per adapter, from each one's own report."""
        picks = {"sdk": ("first_frame_ms", "p50"), "pipecat": ("first_frame_ms_p50",),
                 "livekit": ("first_speech_frame_ms", "median"), "web": ("first_frame_ms", "p50")}
        out_ = {}
        for name, path in picks.items():
            value: Any = out["adapters"].get(name)
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            out_[name] = value
        return out_

    if args.server:
        measure(args.server)
    else:
        with LocalCluster(args.config) as cluster:
            out["cluster"] = {"grpc_address": cluster.info.get("grpc_address")}
            measure(cluster.info["grpc_address"])
    out["first_speech_frame_ms_p50"] = summary()
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
