"""Avatar metrics: what operators of a live-avatar service need to see, exported in Prometheus format.

Replicas record with `ray.serve.metrics` (Serve adds the `deployment`, `replica` and `application` labels); Ray's
metrics agent on every node exposes them on the node's metrics export port (`ray start --metrics-export-port`), with
a `ray_` prefix on every name and a `_total` suffix on counters. The full exported names are in `EXPORTED_NAMES`.
Ray also adds its own labels (`Component`, `NodeAddress`, `SessionName`, `Version`, `WorkerId`, `otel_scope_*`):
`deploy/prometheus.yml` drops them at scrape time, and `RAY_INJECTED_LABELS` names them for tools that check the raw
exposition.

Two recording sides:
- `GatewayMetrics` (Gateway replicas): session lifecycle and admission, time to first frame, per-session FPS and
  real-time factor, delivery lag and late/dropped frames, interrupt-to-idle, A/V skew, and per-hop transport and
  queueing latency derived from the `HopStamp`s every block carries back.
- `StageMetrics` (stage replicas): per-stage step latency, sessions live/reserved and capacity per replica, data-plane
  queue depths, draining state and sessions cut by a shutdown.

`SessionMeter` and `hop_latencies` are the pure computations behind them (unit-tested without Ray).
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "EXPORTED_NAMES",
    "GatewayMetrics",
    "HopLatency",
    "METRICS",
    "MetricSpec",
    "RAY_INJECTED_LABELS",
    "SessionMeter",
    "StageMetrics",
    "exported_name",
    "hop_latencies",
    "stage_of",
]

PREFIX = "avatarserve_"
RAY_PREFIX = "ray_"
# Labels Ray's metrics agent puts on every series it exports (not ours; camelCase, so `promtool check metrics`
# flags them): dropped by deploy/prometheus.yml.
RAY_INJECTED_LABELS = ("Component", "NodeAddress", "SessionName", "Version", "WorkerId", "otel_scope_name",
                       "otel_scope_schema_url", "otel_scope_version")
SERVE_LABELS = ("deployment", "replica", "application")

# Bucket boundaries (seconds unless the name says otherwise); Ray accepts only positive boundaries.
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
TTFF_BUCKETS = [0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0]
LAG_BUCKETS = [0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0]
FPS_BUCKETS = [1.0, 5.0, 10.0, 15.0, 20.0, 22.0, 24.0, 25.0, 26.0, 30.0, 50.0, 100.0]
RTF_BUCKETS = [0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.01, 1.05, 1.25, 2.0, 5.0]
SKEW_BUCKETS = [0.001, 0.01, 0.02, 0.04, 0.08, 0.2, 0.5]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 32]  # blocks per forward
SLACK_BUCKETS = [0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0]
WAIT_BUCKETS = [0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without the ray_ prefix and, for counters, without _total
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    tags: Tuple[str, ...] = ()
    buckets: Tuple[float, ...] = ()
    side: str = "gateway"  # "gateway" | "stage"


def _h(name: str, help_: str, buckets: Sequence[float], tags: Tuple[str, ...] = (), side: str = "gateway") -> MetricSpec:
    return MetricSpec(name, "histogram", help_, tags, tuple(buckets), side)


METRICS: Tuple[MetricSpec, ...] = (
    # ---- gateway: lifecycle and admission
    MetricSpec("avatarserve_session_creates", "counter", "CreateSession calls by gRPC status code.", ("code",)),
    MetricSpec("avatarserve_stream_starts", "counter", "StreamSession streams that opened a pipeline."),
    MetricSpec("avatarserve_stream_ends", "counter", "StreamSession calls that ended, by gRPC status code (calls "
               "refused before their pipeline opened included).", ("code",)),
    MetricSpec("avatarserve_session_closes", "counter", "Sessions closed by CloseSession."),
    MetricSpec("avatarserve_active_streams", "gauge", "Streams open on this gateway replica."),
    MetricSpec("avatarserve_admission_waiting", "gauge",
               "CreateSession calls parked on this gateway replica until a stage replica has a free slot."),
    _h("avatarserve_admission_wait_seconds", "Time CreateSession waited for a free session slot.", WAIT_BUCKETS,
       ("outcome",)),
    MetricSpec("avatarserve_session_reroutes", "counter",
               "Stream opens that moved a session hop to another replica (old one gone, draining or full).",
               ("stage",)),
    MetricSpec("avatarserve_session_recoveries", "counter",
               "Live streams that lost a stage replica and continued on a re-placed, rebuilt route.", ("stage",)),
    # ---- gateway: per-stream quality of service
    _h("avatarserve_time_to_first_frame_seconds", "Time from the first block fed to the pipeline to its first "
       "delivered video chunk, per stream.", TTFF_BUCKETS),
    _h("avatarserve_session_generated_fps", "Video frames generated per second by one session over the sampling "
       "window (discarded frames included).", FPS_BUCKETS),
    _h("avatarserve_session_delivered_fps", "Video frames delivered per second to one session's client over the "
       "sampling window.", FPS_BUCKETS),
    _h("avatarserve_session_realtime_factor", "Media seconds generated per wall-clock second by one session over the "
       "sampling window (1 keeps up with live audio; below 1 falls behind).", RTF_BUCKETS),
    _h("avatarserve_block_latency_seconds", "Time from feeding a block's audio to the pipeline to receiving its "
       "video (all hops, both directions).", LATENCY_BUCKETS + [20.0, 30.0]),
    _h("avatarserve_block_delivery_lag_seconds", "How long after the end of its audio span (on the stream's wall "
       "clock) a video chunk was delivered; 0 when it was delivered before (audio sent ahead of real time).",
       LAG_BUCKETS),
    MetricSpec("avatarserve_frames_delivered", "counter", "Video frames delivered to clients."),
    MetricSpec("avatarserve_frames_late", "counter",
               "Video frames delivered later than the configured lag budget after their audio."),
    MetricSpec("avatarserve_frames_dropped", "counter", "Video frames generated but not delivered, by reason.",
               ("reason",)),
    MetricSpec("avatarserve_audio_dropped_seconds", "counter", "Client audio dropped, by reason (late: its span "
               "was already filled with silence; interrupt: discarded by INTERRUPT).", ("reason",)),
    _h("avatarserve_interrupt_to_idle_seconds", "Time from an INTERRUPT to the first idle video chunk delivered.",
       TTFF_BUCKETS),
    _h("avatarserve_av_skew_seconds", "Absolute difference between the video and audio presentation times at the "
       "end of each delivered chunk (frames shown vs the audio span it was made from).", SKEW_BUCKETS),
    _h("avatarserve_hop_transport_seconds", "Transport latency of a block between two consecutive hops, from the "
       "sender's stamp to the receiver's stamp.", LATENCY_BUCKETS, ("hop",)),
    _h("avatarserve_hop_queue_wait_seconds", "Time a block waited in a stage's input queue before its step started.",
       LATENCY_BUCKETS, ("stage",)),
    MetricSpec("avatarserve_gateway_blocks_in_flight", "gauge",
               "Blocks fed to the pipeline and not yet returned, summed over this gateway's streams."),
    MetricSpec("avatarserve_gateway_audio_buffered_seconds", "gauge",
               "Client audio buffered in this gateway and not yet fed, summed over its streams."),
    # ---- stage replicas
    _h("avatarserve_stage_step_seconds", "Compute time of one block at one stage (handler.process).",
       LATENCY_BUCKETS, side="stage"),
    MetricSpec("avatarserve_stage_blocks", "counter", "Blocks processed by this stage replica.", side="stage"),
    _h("avatarserve_stage_batch_size", "Blocks (of different sessions) per forward at this stage replica.",
       BATCH_BUCKETS, side="stage"),
    _h("avatarserve_stage_deadline_slack_seconds", "Time left to a block's deadline when this stage finished it (a "
       "missed deadline lands in the first bucket; misses: avatarserve_stage_deadline_misses).", SLACK_BUCKETS,
       side="stage"),
    MetricSpec("avatarserve_stage_deadline_misses", "counter", "Blocks this stage finished after their deadline (the "
               "end of their audio plus late_after_s).", side="stage"),
    MetricSpec("avatarserve_replica_realtime_capacity_sessions", "gauge", "Real-time sessions this stage replica "
               "can serve by its measured step cost per batch size (scheduling.utilization of each block's "
               "duration).", side="stage"),
    MetricSpec("avatarserve_stage_errors", "counter", "Blocks whose step failed at this stage replica.",
               side="stage"),
    MetricSpec("avatarserve_replica_sessions", "gauge", "Sessions on this stage replica, by state (live: "
               "streaming; reserved: admitted, not streaming yet).", ("state",), side="stage"),
    MetricSpec("avatarserve_replica_capacity_sessions", "gauge", "Session slots of this stage replica.",
               side="stage"),
    MetricSpec("avatarserve_stage_queue_depth", "gauge", "Items waiting in this replica's per-session data-plane "
               "queues, summed over sessions (in: before the step; down: to the next hop; up: results to relay).",
               ("queue",), side="stage"),
    MetricSpec("avatarserve_replica_draining", "gauge", "1 while this stage replica drains its sessions before "
               "exiting (scale-down), else 0.", side="stage"),
    MetricSpec("avatarserve_replica_sessions_cut", "counter", "Sessions still live when a stopping replica's drain "
               "budget ran out.", side="stage"),
)

_SPECS = {m.name: m for m in METRICS}


def exported_name(spec: MetricSpec) -> str:
    """The family name Prometheus sees (Ray prefixes `ray_`; counters get `_total`)."""
    base = RAY_PREFIX + spec.name
    return base + "_total" if spec.kind == "counter" else base


EXPORTED_NAMES: Dict[str, MetricSpec] = {exported_name(m): m for m in METRICS}


def stage_of(hop: str) -> str:
    """Deployment of a hop name ("DenoiseStage1#abc" -> "DenoiseStage1")."""
    return hop.split("#", 1)[0]


# ------------------------------------------------------------------------------------------------ pure computations
@dataclass(frozen=True)
class HopLatency:
    transport: List[Tuple[str, float]]  # ("A->B", seconds)
    queue_wait: List[Tuple[str, float]]  # (stage, seconds)
    step: List[Tuple[str, float]]  # (stage, seconds)


def hop_latencies(stamps: Sequence[Any], received_ns: Optional[int] = None) -> HopLatency:
    """Per-hop timings from the HopStamps of one block (the caller's "client" stamp first, then one per hop).

    Transport of hop i -> i+1 is `recv[i+1] - end[i]` (wall clocks of two processes: exact on one host, skewed by the
    clock offset across hosts). The return leg (last hop -> gateway) is included when `received_ns` is given.
    Missing (zero) timestamps are skipped.
    """
    transport: List[Tuple[str, float]] = []
    queue: List[Tuple[str, float]] = []
    step: List[Tuple[str, float]] = []
    prev_name, prev_end = None, 0
    for s in stamps:
        name = "gateway" if s.hop == "client" else stage_of(s.hop)
        if prev_name is not None and prev_end and s.recv_unix_ns:
            transport.append((f"{prev_name}->{name}", (s.recv_unix_ns - prev_end) / 1e9))
        if s.hop != "client":
            if s.recv_unix_ns and s.start_unix_ns:
                queue.append((name, (s.start_unix_ns - s.recv_unix_ns) / 1e9))
            if s.start_unix_ns and s.end_unix_ns:
                step.append((name, (s.end_unix_ns - s.start_unix_ns) / 1e9))
        prev_name, prev_end = name, s.end_unix_ns
    if received_ns and prev_name is not None and prev_name != "gateway" and prev_end:
        transport.append((f"{prev_name}->gateway", (received_ns - prev_end) / 1e9))
    return HopLatency(transport, queue, step)


class SessionMeter:
    """Sliding-window frame rates of one stream (generated and delivered), sampled by the gateway."""

    def __init__(self, fps: float, window_s: float = 5.0, clock=time.monotonic) -> None:
        if fps <= 0 or window_s <= 0:
            raise ValueError(f"fps ({fps}) and window_s ({window_s}) must be > 0")
        self.fps = float(fps)
        self.window_s = float(window_s)
        self.clock = clock
        self.started = clock()
        self._gen: Deque[Tuple[float, int]] = collections.deque()
        self._dlv: Deque[Tuple[float, int]] = collections.deque()

    def generated(self, frames: int, at: Optional[float] = None) -> None:
        self._gen.append((self.clock() if at is None else at, int(frames)))

    def delivered(self, frames: int, at: Optional[float] = None) -> None:
        self._dlv.append((self.clock() if at is None else at, int(frames)))

    def _rate(self, q: Deque[Tuple[float, int]], now: float) -> float:
        lo = now - self.window_s
        while q and q[0][0] <= lo:  # window (now - window_s, now]
            q.popleft()
        span = min(self.window_s, max(now - self.started, 1e-9))
        return sum(n for _, n in q) / span

    def sample(self, now: Optional[float] = None) -> Optional[Tuple[float, float, float]]:
        """(generated_fps, delivered_fps, realtime_factor) over the last window; None before one full window."""
        now = self.clock() if now is None else now
        if now - self.started < self.window_s:
            return None
        gen = self._rate(self._gen, now)
        dlv = self._rate(self._dlv, now)
        return gen, dlv, gen / self.fps


# ------------------------------------------------------------------------------------------------ recording
class _Recorder:
    """Creates the Ray metric objects of one side lazily (they need a Ray worker)."""

    side = ""

    def __init__(self) -> None:
        from ray.serve import metrics as serve_metrics

        self._m: Dict[str, Any] = {}
        for spec in METRICS:
            if spec.side != self.side:
                continue
            if spec.kind == "counter":
                m = serve_metrics.Counter(spec.name, description=spec.help, tag_keys=spec.tags)
            elif spec.kind == "gauge":
                m = serve_metrics.Gauge(spec.name, description=spec.help, tag_keys=spec.tags)
            else:
                m = serve_metrics.Histogram(spec.name, description=spec.help, boundaries=list(spec.buckets),
                                            tag_keys=spec.tags)
            self._m[spec.name] = m

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value > 0:  # Ray counters reject 0
            self._m[name].inc(value, tags=tags or None)

    def set(self, name: str, value: float, **tags: str) -> None:
        self._m[name].set(value, tags=tags or None)

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._m[name].observe(value, tags=tags or None)


class GatewayMetrics(_Recorder):
    side = "gateway"

    def __init__(self) -> None:
        super().__init__()
        # Series that should exist from the start (a panel with no series reads as "no data", not "zero").
        self.set("avatarserve_active_streams", 0)
        self.set("avatarserve_admission_waiting", 0)
        self.set("avatarserve_gateway_blocks_in_flight", 0)
        self.set("avatarserve_gateway_audio_buffered_seconds", 0)

    def block(self, stamps: Sequence[Any], received_ns: int) -> None:
        lat = hop_latencies(stamps, received_ns)
        for hop, s in lat.transport:
            self.observe("avatarserve_hop_transport_seconds", max(0.0, s), hop=hop)
        for stage, s in lat.queue_wait:
            self.observe("avatarserve_hop_queue_wait_seconds", max(0.0, s), stage=stage)


class StageMetrics(_Recorder):
    side = "stage"

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.set("avatarserve_replica_capacity_sessions", capacity)
        self.set("avatarserve_replica_draining", 0)
        for state in ("live", "reserved"):
            self.set("avatarserve_replica_sessions", 0, state=state)
        for q in ("in", "down", "up"):
            self.set("avatarserve_stage_queue_depth", 0, queue=q)

    def snapshot(self, stats: Mapping[str, Any], reserved: int, draining: bool) -> None:
        """Publish the replica's gauges from `StageHost.stats()`. Called periodically: Ray's agent forgets a gauge
        that is not set again within two export intervals."""
        self.set("avatarserve_replica_capacity_sessions", self.capacity)
        self.set("avatarserve_replica_sessions", stats.get("live_sessions", 0), state="live")
        self.set("avatarserve_replica_sessions", reserved, state="reserved")
        depth = {"in": 0, "down": 0, "up": 0}
        for s in (stats.get("sessions") or {}).values():
            depth["in"] += int(s.get("in_queue", 0))
            depth["down"] += int(s.get("down_queue", 0))
            depth["up"] += int(s.get("up_queue", 0))
        for q, n in depth.items():
            self.set("avatarserve_stage_queue_depth", n, queue=q)
        self.set("avatarserve_replica_draining", 1 if draining else 0)


_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")


def check_specs(specs: Iterable[MetricSpec] = METRICS) -> List[str]:
    """Naming problems (empty when fine): snake_case, `avatarserve_` prefix, no `_total` on counter base names,
    histograms of durations in seconds, help text present, sorted unique buckets."""
    problems: List[str] = []
    seen = set()
    for m in specs:
        if m.name in seen:
            problems.append(f"{m.name}: defined twice")
        seen.add(m.name)
        if not _NAME_RE.match(m.name) or not m.name.startswith(PREFIX):
            problems.append(f"{m.name}: must be snake_case and start with {PREFIX!r}")
        if m.kind not in ("counter", "gauge", "histogram"):
            problems.append(f"{m.name}: unknown kind {m.kind!r}")
        if m.kind == "counter" and m.name.endswith("_total"):
            problems.append(f"{m.name}: counter base names must not end in _total (Ray appends it)")
        if not m.help or not m.help.endswith("."):
            problems.append(f"{m.name}: help text must be a sentence")
        for t in m.tags:
            if not _NAME_RE.match(t) or t in SERVE_LABELS:
                problems.append(f"{m.name}: label {t!r} is not snake_case or is reserved by Serve")
        if m.kind == "histogram":
            if list(m.buckets) != sorted(set(m.buckets)) or not m.buckets or m.buckets[0] <= 0:
                problems.append(f"{m.name}: buckets must be non-empty, sorted, unique and positive (Ray)")
        if any(u in m.name for u in ("_ms", "_millis", "milliseconds")):
            problems.append(f"{m.name}: use base units (seconds)")
    return problems
