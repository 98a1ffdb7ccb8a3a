"""Serving efficiency: the most real-time sessions the local cluster sustains vs the machine's limit, measured in one
run, before (one block per forward) and after (cross-session batching) in the same run.

1. **The machine's limit**: the sequential pipeline (one process, every core's torch threads) running `n` sessions
   in lockstep, each denoising step one forward for all of them (`SequentialPipeline.run_blocks`), for n in
   `--batches`: frames per second at the best n, divided by 25 = real-time sessions the machine's compute allows.
2. **The cluster**: a private local cluster (redis-server, Ray, Serve with its gRPC proxy) with the default model
   (`toy`), one replica per stage as `deploy/local.yaml` starts it (`--vae-replicas` for the decoder), deployed once
   per `--max-batch` value (`scheduling.max_batch`). For n = 1, 2, ... sessions streaming `--seconds` of speech
   paced in real time at once: the sessions are *sustained* when every one has a delivered real-time factor >=
   `--min-rtf` (media seconds delivered / wall seconds from the first to the last chunk plus one block, as
   bench/scale.py) and a p99 delivery lag behind its audio <= `--max-lag-s`. The probe stops at the first n that is
   not sustained.
3. `serving_efficiency = sustained_sessions / limit_sessions`, per `--max-batch` value.

Prints ONE JSON object with `--json` (a readable summary otherwise).

    python bench/capacity.py --json [--seconds 20] [--max-sessions 4] [--max-batch 1,4] [--batches 1,2,4]
    python bench/capacity.py --json --max-batch 1 --direct-ingress   # the gateway without Serve's gRPC proxy
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

APP = "avatarcapacity-bench"
BENCH = Path(__file__).resolve().parent


def _scale():
    """bench/scale.py's helpers (free ports, percentiles, speech-like audio, face images, logging)."""
    spec = importlib.util.spec_from_file_location("avatarserve_bench_scale", BENCH / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine_limit(model: str, batches: List[int], blocks: int, warmup: int, threads: int) -> Dict[str, Any]:
    """Frames per second of the sequential pipeline per lockstep batch size -> the best, and /25 sessions."""
    import torch

    from avatarserve.engine.bundle import build_bundle
    from avatarserve.engine.pipeline import SequentialPipeline

    sc = _scale()
    torch.set_num_threads(threads)
    pipe = SequentialPipeline(build_bundle(model, seed=0))
    st = pipe.stream
    rows = []
    for n in batches:
        sids = [f"limit-{n}-{i}" for i in range(n)]
        for i, sid in enumerate(sids):
            sink = pipe.decoder.prepare_sink(sc._image(i), pipe.bundle.encode_prompt("a person talking"), i)
            pipe.audio.create(sid)
            for stage in pipe.stages:
                stage.create(sid, sink)
            pipe.decoder.create(sid, sink)
            pcm = sc._speech((blocks + warmup) * st.block_seconds + 0.1, i).astype(np.float32) / 32768.0
            pipe.audio.push(sid, pcm)
        times = []
        try:
            for b in range(blocks + warmup):
                t = time.perf_counter()
                pipe.run_blocks([pipe.audio.next_block(sid) for sid in sids])
                if b >= warmup:
                    times.append(time.perf_counter() - t)
        finally:
            for sid in sids:
                for runner in (pipe.audio, *pipe.stages, pipe.decoder):
                    runner.close(sid)
        per_block = float(np.median(times))
        rows.append({"sessions_in_lockstep": n, "seconds_per_lockstep_block": round(per_block, 4),
                     "fps": round(n * st.frames_per_block / per_block, 2)})
    best = max(rows, key=lambda r: r["fps"])
    return {"model": model, "torch_threads": threads, "per_batch": rows, "best_fps": best["fps"],
            "best_batch": best["sessions_in_lockstep"], "limit_sessions": round(best["fps"] / st.fps, 3)}


def _probe(address: str, n: int, args: argparse.Namespace, sc) -> Dict[str, Any]:
    """n sessions streaming at once, paced in real time -> per-session RTF and lag."""
    from avatarserve_client import AvatarClient, VideoBlock, chunk_pcm

    block_s = 0.48
    results: List[Dict[str, Any]] = []
    errors: List[str] = []
    with AvatarClient(address, application=APP, timeout=300) as client:
        sessions = [client.session(sc._image(100 + i), seed=i, idle_mode="wait_for_audio") for i in range(n)]
        start_together = threading.Barrier(n)

        def stream(i: int, s) -> None:
            try:
                start_together.wait(120)
                start = time.monotonic()
                blocks = [b for b in s.stream(chunk_pcm(sc._speech(args.seconds, i), chunk_ms=40), realtime=True,
                                              timeout=args.seconds * 10 + 300) if isinstance(b, VideoBlock)]
                arrivals = [b.received_at for b in blocks]
                k = len(blocks)
                span = arrivals[-1] - arrivals[0] + block_s if k else float("nan")
                lag = [b.received_at - (start + b.pts_ms / 1000.0 + block_s) for b in blocks]
                results.append({"blocks": k, "rtf": round(k * block_s / span, 4) if k else 0.0,
                                "lag_p99_s": sc._pct(lag, 99), "ttff_s": round(arrivals[0] - start, 3) if k else None})
            except BaseException as exc:  # noqa: BLE001 - reported in the JSON
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=stream, args=(i, s), daemon=True) for i, s in enumerate(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in sessions:
            s.close()
    ok = (not errors and len(results) == n and all(r["rtf"] >= args.min_rtf for r in results)
          and all(r["lag_p99_s"] is not None and r["lag_p99_s"] <= args.max_lag_s for r in results))
    return {"sessions": n, "sustained": ok, "per_session": results, "errors": errors}


def cluster_capacity(args: argparse.Namespace) -> Dict[str, Any]:
    sc = _scale()  # sets Ray's environment for the private cluster: before Ray is imported
    from ray import serve

    from avatarserve.serve.builder import deploy

    out: Dict[str, Any] = {}
    with sc.private_cluster(args.num_cpus, "avatarserve-capacity-bench") as (redis_url, address):
        for max_batch in args.max_batch:
            t0 = time.monotonic()
            cfg = {"name": APP, "route_prefix": "/" + APP, "redis_url": redis_url,
                   "namespace": f"capacity{max_batch}:", "registry_namespace": f"capacity{max_batch}:",
                   "model": {"config": args.model, "seed": 0}, "torch_threads": args.torch_threads,
                   "replicas": {"gateway": 1, "audio": 1, "denoise": 1, "vae": args.vae_replicas},
                   "capacity": dict.fromkeys(("audio", "denoise", "vae"), max(8, args.max_sessions)),
                   "resources": {r: {"num_cpus": 0.1} for r in ("gateway", "audio", "denoise", "vae")},
                   # configured: the probes go past what admission by measurement would take, to find where real
                   # time breaks; what it would take is recorded (`measured_admission`) to compare.
                   "scheduling": {"max_batch": max_batch, "admit_by": "configured"},
                   "autoscaling": {"enabled": False},
                   "ops": {"enabled": False}, "auth": {"mode": "disabled"}}
            deploy(cfg)
            sc._log(f"max_batch {max_batch}: cluster up in {time.monotonic() - t0:.1f} s")
            at_start = _measured_capacities(_stage_statuses())
            probes = []
            for n in range(1, args.max_sessions + 1):
                probe = _probe(args.direct_grpc_address or address, n, args, sc)
                sc._log(f"max_batch {max_batch}: {n} session(s): sustained={probe['sustained']} "
                        f"rtf={[r['rtf'] for r in probe['per_session']]} errors={probe['errors']}")
                probes.append(probe)
                if not probe["sustained"]:
                    break
            sustained = max((p["sessions"] for p in probes if p["sustained"]), default=0)
            statuses = _stage_statuses()
            after = _measured_capacities(statuses)
            out[str(max_batch)] = {
                "sustained_sessions": sustained, "probes": probes, "batch_limit_after_probes": _batch_limits(statuses),
                # sessions admission by measurement (scheduling.admit_by: measured) would take: the smallest stage's
                # measured real-time capacity, as timed at start-up and after the probes' live blocks
                "measured_admission": {"at_start": min(at_start.values(), default=None),
                                       "after_probes": min(after.values(), default=None),
                                       "per_stage_at_start": at_start, "per_stage_after_probes": after}}
            serve.delete(APP)
    return out


def _stage_statuses() -> Dict[str, Dict[str, Any]]:
    """Each stage deployment's status (its one replica's)."""
    from ray import serve

    names = [d for d in serve.status().applications[APP].deployments if d not in ("Gateway", "SinkFrameCache")]
    return {name: serve.get_deployment_handle(name, app_name=APP).status.remote().result(timeout_s=120)
            for name in names}


def _measured_capacities(statuses: Dict[str, Dict[str, Any]]) -> Dict[str, Optional[int]]:
    """Each stage deployment's measured real-time capacity."""
    out = {name: status.get("measured_capacity") for name, status in statuses.items()}
    return {k: v for k, v in out.items() if v is not None}


def _batch_limits(statuses: Dict[str, Dict[str, Any]]) -> Dict[str, Optional[int]]:
    """The batch size each stage uses by its measured costs (at most scheduling.max_batch)."""
    return {name: (status.get("scheduler") or {}).get("batch_limit") for name, status in statuses.items()}


def _direct_ingress_env() -> str:
    """Environment for Serve's direct ingress, set before the private cluster starts (its processes inherit it):
    each ingress replica takes a port from a range (Serve's maximum is exclusive); a range of one free port puts the
    one gateway replica on it."""
    from avatarserve.serve.ops.launcher import free_port

    grpc_port, http_port = free_port(), free_port()
    os.environ.update({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                       "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_port),
                       "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_port + 1),
                       "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_port),
                       "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_port + 1)})
    return f"127.0.0.1:{grpc_port}"


def _ints(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {text!r}")
    return values


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy", help="model preset (default: the embedded toy model)")
    p.add_argument("--seconds", type=float, default=20.0, help="speech per session per probe")
    p.add_argument("--max-sessions", type=int, default=4, help="largest number of sessions probed")
    p.add_argument("--max-batch", type=_ints, default=[1, 4], help="scheduling.max_batch values, e.g. 1,4")
    p.add_argument("--batches", type=_ints, default=[1, 2, 4], help="lockstep sessions of the sequential limit")
    p.add_argument("--limit-blocks", type=int, default=8, help="timed blocks of the sequential limit")
    p.add_argument("--min-rtf", type=float, default=0.98,
                   help="delivered real-time factor every session needs (1.0 less 2%% for the jitter of the first and "
                        "last arrival over a probe; the lag bound is what rules out drifting)")
    p.add_argument("--max-lag-s", type=float, default=3.0, help="p99 delivery lag behind the audio every session "
                                                               "needs (the default late_after_s)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs offered to Ray (as deploy/local.yaml)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per stage replica (app.torch_threads)")
    p.add_argument("--vae-replicas", type=int, default=1, help="VaeDecoder replicas (the autoscaler of "
                                                               "deploy/local.yaml runs up to 2)")
    p.add_argument("--direct-ingress", action="store_true",
                   help="Serve's experimental direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1): the gateway replica "
                        "serves the gRPC API itself and no proxy runs, so audio chunks skip the proxy's Ray call")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.max_sessions < 1 or args.torch_threads < 1:
        p.error("--seconds must be > 0, --max-sessions >= 1 and --torch-threads >= 1")
    args.direct_grpc_address = _direct_ingress_env() if args.direct_ingress else None
    t0 = time.monotonic()
    limit = machine_limit(args.model, args.batches, args.limit_blocks, 2, os.cpu_count() or 1)
    _scale()._log(f"machine limit: {limit['best_fps']} fps at {limit['best_batch']} in lockstep = "
                  f"{limit['limit_sessions']} real-time sessions")
    # Ray writes its own lines to this process's stdout (at shutdown too): keep stdout for the one JSON object.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        cluster = cluster_capacity(args)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    result = {"bench": "capacity", "model": args.model, "cpus": os.cpu_count(), "seconds_per_probe": args.seconds,
              "replica_torch_threads": args.torch_threads, "vae_replicas": args.vae_replicas,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "direct_ingress": args.direct_ingress,
              "criteria": {"min_rtf": args.min_rtf, "max_lag_p99_s": args.max_lag_s}, "limit": limit,
              "cluster": cluster,
              "serving_efficiency": {mb: round(c["sustained_sessions"] / limit["limit_sessions"], 3)
                                     for mb, c in cluster.items()},
              "seconds": round(time.monotonic() - t0, 1)}
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps({k: result[k] for k in ("limit", "serving_efficiency")}, indent=1))
        for mb, c in cluster.items():
            print(f"max_batch {mb}: sustained {c['sustained_sessions']} session(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
