"""Avatar metrics end to end: a real Prometheus scrapes the local cluster's metrics agent while sessions run; every
PromQL expression of the Grafana dashboard returns data; our exposition passes `promtool check metrics`; the built-in
ops dashboard renders charts with data in headless Chromium (screenshot saved under artifacts/).

Traffic (once per module, while Prometheus scrapes every second): one session streams twice with an INTERRUPT each
time (time to first frame, interrupt-to-idle, dropped frames, idle FPS windows), one streams paced audio in real time
with a zero lateness budget (late frames, delivery lag), a third CreateSession is refused at full capacity
(RESOURCE_EXHAUSTED + retry-after-ms), and a session created later ends its stream with INVALID_ARGUMENT (errors by
status code). Histogram quantiles need observations spread over time (a series born at its final value has no rate),
which this sequence gives.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from avatarserve_client.v1 import avatar_service_pb2 as pb
from avatarserve_client.v1 import avatar_service_pb2_grpc as pbg
from avatarserve_client import AvatarClient, CapacityExhausted, EventKind, VideoBlock, chunk_pcm

from avatarserve.serve.ops.launcher import free_port

from .conftest import png

pytestmark = pytest.mark.integration

APP = "avatarmetrics"
OPS_PREFIX = "/avatarmetrics/ops"  # the dashboard lives under the app's route prefix
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
ONLY = f'application="{APP}"'
RATE_WINDOW = "10m"  # substituted for Grafana's $__rate_interval: the whole traffic fits in it, on a slow machine too
METRICS_ARRIVAL_S = 60.0  # how long the Grafana test waits for the last series (well inside RATE_WINDOW)


def _tone(seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.4 * np.sin(2 * np.pi * hz * t) * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def metrics_app(serve_instance, redis_server):
    from ray import serve

    from avatarserve.serve.builder import deploy

    cfg = {"name": APP, "route_prefix": "/avatarmetrics", "redis_url": redis_server.url, "namespace": "metrics:",
           "registry_namespace": "metrics:", "auth": {"mode": "disabled"},
           "model": {"config": "tiny", "seed": 0, "stream_overrides": {"num_steps": 1}},
           "capacity": {"audio": 2, "denoise": 2, "vae": 2},
           "scheduling": {"admit_by": "configured"},  # the slot counts asserted below, whatever the machine's speed
           # Autoscaling on but already at its maximum: admission must refuse at once instead of parking.
           "autoscaling": {"enabled": True, "min_replicas": {"audio": 1, "denoise": 1, "vae": 1},
                           "max_replicas": {"audio": 1, "denoise": 1, "vae": 1}, "metrics_interval_s": 0.5,
                           "look_back_period_s": 2.0},
           "timeouts": {"admission_wait_s": 60.0, "heartbeat_s": 0.5}, "retry_after_ms": 1500, "late_after_s": 0.0, "fps_window_s": 2.0,
           "fps_sample_s": 0.5,
           "ops": {"enabled": True, "sample_interval_s": 1.0, "window_s": 20.0, "title": "AvatarServe test cluster"}}
    deploy(cfg)
    yield {"grpc": serve_instance.grpc_address, "http": serve_instance.http_address}
    serve.delete(APP)


@pytest.fixture(scope="module")
def prometheus(ray_cluster, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (apt-get install prometheus; scripts/setup.sh does it)")
    work = tmp_path_factory.mktemp("prometheus")
    # The shipped scrape config as it is (interval and timeout included), pointed at this test cluster's metrics
    # agent. A shorter interval caps the scrape timeout with it: the agent serves ~15,000 samples here, which took
    # ~1 s per scrape on a busy machine, and a 1 s scrape timed out, marked every series stale and emptied every
    # gauge panel (seen in a full-suite run).
    cfg = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    job = cfg["scrape_configs"][0]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{ray_cluster.metrics_export_port}"]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(work / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not start: {(work / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _query(prom: str, expr: str) -> list:
    with urllib.request.urlopen(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _scrape_health(prom: str) -> str:
    """The scrape target's state as Prometheus reports it (for failure messages)."""
    with urllib.request.urlopen(f"{prom}/api/v1/targets", timeout=10) as r:
        targets = json.loads(r.read())["data"]["activeTargets"]
    return "; ".join(f"{t['scrapeUrl']}: health={t['health']} last_error={t['lastError']!r} "
                     f"last_scrape_duration={t['lastScrapeDuration']:.2f}s" for t in targets)


def _wait_for_scrape_after(prom: str, unix_s: float, limit_s: float = 120.0) -> None:
    """Until a scrape that started after `unix_s` succeeded (bounded: a busy machine slows the agent's exposition)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if any(float(r["value"][1]) > unix_s for r in _query(prom, "timestamp(up == 1)")):
            return
        time.sleep(0.5)
    pytest.fail(f"no successful scrape after the traffic: {_scrape_health(prom)}")


def _wait_for_series(prom: str, names, limit_s: float = 120.0) -> None:
    """Until Prometheus holds a sample of each of this app's series `names` (bounded: the agent exports every second
    and Prometheus scrapes every second; a busy machine delays both)."""
    deadline = time.monotonic() + limit_s
    missing = list(names)
    while missing and time.monotonic() < deadline:
        missing = [n for n in missing if not _query(prom, f"{n}{{{ONLY}}}")]
        if missing:
            time.sleep(0.5)
    assert not missing, f"series never reached Prometheus: {missing} ({_scrape_health(prom)})"


@pytest.fixture(scope="module")
def traffic(metrics_app, prometheus):
    report: dict = {}
    errors: list = []
    with AvatarClient(metrics_app["grpc"], application=APP, timeout=300) as client:
        s1 = client.session(png(11), seed=1, idle_mode="fill_silence", fill_grace_ms=50)
        s2 = client.session(png(12), seed=2, idle_mode="wait_for_audio")

        def realtime_stream() -> None:
            try:
                blocks = list(s2.stream(chunk_pcm(_tone(3.0), chunk_ms=40), realtime=True, timeout=300))
                report["realtime_blocks"] = len(blocks)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        def refuse_third() -> None:
            # s1 streams and s2 holds its slot (streaming or reserved): capacity (2 sessions, 1 replica per stage,
            # already the maximum) is full, so CreateSession is refused at once with a retry hint.
            t0 = time.monotonic()
            with pytest.raises(CapacityExhausted) as refused:
                client.create_session(png(13), seed=3)
            report["refusal_s"] = time.monotonic() - t0
            assert refused.value.retry_after_s == pytest.approx(1.5)

        def interrupted_stream(tag: str, on_first=None) -> None:
            got, after = [], None
            for item in s1.stream(chunk_pcm(_tone(6.0), chunk_ms=200), end_of_input=False, include_events=True,
                                  timeout=300):
                if not isinstance(item, VideoBlock):
                    continue
                got.append(item)
                if len(got) == 1:
                    s1.interrupt()
                    if on_first is not None:
                        on_first()
                elif item.is_idle and after is None:
                    after = time.monotonic()
                if after is not None and time.monotonic() - after > 3.0:  # idle blocks at real time: FPS windows
                    s1.end_of_input()
                    after = float("inf")
            assert any(e.kind == EventKind.INTERRUPTED for e in s1.events)
            report[f"{tag}_blocks"] = len(got)

        rt = threading.Thread(target=realtime_stream, daemon=True)
        rt.start()
        interrupted_stream("first", on_first=refuse_third)
        assert report["refusal_s"] < 30  # did not park for admission_wait_s (60 s)
        rt.join(120)
        assert not rt.is_alive() and not errors, errors
        s2.close()
        # A histogram's series appears with its first observation, and rate() sees only increases after Prometheus
        # first scraped it: the second interrupted stream's TTFF and interrupt-to-idle must come after that, or the
        # Grafana panels that rate them have nothing (seen when the first observations landed in one scrape).
        _wait_for_series(prometheus, ("ray_avatarserve_time_to_first_frame_seconds_count",
                                      "ray_avatarserve_interrupt_to_idle_seconds_count"))
        interrupted_stream("second")
        # A session admitted later, whose stream ends with INVALID_ARGUMENT on a malformed audio chunk (straight to
        # the server: the SDK would refuse it).
        s3 = client.session(png(14), seed=4)
        with grpc.insecure_channel(metrics_app["grpc"]) as ch:
            hello = pb.ClientMessage(hello=pb.Hello(session_id=s3.session_id, session_token=s3.handle.session_token))
            bad = pb.ClientMessage(audio=pb.AudioChunk(seq=0, pts_ms=0, pcm=b"\x00\x01\x02"))
            with pytest.raises(grpc.RpcError) as err:
                list(pbg.AvatarServiceStub(ch).StreamSession(iter([hello, bad]), metadata=(("application", APP),),
                                                             timeout=120))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        s3.close()
        s1.close()
    _wait_for_scrape_after(prometheus, time.time())
    return report


def _grafana_exprs() -> list:
    dash = json.loads((ROOT / "deploy" / "grafana" / "avatarserve.json").read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["legendFormat"], t["expr"]))
    return out


def _expressions_without_data(prometheus, exprs) -> list:
    empty = []
    for title, legend, expr in exprs:
        q = expr.replace("$__rate_interval", RATE_WINDOW)
        res = _query(prometheus, q)
        values = [float(r["value"][1]) for r in res]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title} / {legend}: {q} -> {res}")
    return empty


def test_every_grafana_expression_returns_data(traffic, prometheus):
    exprs = _grafana_exprs()
    assert len(exprs) >= 30
    # Replicas export through their node's agent and Prometheus scrapes it: on a busy machine the last series can
    # arrive well after the traffic ended. Wait for them (bounded), then require every expression to have data.
    deadline = time.monotonic() + METRICS_ARRIVAL_S
    while (empty := _expressions_without_data(prometheus, exprs)) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not empty, f"expressions without data ({_scrape_health(prometheus)}):\n" + "\n".join(empty)
    # Spot checks of meaning, not only presence (this app's series only: the test cluster runs other apps too).
    late = _query(prometheus, f"sum(ray_avatarserve_frames_late_total{{{ONLY}}})")
    assert float(late[0]["value"][1]) >= 12  # every real-time block misses a zero budget
    refused = _query(prometheus, f'sum(ray_avatarserve_session_creates_total{{code="RESOURCE_EXHAUSTED",{ONLY}}})')
    assert float(refused[0]["value"][1]) == 1
    creates = _query(prometheus, f'sum(ray_avatarserve_session_creates_total{{code="OK",{ONLY}}})')
    assert float(creates[0]["value"][1]) == 3
    errors = _query(prometheus, f'sum by (code) (ray_avatarserve_stream_ends_total{{{ONLY}}})')
    assert {r["metric"]["code"]: float(r["value"][1]) for r in errors} == {"OK": 3, "INVALID_ARGUMENT": 1}
    hops = {r["metric"]["hop"] for r in _query(prometheus, f"sum by (hop) (ray_avatarserve_hop_transport_seconds_count{{{ONLY}}})")}
    assert hops == {"gateway->AudioEncoder", "AudioEncoder->DenoiseStage0", "DenoiseStage0->VaeDecoder",
                    "VaeDecoder->gateway"}
    # The scrape config dropped Ray's camelCase labels.
    sample = _query(prometheus, "ray_avatarserve_replica_capacity_sessions")[0]["metric"]
    assert "WorkerId" not in sample and "worker_id" in sample and sample["deployment"]


def test_exposition_passes_promtool(traffic, ray_cluster):
    from avatarserve.serve.ops.metrics import EXPORTED_NAMES, RAY_INJECTED_LABELS

    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed"
    with urllib.request.urlopen(f"http://127.0.0.1:{ray_cluster.metrics_export_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    ours, keep = [], False
    strip = re.compile(r'(?:%s)="[^"]*",?' % "|".join(re.escape(l) for l in RAY_INJECTED_LABELS))
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            keep = line.split()[2].startswith("ray_avatarserve_")
        if keep:
            # Ray's own process labels are camelCase (promtool flags them); the scrape config drops them too.
            ours.append(line if line.startswith("#") else strip.sub("", line).replace(",}", "}"))
    exposition = "\n".join(ours) + "\n"
    res = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    families = set(re.findall(r"^# TYPE (\S+) (\S+)", exposition, re.M))
    assert all(EXPORTED_NAMES[name].kind == kind for name, kind in families), families
    # Everything this traffic exercises is exported (counters of events it does not cause exist only once they occur:
    # sessions cut by a scale-down, reroutes, recoveries from a lost replica, failed stage steps, missed deadlines).
    missing = set(EXPORTED_NAMES) - {n for n, _ in families} - {"ray_avatarserve_replica_sessions_cut_total",
                                                                  "ray_avatarserve_session_reroutes_total",
                                                                  "ray_avatarserve_session_recoveries_total",
                                                                  "ray_avatarserve_stage_errors_total",
                                                                  "ray_avatarserve_stage_deadline_misses_total"}
    assert not missing, missing


def _chromium(args: list, timeout: float = 120) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed"
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_ops_dashboard_renders_live_charts(traffic, metrics_app, tmp_path):
    url = metrics_app["http"] + OPS_PREFIX + "/"
    with urllib.request.urlopen(metrics_app["http"] + OPS_PREFIX + "/api/series", timeout=30) as r:
        series = json.loads(r.read())
    assert series["scrapes"] >= 5 and not series["last_error"], series.get("last_error")
    charts = series["charts"]
    assert charts["replicas"] and charts["sessions"] and charts["latency"] and charts["fps"], charts.keys()
    dom = _chromium([f"--user-data-dir={tmp_path / 'dom'}", "--virtual-time-budget=5000", "--dump-dom", url])
    assert dom.returncode == 0, dom.stderr[-2000:]
    for chart in ("latency", "fps", "sessions", "replicas", "quality"):
        m = re.search(rf'<svg id="chart-{chart}"[^>]*data-points="(\d+)"', dom.stdout)
        assert m and int(m.group(1)) > 0, f"chart {chart} rendered no points"
    assert dom.stdout.count("<polyline") >= 5
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ops-dashboard.png"
    shot.unlink(missing_ok=True)
    res = _chromium([f"--user-data-dir={tmp_path / 'shot'}", "--window-size=1280,1500", "--virtual-time-budget=5000",
                     f"--screenshot={shot}", url])
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # Line colours of the first series (#4fc3f7) and second (#ffb74d) are on the page: charts were drawn.
    for rgb in ((0x4F, 0xC3, 0xF7), (0xFF, 0xB7, 0x4D)):
        assert (np.abs(img - np.array(rgb)).sum(axis=2) < 40).sum() > 200, f"no {rgb} line pixels in {shot}"
