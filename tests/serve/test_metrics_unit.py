"""Metric definitions and the pure computations behind the gateway metrics and the ops dashboard (no Ray)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from avatarserve.serve.ops.dashboard import (
    DashboardError,
    MetricsHistory,
    histogram_quantile,
    increase,
    parse_exposition,
    render_page,
)
from avatarserve.serve.ops.metrics import (
    EXPORTED_NAMES,
    METRICS,
    MetricSpec,
    SessionMeter,
    check_specs,
    exported_name,
    hop_latencies,
)


def test_specs_follow_prometheus_conventions() -> None:
    assert check_specs() == []
    bad = [MetricSpec("avatarserve_x_total", "counter", "X."), MetricSpec("avatarserve_lat_ms", "histogram", "L.", buckets=(2, 1)),
           MetricSpec("avatarserve_lag_seconds", "histogram", "L.", buckets=(-1.0, 1.0)),
           MetricSpec("fooBar", "gauge", ""), MetricSpec("avatarserve_y", "gauge", "Y.", tags=("replica",))]
    problems = "\n".join(check_specs(bad))
    for text in ("must not end in _total", "buckets must be", "base units", "snake_case", "help text", "reserved by Serve"):
        assert text in problems
    assert exported_name(METRICS[0]) == "ray_avatarserve_session_creates_total"
    assert "ray_avatarserve_time_to_first_frame_seconds" in EXPORTED_NAMES


def test_exposition_of_every_metric_passes_promtool() -> None:
    """Render every metric the way Ray exports it (ray_ prefix, _total on counters, Serve labels) with the reference
    Prometheus client, and lint it with promtool."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (apt-get install prometheus; scripts/setup.sh does it)")
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    reg = CollectorRegistry()
    serve_labels = ["deployment", "replica", "application"]
    for m in METRICS:
        labels = serve_labels + list(m.tags)
        name = "ray_" + m.name
        if m.kind == "counter":
            metric = Counter(name, m.help, labels, registry=reg)
            metric.labels(*(["d", "r", "a"] + ["x"] * len(m.tags))).inc()
        elif m.kind == "gauge":
            metric = Gauge(name, m.help, labels, registry=reg)
            metric.labels(*(["d", "r", "a"] + ["x"] * len(m.tags))).set(1)
        else:
            metric = Histogram(name, m.help, labels, buckets=list(m.buckets), registry=reg)
            metric.labels(*(["d", "r", "a"] + ["x"] * len(m.tags))).observe(0.5)
    text = generate_latest(reg).decode()
    # prometheus_client adds *_created series; Ray does not export them.
    text = "\n".join(l for l in text.splitlines() if "_created" not in l) + "\n"
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    assert families == set(EXPORTED_NAMES)


@dataclass
class Stamp:
    hop: str
    recv_unix_ns: int = 0
    start_unix_ns: int = 0
    end_unix_ns: int = 0


def test_hop_latencies_from_stamps() -> None:
    ms = 1_000_000
    stamps = [Stamp("client", 0, 0, 100 * ms), Stamp("AudioEncoder#a1", 102 * ms, 103 * ms, 110 * ms),
              Stamp("DenoiseStage0#d9", 111 * ms, 115 * ms, 140 * ms), Stamp("VaeDecoder#v1", 0, 141 * ms, 150 * ms)]
    lat = hop_latencies(stamps, received_ns=153 * ms)
    assert [(h, round(s, 6)) for h, s in lat.transport] == [("gateway->AudioEncoder", 0.002),
                                                             ("AudioEncoder->DenoiseStage0", 0.001),
                                                             ("VaeDecoder->gateway", 0.003)]
    assert [(h, round(s, 6)) for h, s in lat.queue_wait] == [("AudioEncoder", 0.001), ("DenoiseStage0", 0.004)]
    assert [(h, round(s, 6)) for h, s in lat.step] == [("AudioEncoder", 0.007), ("DenoiseStage0", 0.025),
                                                       ("VaeDecoder", 0.009)]


def test_session_meter_windows() -> None:
    now = [0.0]
    meter = SessionMeter(fps=25, window_s=2.0, clock=lambda: now[0])
    for i in range(8):  # one 12-frame block every 0.5 s = 24 fps; one of every four discarded
        now[0] = 0.5 * (i + 1)
        meter.generated(12)
        if i % 4 != 3:
            meter.delivered(12)
        if i == 1:
            assert meter.sample() is None  # before a full window
    gen, dlv, rtf = meter.sample()
    assert (gen, dlv) == (24.0, 18.0) and rtf == pytest.approx(0.96)
    now[0] = 10.0  # a stall: nothing in the window
    assert meter.sample() == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        SessionMeter(fps=0)


def test_histogram_quantile_matches_prometheus() -> None:
    b = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (float("inf"), 40.0)]
    assert histogram_quantile(0.5, b) == pytest.approx(0.3)  # rank 20: halfway through (0.1, 0.5]
    assert histogram_quantile(0.25, b) == pytest.approx(0.1 * 10 / 10)
    assert histogram_quantile(1.0, b) == pytest.approx(1.0)
    assert histogram_quantile(0.99, [(1.0, 1.0), (float("inf"), 10.0)]) == 1.0  # the +Inf bucket: highest finite bound
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    with pytest.raises(DashboardError):
        histogram_quantile(1.5, b)


EXPO = """# HELP ray_avatarserve_frames_late_total Late.
# TYPE ray_avatarserve_frames_late_total counter
ray_avatarserve_frames_late_total{{Component="core_worker",WorkerId="w1",deployment="Gateway",replica="g1"}} {late}
# HELP ray_avatarserve_replica_sessions Sessions.
# TYPE ray_avatarserve_replica_sessions gauge
ray_avatarserve_replica_sessions{{WorkerId="w2",deployment="DenoiseStage0",replica="d1",state="live"}} 2.0
ray_avatarserve_replica_sessions{{WorkerId="w3",deployment="DenoiseStage0",replica="d2",state="live"}} 1.0
ray_avatarserve_replica_sessions{{WorkerId="w3",deployment="DenoiseStage0",replica="d2",state="reserved"}} 4.0
# HELP ray_avatarserve_replica_capacity_sessions Capacity.
# TYPE ray_avatarserve_replica_capacity_sessions gauge
ray_avatarserve_replica_capacity_sessions{{WorkerId="w2",deployment="DenoiseStage0",replica="d1"}} 2.0
ray_avatarserve_replica_capacity_sessions{{WorkerId="w3",deployment="DenoiseStage0",replica="d2"}} 2.0
# HELP ray_avatarserve_time_to_first_frame_seconds TTFF.
# TYPE ray_avatarserve_time_to_first_frame_seconds histogram
ray_avatarserve_time_to_first_frame_seconds_bucket{{WorkerId="w1",le="1.0"}} {b1}
ray_avatarserve_time_to_first_frame_seconds_bucket{{WorkerId="w1",le="2.0"}} {b2}
ray_avatarserve_time_to_first_frame_seconds_bucket{{WorkerId="w1",le="+Inf"}} {b2}
ray_avatarserve_time_to_first_frame_seconds_count{{WorkerId="w1"}} {b2}
ray_avatarserve_time_to_first_frame_seconds_sum{{WorkerId="w1"}} 3.0
# HELP ray_serve_other Not ours.
# TYPE ray_serve_other gauge
ray_serve_other 1.0
"""


def test_history_turns_cumulative_samples_into_rates_quantiles_and_counts() -> None:
    s0 = parse_exposition(EXPO.format(late=10, b1=0, b2=0))
    assert all(k[0].startswith("ray_avatarserve_") for k in s0)
    assert all("Component" not in dict(k[1]) for k in s0) and any("WorkerId" in dict(k[1]) for k in s0)
    h = MetricsHistory(window_s=30, history_s=60, fps=25)
    first = h.add(100.0, s0)
    assert first.values["quality"] == {}  # no baseline yet
    p = h.add(110.0, parse_exposition(EXPO.format(late=30, b1=2, b2=4)))
    assert p.values["quality"]["late frames/s"] == pytest.approx(2.0)  # 20 frames in 10 s
    assert p.values["latency"]["TTFF p95"] == pytest.approx(1.9)  # rank 3.8 of 4 in (1, 2]
    assert p.values["sessions"] == {"live DenoiseStage0": 3.0}
    assert p.values["replicas"] == {"DenoiseStage0": 2.0}
    # A worker restart (counter drops) counts from zero, like Prometheus.
    assert increase({("c", ()): 5.0}, {("c", ()): 50.0}) == {("c", ()): 5.0}
    doc = h.to_json()
    assert doc["charts"]["quality"]["late frames/s"] == [[110.0, 2.0]]
    assert len(doc["charts"]["replicas"]["DenoiseStage0"]) == 2
    with pytest.raises(DashboardError, match="unreadable"):
        parse_exposition("# TYPE ray_avatarserve_x counter\nray_avatarserve_x{ 1\n")
    # Only our families are read: a line of another family that the parser would reject does not matter.
    assert parse_exposition("# TYPE x counter\nx{ 1\n") == {}


def test_page_is_self_contained_and_embeds_the_data() -> None:
    h = MetricsHistory()
    h.add(1.0, parse_exposition(EXPO.format(late=1, b1=0, b2=0)))
    snap = {**h.to_json(), "scrapes": 1, "last_error": "", "title": "Ops </script><b>", "refresh_ms": 1000}
    page = render_page(snap)
    external = re.findall(r"https?://[^\s\"']+", page)
    assert "<script src" not in page and set(external) <= {"http://www.w3.org/2000/svg"}, external
    embedded = re.search(r'<script id="initial-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(embedded)["charts"]["replicas"]["DenoiseStage0"] == [[1.0, 2.0]]
    assert "Ops &lt;/script&gt;&lt;b&gt;" in page
    for chart in ("latency", "fps", "sessions", "replicas", "quality"):
        assert f'id="chart-{chart}"' in page
