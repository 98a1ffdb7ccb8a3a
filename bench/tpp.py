"""TPP data-plane benchmark: pipelined vs sequential block throughput through synthetic stages.

Deploys `--stages` SyntheticStage deployments (4 denoise steps + VAE by default) with Ray Serve on
a private local Ray cluster, registers them in a private redis-server, opens one session through
our gRPC data plane and measures:

- pipelined throughput: blocks sent as fast as back-pressure allows; steady state is measured
  between the outputs of block `--warmup` and the last block;
- sequential throughput: the same stages, one block at a time (send, wait for its output);
- speedup = pipelined / sequential, ideal = number of stages, efficiency = speedup / ideal;
- hop latency (transport only, holds excluded): next.recv - prev.end from the per-hop stamps of a
  405,504-byte bf16 latent [16,3,48,88]. `hop_*` are stage->stage hops during pipelined steady
  state; `hop_seq_*` are all hops (caller->head included) with one block in flight;
  `return_*` is tail -> caller (relayed up through every hop);
- ttff_s: first block sent -> first output received.

`--mode inproc` runs the same chain as in-process StageHosts (no Ray), for quick checks.
Prints ONE JSON object with `--json` (a readable summary otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.support.* (synthetic stages)
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from avatarserve.serve.ops.launcher import free_port

LATENT_SHAPE = (16, 3, 48, 88)


class RedisProcess:
    """A throwaway redis-server on a free loopback port, no persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("bench/tpp.py: redis-server not found on PATH")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit("bench/tpp.py: redis-server did not start")
                time.sleep(0.05)
        client.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def stage_names(n: int) -> list[str]:
    if n < 2:
        raise SystemExit("--stages must be >= 2")
    return [f"DenoiseStage{i}" for i in range(n - 1)] + ["VaeDecoder"]


def _pct(xs: list[float], q: float) -> Optional[float]:
    return round(float(np.percentile(xs, q)), 3) if xs else None


@dataclass
class RunResult:
    send_t: list[float]
    recv_t: list[float]
    recv_unix_ns: list[int]
    items: list[Any]


async def pipelined_run(client: Any, route: list[str], sid: str, blocks: list[Any]) -> RunResult:
    session = await client.open(sid, route)
    send_t: list[float] = []
    recv_t: list[float] = []
    recv_ns: list[int] = []
    items: list[Any] = []

    async def produce() -> None:
        for b in blocks:
            send_t.append(time.perf_counter())
            await session.send(b)
        await session.end()

    producer = asyncio.create_task(produce())
    async for item in session:
        recv_t.append(time.perf_counter())
        recv_ns.append(time.time_ns())
        items.append(item)
    await producer
    return RunResult(send_t, recv_t, recv_ns, items)


async def sequential_run(client: Any, route: list[str], sid: str, blocks: list[Any]) -> RunResult:
    session = await client.open(sid, route)
    res = RunResult([], [], [], [])
    for b in blocks:
        res.send_t.append(time.perf_counter())
        await session.send(b)
        item = await session.receive()
        res.recv_t.append(time.perf_counter())
        res.recv_unix_ns.append(time.time_ns())
        res.items.append(item)
    await session.end()
    assert await session.receive() is None
    return res


def hop_latencies_ms(items: list[Any], *, include_caller: bool) -> list[float]:
    out = []
    for it in items:
        st = it.stamps
        first = 0 if include_caller else 1
        out += [(st[k + 1].recv_unix_ns - st[k].end_unix_ns) / 1e6 for k in range(first, len(st) - 1)]
    return out


async def measure(route: list[str], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from avatarserve.serve.dataplane.transport import BlockItem, PipelineClient, TransportOptions, WireTensor

    lat = WireTensor.from_torch(torch.randn(LATENT_SHAPE).to(torch.bfloat16))
    tensors: dict[str, Any] = {"latent": lat}
    if args.audio_bytes:
        tensors["audio"] = WireTensor("uint8", (args.audio_bytes,), os.urandom(args.audio_bytes))
    n_stages = len(route)
    async with PipelineClient(TransportOptions(queue_size=args.queue_size)) as client:
        pipe = await pipelined_run(client, route, "bench-pipelined", [BlockItem(i, dict(tensors), pts_ms=480 * i) for i in range(args.blocks)])
        seq_blocks = [BlockItem(i, dict(tensors), pts_ms=480 * i) for i in range(args.seq_blocks + 1)]
        seq = await sequential_run(client, route, "bench-sequential", seq_blocks)

    for res in (pipe, seq):
        if [it.block_index for it in res.items] != list(range(len(res.items))):
            raise SystemExit("bench/tpp.py: outputs out of order")
    w = args.warmup
    steady = pipe.recv_t[w:]
    pipelined_bps = (len(steady) - 1) / (steady[-1] - steady[0])
    seq_times = seq.recv_t[-1] - seq.recv_t[0]  # excludes the first (warm-up) block
    sequential_bps = args.seq_blocks / seq_times
    speedup = pipelined_bps / sequential_bps
    hop = hop_latencies_ms(pipe.items[w:], include_caller=False)
    hop_seq = hop_latencies_ms(seq.items[1:], include_caller=True)
    ret = [(ns - it.stamps[-1].end_unix_ns) / 1e6 for ns, it in zip(seq.recv_unix_ns[1:], seq.items[1:])]
    return {
        "pipelined_blocks_per_s": round(pipelined_bps, 4),
        "sequential_blocks_per_s": round(sequential_bps, 4),
        "speedup": round(speedup, 3),
        "ideal": n_stages,
        "efficiency": round(speedup / n_stages, 4),
        "ttff_s": round(pipe.recv_t[0] - pipe.send_t[0], 4),
        "hop_p50_ms": _pct(hop, 50),
        "hop_p99_ms": _pct(hop, 99),
        "hop_samples": len(hop),
        "hop_seq_p50_ms": _pct(hop_seq, 50),
        "hop_seq_p99_ms": _pct(hop_seq, 99),
        "return_p50_ms": _pct(ret, 50),
        "return_p99_ms": _pct(ret, 99),
        "pipelined_block_period_ms": round(1000 / pipelined_bps, 3),
        "sequential_block_period_ms": round(1000 / sequential_bps, 3),
    }


async def run_inproc(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    from avatarserve.serve.dataplane.stage_host import StageHost, StageHostConfig
    from tests.support.synthetic import SyntheticStage
    from avatarserve.serve.dataplane.transport import TransportOptions

    hosts = []
    t0 = time.perf_counter()
    try:
        for name in stage_names(args.stages):
            host = StageHost(SyntheticStage(args.hold_ms / 1000, name=name), StageHostConfig(name=name, transport=TransportOptions(queue_size=args.queue_size)))
            await host.start()
            hosts.append(host)
        startup = {"hosts_s": round(time.perf_counter() - t0, 3)}
        return await measure([h.address for h in hosts], args), startup
    finally:
        for h in hosts:
            await h.stop()


def run_ray(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    # A private loopback cluster: token auth (default since Ray 2.59) is disabled on purpose.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from avatarserve.serve.control.registry import ReplicaRegistry
    from avatarserve.serve.dataplane.stages import StageSpec
    from tests.support.pipeline_app import SYNTHETIC, PipelineAppConfig, build_pipeline_app

    redis_proc = RedisProcess()
    try:
        t0 = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, object_store_memory=150 * 1024 * 1024)
        t1 = time.perf_counter()
        try:
            serve.start(proxy_location="Disabled")  # handles only: no HTTP/gRPC proxy ports to collide
            names = stage_names(args.stages)
            config = PipelineAppConfig(
                stages=[
                    StageSpec(n, SYNTHETIC, handler_config={"hold_ms": args.hold_ms}, num_cpus=args.stage_cpus, queue_size=args.queue_size)
                    for n in names
                ],
                redis_url=redis_proc.url,
                namespace="bench:",
                name="tpp-bench",
            )
            serve.run(build_pipeline_app(config), name="tpp-bench", route_prefix=None)
            t2 = time.perf_counter()

            async def go() -> dict[str, Any]:
                async with ReplicaRegistry.from_url(redis_proc.url, namespace="bench:") as reg:
                    route = [(await reg.pick_least_loaded(n)).address for n in names]
                return await measure(route, args)

            result = asyncio.run(go())
            startup = {"ray_init_s": round(t1 - t0, 2), "serve_run_s": round(t2 - t1, 2)}
            return result, startup
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        redis_proc.stop()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--mode", choices=("ray", "inproc"), default="ray")
    p.add_argument("--hold-ms", type=float, default=200.0, help="per-stage hold per block (T)")
    p.add_argument("--stages", type=int, default=5, help="pipelined stages (denoise steps + VAE)")
    p.add_argument("--blocks", type=int, default=30, help="blocks in the pipelined run")
    p.add_argument("--warmup", type=int, default=5, help="pipelined outputs ignored before steady state")
    p.add_argument("--seq-blocks", type=int, default=6, help="blocks timed in the sequential baseline")
    p.add_argument("--queue-size", type=int, default=2)
    p.add_argument("--audio-bytes", type=int, default=0, help="extra per-block payload (audio features)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--stage-cpus", type=float, default=0.1, help="num_cpus per stage replica")
    args = p.parse_args(argv)
    if args.blocks < args.warmup + 3:
        p.error("--blocks must exceed --warmup by at least 3")
    if args.seq_blocks < 2:
        p.error("--seq-blocks must be >= 2")

    import grpc

    # Ray's log monitor writes to fd 1: keep stdout for the one JSON object.
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        if args.mode == "ray":
            result, startup = run_ray(args)
        else:
            result, startup = asyncio.run(run_inproc(args))
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)
    import ray as _ray

    out = {
        "bench": "tpp",
        **result,
        "targets": {"efficiency_min": 0.9, "hop_p50_ms_max": 5.0},
        "params": {
            "mode": args.mode,
            "hold_ms": args.hold_ms,
            "stages": args.stages,
            "stage_names": stage_names(args.stages),
            "blocks": args.blocks,
            "warmup": args.warmup,
            "seq_blocks": args.seq_blocks,
            "queue_size": args.queue_size,
            "latent_shape": list(LATENT_SHAPE),
            "latent_dtype": "bfloat16",
            "latent_bytes": int(np.prod(LATENT_SHAPE)) * 2,
            "audio_bytes": args.audio_bytes,
            "num_cpus": args.num_cpus if args.mode == "ray" else None,
            "host_cpus": os.cpu_count(),
            "ray": _ray.__version__,
            "grpcio": grpc.__version__,
        },
        "startup": startup,
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>28}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
