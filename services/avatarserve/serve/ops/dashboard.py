"""Built-in ops dashboard: live latency / FPS / sessions / replicas charts for operators without Grafana.

`OpsDashboard` is a small deployment of the avatar application; the Gateway (the application's ingress) forwards
HTTP requests under `{route_prefix}/ops` to it (serve/builder.py). A background thread scrapes the Prometheus exposition
of every Ray node's metrics agent (found with `ray.nodes()`, or the `metrics_urls` given), keeps `history_s` of
derived series in memory, and serves

    GET .../ops/              one self-contained HTML page (inline CSS/JS, SVG charts; no CDN: the network may be
                              closed), with the current history embedded so it renders at once, then refreshing
    GET .../ops/api/series    the history as JSON
    GET .../ops/healthz       200 once a scrape succeeded

Counters and histograms are turned into rates and quantiles the way Prometheus does (per-series increases, a series
that appears or restarts counts from zero), over `window_s`.
"""

from __future__ import annotations

import collections
import html
import json
import logging
import math
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

from avatarserve.serve.config import OpsSection
from avatarserve.serve.ops.metrics import RAY_INJECTED_LABELS

log = logging.getLogger(__name__)

__all__ = ["DashboardError", "MetricsHistory", "OpsDashboard", "histogram_quantile", "parse_exposition", "render_page"]

P = "ray_avatarserve_"
SeriesKey = Tuple[str, Tuple[Tuple[str, str], ...]]  # (sample name, sorted labels)


class DashboardError(ValueError):
    """Invalid dashboard configuration or unreadable metrics."""


def parse_exposition(text: str, prefix: str = P) -> Dict[SeriesKey, float]:
    """Samples of the families starting with `prefix` in a Prometheus text exposition (Ray's own labels dropped, except
    WorkerId, which keeps the series of different processes apart)."""
    from prometheus_client.parser import text_string_to_metric_families

    keep = set(RAY_INJECTED_LABELS) - {"WorkerId"}
    out: Dict[SeriesKey, float] = {}
    try:
        families = list(text_string_to_metric_families(_own_lines(text, prefix)))
    except ValueError as exc:
        raise DashboardError(f"unreadable metrics exposition: {exc}") from exc
    for fam in families:  # ours only (`_own_lines`)
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in keep))
            out[(s.name, labels)] = out.get((s.name, labels), 0.0) + float(s.value)
    return out


def _own_lines(text: str, prefix: str) -> str:
    """The lines of the families starting with `prefix` (their samples and HELP / TYPE lines). A Ray node's exposition
    is mostly Ray's own metrics (1.5 MB, 85% of its lines, on a local cluster with one session): parsing all of it
    every sample took 0.59 s of a core, parsing ours alone 0.068 s."""
    meta = ("# HELP " + prefix, "# TYPE " + prefix)
    return "\n".join(line for line in text.splitlines() if line.startswith(prefix) or line.startswith(meta)) + "\n"


def histogram_quantile(q: float, buckets: Sequence[Tuple[float, float]]) -> Optional[float]:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets; None without observations."""
    if not 0 <= q <= 1:
        raise DashboardError(f"quantile must be within [0, 1], got {q}")
    b = sorted(buckets)
    if not b or b[-1][1] <= 0:
        return None
    total = b[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for i, (le, c) in enumerate(b):
        if c >= rank:
            if math.isinf(le):
                return b[i - 1][0] if i else 0.0  # the highest finite bound, as Prometheus does
            if i == 0 and le <= 0:
                return le  # no lower bound to interpolate from
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return b[-1][0]



def increase(now: Mapping[SeriesKey, float], then: Optional[Mapping[SeriesKey, float]]) -> Dict[SeriesKey, float]:
    """Per-series increase of cumulative samples; a new or restarted series counts from zero (as Prometheus)."""
    out: Dict[SeriesKey, float] = {}
    for k, v in now.items():
        before = None if then is None else then.get(k)
        out[k] = v if before is None or v < before else v - before
    return out


def _group(samples: Mapping[SeriesKey, float], name: str, by: Sequence[str] = (),
           where: Optional[Mapping[str, str]] = None) -> Dict[Tuple[str, ...], float]:
    out: Dict[Tuple[str, ...], float] = collections.defaultdict(float)
    for (n, labels), v in samples.items():
        if n != name:
            continue
        d = dict(labels)
        if where and any(d.get(k) != val for k, val in where.items()):
            continue
        out[tuple(d.get(k, "") for k in by)] += v
    return dict(out)


def _quantiles(delta: Mapping[SeriesKey, float], family: str, q: float, by: Sequence[str] = ()) -> Dict[Tuple[str, ...], float]:
    groups: Dict[Tuple[str, ...], Dict[float, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for (n, labels), v in delta.items():
        if n != family + "_bucket":
            continue
        d = dict(labels)
        le = float(d.get("le", "inf").replace("+Inf", "inf"))
        groups[tuple(d.get(k, "") for k in by)][le] += v
    out = {}
    for g, bk in groups.items():
        val = histogram_quantile(q, list(bk.items()))
        if val is not None:
            out[g] = val
    return out


def _mean(delta: Mapping[SeriesKey, float], family: str) -> Optional[float]:
    s = sum(_group(delta, family + "_sum").values())
    c = sum(_group(delta, family + "_count").values())
    return s / c if c > 0 else None


@dataclass
class Point:
    t: float
    values: Dict[str, Dict[str, float]]  # chart -> series name -> value


class MetricsHistory:
    """Cumulative snapshots in, chart points out (pure: fed by the scraper thread, unit-testable)."""

    CHARTS = ("latency", "fps", "sessions", "replicas", "quality")

    def __init__(self, window_s: float = 30.0, history_s: float = 900.0, fps: float = 25.0) -> None:
        if window_s <= 0 or history_s <= 0:
            raise DashboardError(f"window_s ({window_s}) and history_s ({history_s}) must be > 0")
        self.window_s = window_s
        self.history_s = history_s
        self.fps = fps
        self._snaps: Deque[Tuple[float, Dict[SeriesKey, float]]] = collections.deque()
        self.points: Deque[Point] = collections.deque()
        self.latest: Dict[str, float] = {}

    def add(self, t: float, samples: Dict[SeriesKey, float]) -> Point:
        first = not self._snaps
        self._snaps.append((t, samples))
        while len(self._snaps) > 2 and self._snaps[1][0] <= t - self.window_s:
            self._snaps.popleft()
        then_t, then = self._snaps[0]
        span = max(t - then_t, 1e-9)
        # First ever scrape: no baseline, so histograms/counters contribute nothing yet.
        delta = {} if first else increase(samples, then)
        v: Dict[str, Dict[str, float]] = {c: {} for c in self.CHARTS}
        lat = v["latency"]
        for label, fam, q in (("TTFF p95", "time_to_first_frame_seconds", 0.95),
                              ("block p95", "block_latency_seconds", 0.95)):
            for _, val in _quantiles(delta, P + fam, q).items():
                lat[label] = val
        for (stage,), val in _quantiles(delta, P + "stage_step_seconds", 0.95, by=("deployment",)).items():
            lat[f"step p95 {stage}"] = val
        fps = v["fps"]
        for label, fam in (("delivered mean", "session_delivered_fps"), ("generated mean", "session_generated_fps")):
            m = _mean(delta, P + fam)
            if m is not None:
                fps[label] = m
        for _, val in _quantiles(delta, P + "session_delivered_fps", 0.10).items():
            fps["delivered p10"] = val
        if fps:
            fps["target"] = self.fps
        ses = v["sessions"]
        for (dep,), val in _group(samples, P + "replica_sessions", ("deployment",), {"state": "live"}).items():
            ses[f"live {dep}"] = val
        streams = _group(samples, P + "active_streams")
        if streams:
            ses["streams"] = sum(streams.values())
        waiting = _group(samples, P + "admission_waiting")
        if waiting:
            ses["waiting"] = sum(waiting.values())
        reps = v["replicas"]
        for (n, labels) in samples:
            if n == P + "replica_capacity_sessions":
                dep = dict(labels).get("deployment", "?")
                reps[dep] = reps.get(dep, 0.0) + 1.0
        qual = v["quality"]
        if not first:
            for label, fam, where in (("late frames/s", "frames_late_total", None),
                                      ("dropped frames/s", "frames_dropped_total", None),
                                      ("refused sessions/s", "session_creates_total", {"code": "RESOURCE_EXHAUSTED"}),
                                      ("stream errors/s", "stream_ends_total", None)):
                grp = _group(delta, P + fam, ("code",), where)
                if fam == "stream_ends_total":
                    grp = {k: x for k, x in grp.items() if k[0] not in ("OK", "CANCELLED")}
                qual[label] = sum(grp.values()) / span
            rtf = _mean(delta, P + "session_realtime_factor")
            if rtf is not None:
                qual["real-time factor"] = rtf
        point = Point(t, v)
        self.points.append(point)
        while self.points and self.points[0].t < t - self.history_s:
            self.points.popleft()
        self.latest = {f"{c}:{k}": x for c, d in v.items() for k, x in d.items()}
        return point

    def to_json(self) -> Dict[str, Any]:
        charts: Dict[str, Dict[str, List[List[float]]]] = {c: collections.defaultdict(list) for c in self.CHARTS}
        for p in self.points:
            for c, d in p.values.items():
                for k, x in d.items():
                    charts[c][k].append([round(p.t, 3), round(x, 6)])
        return {"generated_at": time.time(), "window_s": self.window_s,
                "charts": {c: dict(s) for c, s in charts.items()}}


class _Scraper(threading.Thread):
    def __init__(self, dash: "OpsDashboard") -> None:
        super().__init__(name="ops-dashboard-scraper", daemon=True)
        self.dash = dash
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.dash.scrape_once()
            except Exception as exc:  # noqa: BLE001 - keep scraping; the page shows the last good data
                self.dash.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("ops dashboard scrape failed: %s", exc)
            self.stop_event.wait(self.dash.sample_interval_s)


class OpsDashboard:
    """Serve HTTP deployment body (see module docstring)."""

    def __init__(self, config: Optional[OpsSection] = None, fps: float = 25.0) -> None:
        cfg = config if isinstance(config, OpsSection) else OpsSection.model_validate(dict(config or {}))
        self.sample_interval_s = cfg.sample_interval_s
        self.metrics_urls: List[str] = list(cfg.metrics_urls)
        self.title = cfg.title
        self.refresh_ms = cfg.refresh_ms or max(1000, int(self.sample_interval_s * 1000))
        self.history = MetricsHistory(window_s=cfg.window_s, history_s=cfg.history_s, fps=float(fps))
        self.lock = threading.Lock()
        self.last_error = ""
        self.scrapes = 0
        self._scraper = _Scraper(self)
        self._scraper.start()

    def targets(self) -> List[str]:
        if self.metrics_urls:
            return self.metrics_urls
        import ray

        return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
                for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]

    def scrape_once(self) -> None:
        merged: Dict[SeriesKey, float] = {}
        errors = []
        targets = self.targets()
        for url in targets:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    text = resp.read().decode("utf-8", "replace")
            except OSError as exc:
                errors.append(f"{url}: {exc}")
                continue
            for k, v in parse_exposition(text).items():
                merged[k] = merged.get(k, 0.0) + v
        if targets and len(errors) == len(targets):
            raise DashboardError("; ".join(errors))
        with self.lock:
            self.history.add(time.time(), merged)
            self.scrapes += 1
            self.last_error = "; ".join(errors)

    def snapshot(self) -> Dict[str, Any]:
        with self.lock:
            data = self.history.to_json()
            data.update(scrapes=self.scrapes, last_error=self.last_error, title=self.title, refresh_ms=self.refresh_ms)
            return data

    async def handle(self, sub_path: str) -> Tuple[int, str, bytes]:
        """(status, media type, body) for a path below the dashboard's root ("", "/", "/api/series", "/healthz")."""
        path = sub_path.rstrip("/")
        if path == "/api/series":
            return 200, "application/json", json.dumps(self.snapshot()).encode()
        if path == "/healthz":
            ok = self.scrapes > 0
            return (200 if ok else 503), "text/plain", (b"ok" if ok else b"no scrape yet")
        if path == "":
            return 200, "text/html; charset=utf-8", render_page(self.snapshot()).encode()
        return 404, "text/plain", f"no dashboard page {sub_path!r}".encode()

    def __del__(self) -> None:
        scraper = getattr(self, "_scraper", None)
        if scraper is not None:
            scraper.stop_event.set()


_CHART_TITLES = {
    "latency": ("Latency", "s"),
    "fps": ("FPS per session", "fps"),
    "sessions": ("Sessions", ""),
    "replicas": ("Replicas per deployment", ""),
    "quality": ("Quality: late / dropped / refused / errors, real-time factor", ""),
}

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px system-ui, sans-serif; margin: 16px; background: #0f1419; color: #e6e6e6; }}
h1 {{ font-size: 18px; margin: 0 0 4px; }}
#status {{ color: #9aa5b1; font-size: 12px; margin-bottom: 12px; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }}
.card {{ background: #171d24; border: 1px solid #26303b; border-radius: 6px; padding: 8px 10px; }}
.card h2 {{ font-size: 14px; margin: 0 0 4px; font-weight: 600; }}
svg text {{ fill: #9aa5b1; font-size: 11px; }}
.legend span {{ display: inline-block; margin-right: 12px; font-size: 12px; }}
.legend i {{ display: inline-block; width: 10px; height: 3px; margin-right: 4px; vertical-align: middle; }}
.empty {{ color: #6b7785; font-size: 12px; }}
</style></head><body>
<h1>{title}</h1><div id="status"></div>
<div class="grid">{cards}</div>
<script id="initial-data" type="application/json">{data}</script>
<script>
"use strict";
const CHARTS = {charts};
const COLORS = ["#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176", "#90a4ae", "#f06292", "#4db6ac"];
function fmt(v) {{ const a = Math.abs(v); return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 1 ? v.toFixed(2) : v.toFixed(3); }}
function draw(id, series, unit) {{
  const svg = document.getElementById("chart-" + id), legend = document.getElementById("legend-" + id);
  const W = 540, H = 200, L = 48, R = 8, T = 8, B = 22;
  const names = Object.keys(series).sort();
  let pts = 0, t0 = Infinity, t1 = -Infinity, v0 = 0, v1 = -Infinity;
  for (const n of names) for (const [t, v] of series[n]) {{ pts++; t0 = Math.min(t0, t); t1 = Math.max(t1, t); v0 = Math.min(v0, v); v1 = Math.max(v1, v); }}
  svg.setAttribute("data-points", String(pts)); svg.setAttribute("data-series", String(names.length));
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  legend.innerHTML = "";
  const ns = "http://www.w3.org/2000/svg";
  const el = (tag, attrs, text) => {{ const e = document.createElementNS(ns, tag); for (const k in attrs) e.setAttribute(k, attrs[k]); if (text !== undefined) e.textContent = text; svg.appendChild(e); return e; }};
  if (!pts) {{ el("text", {{x: W / 2 - 40, y: H / 2}}, "no data yet"); return; }}
  if (v1 <= v0) v1 = v0 + 1; v1 *= 1.08; if (t1 <= t0) t0 = t1 - 1;
  const x = t => L + (W - L - R) * (t - t0) / (t1 - t0), y = v => T + (H - T - B) * (1 - (v - v0) / (v1 - v0));
  for (let i = 0; i <= 4; i++) {{
    const v = v0 + (v1 - v0) * i / 4, yy = y(v);
    el("line", {{x1: L, x2: W - R, y1: yy, y2: yy, stroke: "#26303b"}});
    el("text", {{x: 2, y: yy + 4}}, fmt(v) + (unit ? " " + unit : ""));
  }}
  el("text", {{x: L, y: H - 6}}, new Date(t0 * 1000).toLocaleTimeString());
  el("text", {{x: W - R - 60, y: H - 6}}, new Date(t1 * 1000).toLocaleTimeString());
  names.forEach((n, i) => {{
    const c = COLORS[i % COLORS.length], s = series[n];
    const p = s.map(([t, v]) => x(t).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
    if (s.length === 1) el("circle", {{cx: x(s[0][0]), cy: y(s[0][1]), r: 3, fill: c, "class": "series"}});
    else el("polyline", {{points: p, fill: "none", stroke: c, "stroke-width": 2, "class": "series", "data-name": n}});
    const last = s[s.length - 1][1];
    legend.insertAdjacentHTML("beforeend", '<span><i style="background:' + c + '"></i>' + n.replace(/[<&]/g, "") + ": " + fmt(last) + "</span>");
  }});
}}
function render(data) {{
  for (const id in CHARTS) draw(id, (data.charts || {{}})[id] || {{}}, CHARTS[id][1]);
  document.getElementById("status").textContent = "updated " + new Date(data.generated_at * 1000).toLocaleTimeString() +
    " \u00b7 " + data.scrapes + " scrapes \u00b7 window " + data.window_s + " s" + (data.last_error ? " \u00b7 last error: " + data.last_error : "");
}}
const initial = JSON.parse(document.getElementById("initial-data").textContent);
render(initial);
const api = location.pathname.replace(/\\/?$/, "/") + "api/series";
setInterval(() => fetch(api).then(r => r.json()).then(render).catch(() => {{}}), initial.refresh_ms || 5000);
</script></body></html>
"""


def render_page(snapshot: Mapping[str, Any]) -> str:
    """The dashboard HTML with `snapshot` (MetricsHistory.to_json + status) embedded."""
    cards = "".join(
        f'<div class="card"><h2>{html.escape(title)}</h2>'
        f'<svg id="chart-{cid}" class="chart" viewBox="0 0 540 200" width="100%" height="200" data-points="0"></svg>'
        f'<div id="legend-{cid}" class="legend"></div></div>'
        for cid, (title, _) in _CHART_TITLES.items())
    data = json.dumps(snapshot, separators=(",", ":")).replace("</", "<\\/")
    return _PAGE.format(title=html.escape(str(snapshot.get("title", "AvatarServe operations"))), cards=cards, data=data,
                        charts=json.dumps({k: [t, u] for k, (t, u) in _CHART_TITLES.items()}))
