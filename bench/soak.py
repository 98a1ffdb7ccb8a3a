"""Soak benchmark: one live session for `--minutes`, with pauses and interrupts on a schedule, while the memory of
every cluster process is sampled.

Brings up a private local cluster with `avatarserve up` (deploy/local.yaml by default: redis-server + Ray head +
the Serve app with the embedded toy model; torn down with `avatarserve down` at the end, also on errors), opens ONE
session in the live idle mode (IDLE_MODE_FILL_SILENCE) and streams to it for `--minutes`:

- a repeating schedule of `--speech-s` seconds of speech-like audio sent in `--chunk-ms` chunks paced in real time
  (`--lead-ms` ahead), then `--pause-s` seconds of nothing (the server fills silence: idle blocks); every
  `--interrupt-every`-th speech segment is cut by an INTERRUPT half-way through;
- every `--sample-s` seconds: VmRSS (/proc/<pid>/status) of every process of the cluster: the Ray workers hosting
  Serve replicas (named by deployment), the Serve proxy and controller, raylet, GCS and Ray's agents (every process
  in the Ray head's session), and redis-server; plus Redis' INFO `used_memory`.

Per process: RSS at the end of the warm-up (`--warmup-minutes`, "minute 5" of the full run) and at the end, each the
median over `--window-minutes` (3) of samples, growth % between the two, max. Pass criterion: growth <=
`--max-growth-pct` (2 %) per process; reported, not asserted.
A process whose pid changed during the run (a replica restart) is reported under `restarted`.

Also the session's delivered real-time factor (media seconds delivered / wall seconds) and delivery lag (arrival
minus the end of the block's span on the stream clock, re-anchored at each INTERRUPTED like the server does), per
minute and overall.

    python bench/soak.py --json                                  # 30 minutes
    python bench/soak.py --json --minutes 3 --warmup-minutes 1   # a short check

Prints ONE JSON object (with `--json`; indented otherwise). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from adapter_pipecat import _speech  # noqa: E402 - one speech-like test signal for the benches

SR = 16000
BLOCK_S = 0.48
# Bounds on waits of the session itself (not the soak's length): a busy 2-core machine is slow, not broken.
FIRST_BLOCK_WAIT_S = 300.0
DRAIN_WAIT_S = 300.0


def _log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


def _pct(xs: List[float], q: float) -> Optional[float]:
    return round(float(np.percentile(xs, q)), 3) if xs else None


# ------------------------------------------------------------------------------------------------ processes


def rss_bytes(pid: int) -> Optional[int]:
    """VmRSS of `pid` from /proc (None when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _session_id(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2:].split()[3])  # fields after "(comm)": state ppid pgrp session
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> List[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError):
        return []


def process_name(cmd: List[str]) -> Optional[str]:
    """A stable name for a cluster process from its command line (None: not one we name)."""
    if not cmd:
        return None
    head = cmd[0]
    if head.startswith("ray::"):  # a Ray worker's title: ray::ServeReplica:<app>:<Deployment>[.<method>]
        title = head[len("ray::"):].split()[0]
        if title.startswith("ServeReplica:"):
            return "replica:" + title.split(":")[-1].split(".")[0]
        return title.split(".")[0]  # ProxyActor, ServeController, DashboardAgent, RuntimeEnvAgent, IDLE, ...
    joined = " ".join(cmd[:3])
    for needle, name in (("gcs_server", "gcs_server"), ("raylet/raylet", "raylet"), ("redis-server", "redis-server"),
                         ("log_monitor.py", "log_monitor"), ("autoscaler/_private/monitor.py", "autoscaler_monitor"),
                         ("dashboard/dashboard.py", "dashboard"), ("ray.scripts.scripts", "ray_start"),
                         ("dashboard/agent.py", "dashboard_agent"), ("runtime_env/agent", "runtime_env_agent")):
        if needle in joined:
            return name
    script = next((Path(a).stem for a in cmd[1:] if a.endswith(".py")), None)  # python <path>/<script>.py ...
    return "other:" + (script or Path(head).name)


def cluster_processes(ray_session: int, extra: Dict[int, str]) -> Dict[int, str]:
    """pid -> name of every live process in the Ray head's session, plus `extra` (redis-server)."""
    out: Dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if _session_id(pid) != ray_session:
            continue
        name = process_name(_cmdline(pid))
        if name is not None:
            out[pid] = name
    for pid, name in extra.items():
        if rss_bytes(pid) is not None:
            out[pid] = name
    return out


class MemorySampler:
    """Samples RSS of every cluster process and Redis' used_memory every `interval_s` on a thread."""

    def __init__(self, ray_session: int, redis_pid: Optional[int], redis_url: str, interval_s: float):
        self.ray_session = ray_session
        self.extra = {redis_pid: "redis-server"} if redis_pid else {}
        self.redis_url = redis_url
        self.interval_s = interval_s
        self.t0 = time.monotonic()
        self.series: Dict[Tuple[str, int], List[Tuple[float, int]]] = {}  # (name, pid) -> [(t_s, rss)]
        self.pids: Dict[str, List[int]] = {}  # name -> pids seen in order (more than one: restarted / replaced)
        self.redis_used: List[Tuple[float, int]] = []
        self.errors: List[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def start(self) -> "MemorySampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval_s * 3 + 10)

    def _run(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            while True:
                self.sample(client)
                if self._stop.wait(self.interval_s):
                    self.sample(client)  # one last sample at the end
                    return
        finally:
            client.close()

    def sample(self, client: Any) -> None:
        t = round(time.monotonic() - self.t0, 1)
        procs = cluster_processes(self.ray_session, self.extra)
        for pid, name in sorted(procs.items()):
            seen = self.pids.setdefault(name, [])
            if pid not in seen:
                seen.append(pid)
            rss = rss_bytes(pid)
            if rss is not None:
                self.series.setdefault((name, pid), []).append((t, rss))
        try:
            self.redis_used.append((t, int(client.info("memory")["used_memory"])))
        except Exception as exc:  # noqa: BLE001 - reported
            self.errors.append(f"redis INFO at {t} s: {type(exc).__name__}: {exc}")

    def report(self, warmup_s: float, max_growth_pct: float, window_s: float) -> Dict[str, Any]:
        procs: Dict[str, Any] = {}
        for (name, pid), pts in sorted(self.series.items()):
            key = name if len(self.pids[name]) == 1 else f"{name}#{pid}"  # named by pid only when several share it
            procs[key] = _growth(pts, warmup_s, max_growth_pct, scale=1 / 2**20, unit="mib", window_s=window_s)
        redis_mem = _growth(self.redis_used, warmup_s, max_growth_pct, scale=1 / 2**20, unit="mib", window_s=window_s)
        failing = sorted(k for k, v in procs.items() if v.get("pass") is False)
        return {
            "processes": procs,
            "redis_used_memory": redis_mem,
            "restarted": {n: p for n, p in self.pids.items() if len(p) > 1 and not n.startswith(("other:", "IDLE"))},
            "processes_over_growth_limit": failing,
            "pass": not failing and all(len(p) == 1 for n, p in self.pids.items() if n.startswith("replica:")),
            "samples": len(self.redis_used),
            "sampler_errors": self.errors[:20],
        }

    def write_series(self, path: str) -> None:
        """Every sample, one JSON line per process (and one for Redis' used_memory): for plotting a run's shape."""
        with open(path, "w") as f:
            for (name, pid), pts in sorted(self.series.items()):
                f.write(json.dumps({"name": name, "pid": pid, "t_s": [t for t, _ in pts],
                                    "rss": [v for _, v in pts]}) + "\n")
            f.write(json.dumps({"name": "redis used_memory", "pid": None, "t_s": [t for t, _ in self.redis_used],
                                "rss": [v for _, v in self.redis_used]}) + "\n")


def _growth(pts: List[Tuple[float, int]], warmup_s: float, limit_pct: float, *, scale: float, unit: str,
            window_s: float) -> Dict[str, Any]:
    """Growth from the end of the warm-up to the end of the run, each taken as the median of the samples in a window
    of `window_s` (the first window after the warm-up, the last one of the run): Python and Ray processes swing by
    a few MiB as their collectors and buffers cycle (Serve's controller: 159-164 MiB over ~8 minutes), so two single
    samples measure the phase of that swing as much as any growth. Also the single-sample growth, the growth over the
    second half of the measured span (a cache filling up grows early and stops, a leak keeps growing) and the max."""
    after = [(t, v) for t, v in pts if t >= warmup_s]
    if not pts:
        return {"pass": None, "note": "never sampled"}
    if len(after) < 2:
        return {f"end_{unit}": round(pts[-1][1] * scale, 2), f"max_{unit}": round(max(v for _, v in pts) * scale, 2),
                "pass": None, "note": "too few samples after the warm-up (short-lived process)",
                "first_s": pts[0][0], "last_s": pts[-1][0]}
    (t_a, a), (t_b, b) = after[0], after[-1]

    def median_within(lo: float, hi: float, near: float) -> float:
        inside = [v for t, v in after if lo <= t <= hi]
        return float(np.median(inside)) if inside else float(min(after, key=lambda p: abs(p[0] - near))[1])

    first = median_within(t_a, t_a + window_s, t_a)
    last = median_within(t_b - window_s, t_b, t_b)
    t_mid = (t_a + t_b) / 2
    mid = median_within(t_mid - window_s / 2, t_mid + window_s / 2, t_mid)

    def pct(x: float, y: float) -> float:
        return round(100.0 * (y - x) / x, 2) if x else 0.0

    growth = pct(first, last)
    return {f"at_warmup_{unit}": round(first * scale, 2), f"end_{unit}": round(last * scale, 2),
            "growth_pct": growth, "second_half_growth_pct": pct(mid, last), "single_sample_growth_pct": pct(a, b),
            f"max_{unit}": round(max(v for _, v in pts) * scale, 2),
            "warmup_sample_s": t_a, "end_sample_s": t_b, "window_s": window_s, "pass": growth <= limit_pct}


# ------------------------------------------------------------------------------------------------ the session




async def run_session(address: str, image: bytes, args: argparse.Namespace, application: str) -> Dict[str, Any]:
    """Stream the schedule for `args.minutes`; returns per-block arrival records and the schedule's events."""
    from avatarserve_client import AsyncAvatarClient, StatusEvent, VideoBlock

    inbox: asyncio.Queue = asyncio.Queue()
    chunk = int(args.chunk_ms * SR / 1000)
    speech = _speech(args.speech_s, seed=1)
    blocks: List[Dict[str, Any]] = []
    events: List[Dict[str, Any]] = []
    schedule: Dict[str, int] = {"speech_segments": 0, "pauses": 0, "interrupts": 0, "chunks_sent": 0}
    anchor: List[float] = []  # wall time of stream-clock 0 (moved earlier at each INTERRUPTED, like the server)

    async def source():
        while (item := await inbox.get()) is not None:
            yield item

    async def pace(s, end_at: float) -> None:
        """The schedule: speech paced in real time (`lead_ms` ahead), pauses, an INTERRUPT every n-th segment."""
        segment = 0
        while time.monotonic() < end_at:
            segment += 1
            schedule["speech_segments"] += 1
            cut = args.interrupt_every and segment % args.interrupt_every == 0
            start = time.monotonic()
            for i, off in enumerate(range(0, len(speech), chunk)):
                if cut and off >= len(speech) // 2:
                    await s.interrupt()
                    schedule["interrupts"] += 1
                    break
                due = start + i * args.chunk_ms / 1000 - args.lead_ms / 1000
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                await inbox.put(speech[off:off + chunk].tobytes())
                schedule["chunks_sent"] += 1
                if time.monotonic() >= end_at:
                    return
            schedule["pauses"] += 1
            await asyncio.sleep(max(0.0, min(args.pause_s, end_at - time.monotonic())))

    async with AsyncAvatarClient(address, application=application, timeout=120, api_key=args.api_key) as client:
        async with client.session(image, "a person talking", seed=7, formats=("jpeg",),
                                  idle_mode="fill_silence") as s:
            stream = s.stream(source(), end_of_input=False, include_events=True, decode=False)
            it = stream.__aiter__()
            t_start = time.monotonic()
            end_at = t_start + args.minutes * 60
            pacer: Optional[asyncio.Task] = None
            try:
                while True:
                    timeout = FIRST_BLOCK_WAIT_S if not blocks else DRAIN_WAIT_S
                    try:
                        item = await asyncio.wait_for(it.__anext__(), timeout)
                    except StopAsyncIteration:
                        break
                    now = time.monotonic()
                    if isinstance(item, StatusEvent):
                        kind = item.kind.name if hasattr(item.kind, "name") else str(item.kind)
                        if kind.endswith("STARTED") and not anchor:
                            anchor.append(now)
                            end_at = now + args.minutes * 60
                            pacer = asyncio.create_task(pace(s, end_at))
                        elif kind.endswith("INTERRUPTED") and anchor:
                            anchor[0] = min(anchor[0], now - item.pts_ms / 1000)
                        events.append({"t_s": round(now - t_start, 3), "kind": kind, "pts_ms": item.pts_ms})
                        continue
                    if isinstance(item, VideoBlock):
                        lag = now - (anchor[0] + item.pts_ms / 1000 + BLOCK_S) if anchor else None
                        blocks.append({"t": now, "pts_ms": item.pts_ms, "idle": bool(item.is_idle), "lag_s": lag})
                    if pacer is not None and pacer.done():
                        pacer.result()  # raise what the pacer raised
                        pacer = None
                        await inbox.put(None)
                        await s.end_of_input()
            finally:
                if pacer is not None and not pacer.done():
                    pacer.cancel()
    return {"blocks": blocks, "events": events, "schedule": schedule, "t_start": t_start,
            "t_stream": anchor[0] if anchor else t_start}


def session_report(res: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    blocks = res["blocks"]
    if not blocks:
        return {"error": "no video delivered"}
    t0 = res["t_stream"]
    per_minute = []
    minutes = int(np.ceil((blocks[-1]["t"] - t0) / 60)) or 1
    for m in range(minutes):
        lo, hi = t0 + 60 * m, t0 + 60 * (m + 1)
        inside = [b for b in blocks if lo <= b["t"] < hi]
        span = min(hi, blocks[-1]["t"]) - lo
        lags = [b["lag_s"] for b in inside if b["lag_s"] is not None]
        per_minute.append({"minute": m + 1, "blocks": len(inside), "idle_blocks": sum(b["idle"] for b in inside),
                           "realtime_factor": round(len(inside) * BLOCK_S / span, 4) if span > 0 else None,
                           "lag_p50_s": _pct(lags, 50), "lag_p95_s": _pct(lags, 95),
                           "lag_max_s": round(max(lags), 3) if lags else None})
    lags = [b["lag_s"] for b in blocks if b["lag_s"] is not None]
    wall = blocks[-1]["t"] - blocks[0]["t"] + BLOCK_S
    kinds: Dict[str, int] = {}
    for e in res["events"]:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    return {
        "blocks_delivered": len(blocks), "idle_blocks": sum(b["idle"] for b in blocks),
        "media_s": round(len(blocks) * BLOCK_S, 2), "wall_s": round(wall, 2),
        "realtime_factor": round(len(blocks) * BLOCK_S / wall, 4),
        "ttff_s": round(blocks[0]["t"] - t0, 3),
        "lag_p50_s": _pct(lags, 50), "lag_p95_s": _pct(lags, 95), "lag_p99_s": _pct(lags, 99),
        "lag_max_s": round(max(lags), 3) if lags else None,
        "per_minute": per_minute, "schedule": res["schedule"], "events": kinds,
    }


# ------------------------------------------------------------------------------------------------ main


def _create_api_key(cluster: Any, config: str) -> Optional[str]:
    """A fresh API key on the cluster's Redis when its app requires one (`avatarserve keys create`), else None."""
    import subprocess

    from avatarserve.serve.ops.launcher import load_config

    auth = getattr(load_config(config)["app"], "auth", None)
    if auth is None or auth.mode != "required":
        return None
    done = subprocess.run([sys.executable, "-m", "avatarserve.cli", "keys", "create", "--name", "soak", "--config",
                           config], env=cluster.env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"avatarserve keys create failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["api_key"]


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from avatarserve.toy.demo import write_demo_inputs

    work = Path(tempfile.mkdtemp(prefix="avatarserve-soak-"))
    image = Path(write_demo_inputs(str(work), seconds=1.0)["image"]).read_bytes()
    out: Dict[str, Any] = {"bench": "soak", "minutes": args.minutes, "warmup_minutes": args.warmup_minutes,
                           "sample_s": args.sample_s, "max_growth_pct": args.max_growth_pct, "config": args.config,
                           "schedule": {"speech_s": args.speech_s, "pause_s": args.pause_s,
                                        "interrupt_every": args.interrupt_every, "chunk_ms": args.chunk_ms,
                                        "lead_ms": args.lead_ms}}
    t = time.monotonic()
    try:
        return _soak(args, image, out, t)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _soak(args: argparse.Namespace, image: bytes, out: Dict[str, Any], t: float) -> Dict[str, Any]:
    from adapters import LocalCluster

    from avatarserve.serve.ops.launcher import ClusterState

    with LocalCluster(args.config) as cluster:
        out["startup_s"] = round(time.monotonic() - t, 1)
        state = ClusterState.load(Path(cluster.info["state_file"]))
        if state is None or not state.ray_pgid:
            raise SystemExit("avatarserve up recorded no Ray process group")
        _log(f"cluster up in {out['startup_s']} s at {state.grpc_address}; soaking {args.minutes} min")
        if args.api_key is None:
            args.api_key = _create_api_key(cluster, args.config)
        sampler = MemorySampler(state.ray_pgid, state.redis_pid, state.redis_url, args.sample_s).start()
        try:
            res = asyncio.run(run_session(state.grpc_address, image, args, state.app_name))
        finally:
            sampler.stop()
        # The memory clock starts with the sampler; the warm-up counts from the session's stream start.
        warmup_s = (res["t_stream"] - sampler.t0) + args.warmup_minutes * 60
        out["session"] = session_report(res, args)
        out["memory"] = sampler.report(warmup_s, args.max_growth_pct, args.window_minutes * 60)
        if args.series:
            sampler.write_series(args.series)
    shutil.rmtree(cluster.state, ignore_errors=True)  # `avatarserve down` ran: the private state folder is spent
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="length of the session")
    p.add_argument("--warmup-minutes", type=float, default=5.0, help="memory growth is measured from here to the end")
    p.add_argument("--sample-s", type=float, default=10.0, help="memory sampling interval")
    p.add_argument("--max-growth-pct", type=float, default=2.0, help="pass criterion per process (reported only)")
    p.add_argument("--window-minutes", type=float, default=3.0, help="RSS at the warm-up's end and at the run's end: "
                                                                     "the median over this long")
    p.add_argument("--speech-s", type=float, default=20.0, help="length of each speech segment")
    p.add_argument("--pause-s", type=float, default=8.0, help="silence gap after each speech segment")
    p.add_argument("--interrupt-every", type=int, default=3, help="every n-th speech segment is interrupted "
                                                                   "half-way (0: never)")
    p.add_argument("--chunk-ms", type=int, default=40, help="audio chunk length")
    p.add_argument("--lead-ms", type=float, default=200.0, help="audio sent this far ahead of real time")
    p.add_argument("--config", default=str(REPO / "deploy" / "local.yaml"))
    p.add_argument("--api-key", default=None, help="API key for CreateSession (default: the SDK's environment)")
    p.add_argument("--series", default=None, help="also write every memory sample here (JSON lines)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if (args.minutes <= 0 or not 0 <= args.warmup_minutes < args.minutes or args.sample_s <= 0
            or args.window_minutes <= 0):
        p.error("need --minutes > 0, 0 <= --warmup-minutes < --minutes, --sample-s > 0 and --window-minutes > 0")
    out = run(args)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
