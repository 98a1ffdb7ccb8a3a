"""Admission-control benchmark: sessions admitted vs refused at saturation, refusal latency, and whether the admitted
sessions keep real time while the refusals hammer the gateway.

Starts a private local cluster (redis-server, Ray, Serve with the gRPC proxy) and deploys the avatar app (tiny model,
`--steps` denoising stages) through the declarative path with autoscaling pinned at its maximum (one replica per
stage, `--capacity` sessions each): the cluster cannot grow, so admission must refuse at once. Then:

1. saturate: create `--capacity` sessions, each streaming `--seconds` of speech-like audio paced in real time;
2. while they stream, fire `--attempts` more CreateSession calls from `--concurrency` threads: every one must be
   refused (RESOURCE_EXHAUSTED with a `retry-after-ms` hint); their client-side latency is the refusal latency;
3. when the streams end: per admitted session, the real-time factor = media seconds delivered / wall seconds from
   the first to the last delivered chunk (plus one chunk): >= 1 means the session kept pace with its live audio
   (slightly above 1 because the pipeline catches up on the blocks queued behind its first-frame latency; below 1
   it fell behind); plus time to first frame and delivery lag behind the audio.

Prints ONE JSON object with `--json` (a readable summary otherwise). `refusal_p99_ms` targets <= 100 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from avatarserve.serve.ops.launcher import free_port, use_ray_env

use_ray_env()  # before anything imports Ray (it reads them once): the private cluster stays on 127.0.0.1, auth off

APP = "avatarscale-bench"
TARGET_REFUSAL_P99_MS = 100.0


def _pct(xs: List[float], q: float) -> Optional[float]:
    return round(float(np.percentile(xs, q)), 3) if xs else None


def _speech(seconds: float, seed: int) -> np.ndarray:
    """Syllable-like bursts of a voiced tone (not silence, so blocks are not idle)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 140 + 40 * rng.random()
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.5 * t + rng.random() * 6)
    x = 0.35 * env * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 2.7 * f0 * t)
    return (x * 32767).astype(np.int16)


def _image(seed: int) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((80, 96, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def private_cluster(num_cpus: int, namespace: str) -> Iterator[Tuple[str, str]]:
    """A private local cluster for a benchmark: redis-server, Ray and Serve with its gRPC proxy on free loopback
    ports -> (redis URL, gRPC address); torn down on exit (only what it started)."""
    from avatarserve.serve.ops.launcher import _kill_group, _kill_pid, connect_driver, start_ray_head, start_redis

    import ray
    from ray import serve

    from avatarserve.serve.builder import grpc_options
    from avatarserve.serve.ray_compat import start_serve

    work = Path(tempfile.mkdtemp(prefix="avatarserve-bench-"))
    rport = free_port()
    redis_pid = start_redis(rport, work)
    ray_pgid = None
    try:  # the head is started as `avatarserve up` starts it; this process connects as a driver
        ray_pgid, ray_address = start_ray_head(
            {"cluster": {"num_cpus": num_cpus, "object_store_memory": 150 * 1024 * 1024}}, work / "ray", free_port())
        connect_driver(ray_address, namespace)
        try:
            gport = free_port()
            start_serve(grpc_options=grpc_options(gport), http_options={"host": "127.0.0.1", "port": free_port()})
            yield f"redis://127.0.0.1:{rport}/0", f"127.0.0.1:{gport}"
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        if ray_pgid is not None:
            _kill_group(ray_pgid)
        _kill_pid(redis_pid)
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from avatarserve.serve.builder import deploy
    from avatarserve_client import AvatarClient, CapacityExhausted, VideoBlock, chunk_pcm

    t0 = time.monotonic()
    out: Dict[str, Any] = {}
    with private_cluster(args.num_cpus, "avatarserve-scale-bench") as (redis_url, address):
        cfg = {"name": APP, "route_prefix": "/" + APP, "redis_url": redis_url,
               "model": {"config": args.model, "seed": 0, "stream_overrides": {"num_steps": args.steps}},
               "capacity": dict.fromkeys(("audio", "denoise", "vae"), args.capacity),
               "autoscaling": {"enabled": True, "min_replicas": dict.fromkeys(("audio", "denoise", "vae"), 1),
                               "max_replicas": dict.fromkeys(("audio", "denoise", "vae"), 1)},
               "timeouts": {"admission_wait_s": 30.0}, "retry_after_ms": args.retry_after_ms, "ops": {"enabled": False},
               "auth": {"mode": "disabled"}}
        deploy(cfg)
        out["startup_s"] = round(time.monotonic() - t0, 1)
        _log(f"cluster up in {out['startup_s']} s; saturating {args.capacity} session slot(s)")
        out.update(measure(address, args, AvatarClient, CapacityExhausted, VideoBlock, chunk_pcm))
    return out


def measure(address: str, args: argparse.Namespace, AvatarClient, CapacityExhausted, VideoBlock, chunk_pcm) -> Dict[str, Any]:
    block_s = 0.48
    results: List[Dict[str, Any]] = []
    errors: List[str] = []
    with AvatarClient(address, application=APP, timeout=300) as client:
        sessions = []
        for i in range(args.capacity):
            sessions.append(client.session(_image(i), seed=i, idle_mode="wait_for_audio"))

        def stream(i: int, s) -> None:
            try:
                start = time.monotonic()
                blocks = [b for b in s.stream(chunk_pcm(_speech(args.seconds, i), chunk_ms=40), realtime=True,
                                              timeout=600) if isinstance(b, VideoBlock)]
                arrivals = [b.received_at for b in blocks]
                n = len(blocks)
                span = arrivals[-1] - arrivals[0] + block_s if n else float("nan")
                lag = [b.received_at - (start + (b.pts_ms / 1000.0 + block_s)) for b in blocks]
                results.append({"blocks": n, "rtf": n * block_s / span if n else 0.0,
                                "ttff_s": arrivals[0] - start if n else None, "lag_p95_s": _pct(lag, 95)})
            except BaseException as exc:  # noqa: BLE001 - reported in the JSON
                errors.append(f"{type(exc).__name__}: {exc}")

        streams = [threading.Thread(target=stream, args=(i, s), daemon=True) for i, s in enumerate(sessions)]
        for t in streams:
            t.start()
        time.sleep(min(2.0, args.seconds / 4))  # streams running: the pipeline is busy while we knock

        refused_ms: List[float] = []
        admitted_extra: List[Any] = []
        hints: List[float] = []
        lock = threading.Lock()
        todo = list(range(args.attempts))

        def knock() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    k = todo.pop()
                t = time.perf_counter()
                try:
                    h = client.create_session(_image(1000 + k), seed=k)
                    with lock:
                        admitted_extra.append(h)
                except CapacityExhausted as exc:
                    with lock:
                        refused_ms.append((time.perf_counter() - t) * 1000)
                        if exc.retry_after_s is not None:
                            hints.append(exc.retry_after_s * 1000)

        knockers = [threading.Thread(target=knock, daemon=True) for _ in range(args.concurrency)]
        for t in knockers:
            t.start()
        for t in knockers:
            t.join(300)
        for t in streams:
            t.join(args.seconds * 10 + 120)
        for h in admitted_extra:
            client.close_session(h)
        for s in sessions:
            s.close()
    rtf = [r["rtf"] for r in results]
    return {
        "capacity_sessions": args.capacity,
        "attempts": args.capacity + args.attempts,
        "admitted": len(sessions) + len(admitted_extra),
        "refused": len(refused_ms),
        "refusal_p50_ms": _pct(refused_ms, 50),
        "refusal_p99_ms": _pct(refused_ms, 99),
        "refusal_max_ms": round(max(refused_ms), 3) if refused_ms else None,
        "refusal_target_p99_ms": TARGET_REFUSAL_P99_MS,
        "refusal_target_met": bool(refused_ms) and _pct(refused_ms, 99) <= TARGET_REFUSAL_P99_MS,
        "retry_after_ms": round(float(np.median(hints)), 1) if hints else None,
        "admitted_realtime_factor_min": round(min(rtf), 4) if rtf else None,
        "admitted_realtime_factor_mean": round(float(np.mean(rtf)), 4) if rtf else None,
        "admitted_ttff_s_p50": _pct([r["ttff_s"] for r in results if r["ttff_s"] is not None], 50),
        "admitted_lag_p95_s_max": max((r["lag_p95_s"] for r in results if r["lag_p95_s"] is not None), default=None),
        "admitted_blocks": [r["blocks"] for r in results],
        "stream_errors": errors,
        "seconds_per_session": args.seconds,
        "concurrency": args.concurrency,
        "model": args.model,
        "denoise_steps": args.steps,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--capacity", type=int, default=3, help="session slots per stage replica (one replica per stage)")
    p.add_argument("--attempts", type=int, default=60, help="CreateSession calls fired at saturation")
    p.add_argument("--concurrency", type=int, default=4, help="threads firing them")
    p.add_argument("--seconds", type=float, default=8.0, help="audio streamed per admitted session, in real time")
    p.add_argument("--steps", type=int, default=1, help="denoising stages (tiny model)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--retry-after-ms", type=int, default=2000)
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    args = p.parse_args(argv)
    if args.capacity < 1 or args.attempts < 1 or args.concurrency < 1 or args.seconds <= 0:
        p.error("--capacity, --attempts, --concurrency must be >= 1 and --seconds > 0")
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:32s} {v}")
    return 0 if not out.get("stream_errors") else 1


if __name__ == "__main__":
    sys.exit(main())
