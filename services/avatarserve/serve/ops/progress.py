"""Watching an application deploy: per-deployment progress, the live display of `avatarserve up`, and the report
that names a failed replica.

`wait_running` polls Serve's status and every replica's startup record (control/startup.py) until the application
is RUNNING; it has no time limit by default (model loading is slow, not failing) and raises `DeployFailed` naming the
failed replica, its exception and its log file when Serve gives up. `ProgressDisplay` renders the progress: a live
block on a terminal, plain lines otherwise.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from avatarserve.serve.config import ConfigError
from avatarserve.serve.control.startup import read_startup_records

__all__ = ["DeployFailed", "DeploymentProgress", "ProgressDisplay", "deployment_progress", "wait_running"]


class DeployFailed(ConfigError):
    """Serve gave up deploying the application (a replica failed to start)."""


def _serve_status() -> Any:
    from ray import serve

    return serve.status()


@dataclass(frozen=True)
class DeploymentProgress:
    """One deployment while the application deploys: Serve's view plus what each replica reports (serve/control/startup.py)."""

    name: str
    status: str
    running: int
    replica_states: Dict[str, int]
    message: str
    replicas: tuple  # StartupRecord, one per replica that has reported

    @property
    def total(self) -> int:
        return sum(n for state, n in self.replica_states.items() if state not in ("STOPPING", "STOPPED"))


def deployment_progress(app_name: str, startup_client: Any = None, namespace: str = "") -> List["DeploymentProgress"]:
    """Snapshot of every deployment of `app_name` (Serve status + startup records, when a Redis client is given)."""
    app = _serve_status().applications.get(app_name)
    if app is None:
        return []
    records: Dict[str, list] = {}
    if startup_client is not None:
        try:
            for rec in read_startup_records(startup_client, namespace):
                records.setdefault(rec.deployment, []).append(rec)
        except Exception:  # noqa: BLE001 - progress is best effort; Serve's status still decides
            pass
    out = []
    for name, dep in app.deployments.items():
        states = {str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()}
        out.append(DeploymentProgress(name=name, status=str(getattr(dep.status, "value", dep.status)),
                                      running=states.get("RUNNING", 0), replica_states=states,
                                      message=str(dep.message or ""), replicas=tuple(records.get(name, ()))))
    return out


def _failure_report(app_name: str, serve_message: str, progress: List[DeploymentProgress]) -> str:
    failed = [r for p in progress for r in p.replicas if r.phase == "failed"]
    lines = [f"Serve application {app_name!r} failed to deploy."]
    for r in failed:
        lines.append(f"  replica {r.deployment}#{r.replica_id} failed: {r.error}"
                     + (f"\n    log: {r.log_file}" if r.log_file else ""))
    if not failed:
        for p in progress:
            if p.status == "DEPLOY_FAILED" or "fail" in p.message.lower():
                lines.append(f"  {p.name}: {p.message.strip().splitlines()[-1] if p.message.strip() else p.status}")
    tail = "\n".join(serve_message.strip().splitlines()[-6:])
    if tail:
        lines.append("  Serve says: " + tail.replace("\n", "\n    "))
    return "\n".join(lines)


def wait_running(app_names: List[str], redis_url: str, registry_namespace: str = "", *,
                 timeout_s: Optional[float] = None,
                 on_progress: Optional[Callable[[List[DeploymentProgress]], None]] = None,
                 poll_s: float = 0.5) -> None:
    """Wait until every application in `app_names` is RUNNING.

    No time limit by default (`timeouts.deploy_s`): replicas that load a model are slow, not failing. When Serve gives
    up on an application, raises `DeployFailed` naming the failed replica, its exception and its log file (from the
    replicas' startup records in Redis). `on_progress` receives a `DeploymentProgress` list at every poll."""
    import redis as redis_sync

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    startup_client = redis_sync.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
    last: Dict[str, Any] = {}
    try:
        while deadline is None or time.monotonic() < deadline:
            apps = _serve_status().applications
            last = {n: (str(apps[n].status) if n in apps else "MISSING") for n in app_names}
            progress = [p for n in app_names for p in deployment_progress(n, startup_client, registry_namespace)]
            if on_progress is not None:
                on_progress(progress)
            failed = [n for n in app_names if n in apps and str(apps[n].status).endswith("DEPLOY_FAILED")]
            if failed:
                raise DeployFailed("\n".join(_failure_report(n, str(apps[n].message), progress) for n in failed))
            if all(v.endswith("RUNNING") for v in last.values()):
                return
            time.sleep(poll_s)
    finally:
        startup_client.close()
    raise TimeoutError(f"Serve applications not RUNNING after {timeout_s:.0f} s (timeouts.deploy_s): {last}")


_SECONDS = re.compile(r" \[\d+s\]")


class ProgressDisplay:
    """Replica readiness while the application deploys: a live block on a terminal, plain lines otherwise."""

    def __init__(self, stream: Any = None, live: Optional[bool] = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._shown = 0  # lines drawn by the last live frame
        self._last_lines: Dict[str, str] = {}
        self.started = time.monotonic()

    @staticmethod
    def groups(progress: list) -> List[List[str]]:
        """One group of lines per deployment: its summary, then one line per replica that is not ready yet."""
        out = []
        for p in progress:
            lines: List[str] = []
            states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(p.replica_states.items()) if n and s != "RUNNING")
            head = f"{p.name}: {p.running}/{max(p.total, p.running)} ready" + (f" ({states})" if states else "")
            lines.append(head)
            for r in p.replicas:
                if r.phase == "ready" and p.running >= p.total:
                    continue
                what = {"loading": "loading weights", "importing": "importing"}.get(r.phase, r.phase)
                detail = f" {r.detail}" if r.detail and r.phase in ("loading", "importing") else ""
                err = f": {r.error}" if r.error else ""
                log = f" (log: {r.log_file})" if r.phase == "failed" and r.log_file else ""
                lines.append(f"  #{r.replica_id}: {what}{detail}{err} [{r.phase_seconds:.0f}s]{log}")
            if not p.replicas and p.running < max(1, p.total):
                lines.append("  starting the replica process (scheduling, importing Python modules)")
            msg = p.message.strip().splitlines()[0] if p.message.strip() else ""
            if msg and p.running < max(1, p.total):
                lines.append(f"  serve: {msg[:200]}")
            out.append(lines)
        return out

    def update(self, progress: list) -> None:
        groups = self.groups(progress)
        elapsed = f"[up {time.monotonic() - self.started:.0f}s]"
        if self.live:
            frame = [f"deploying {elapsed}", *(line for g in groups for line in g)]
            if self._shown:
                self.stream.write(f"\x1b[{self._shown}F\x1b[J")  # back to the frame's first line, clear below
            self.stream.write("\n".join(frame) + "\n")
            self._shown = len(frame)
        else:
            # Plain lines: one per deployment whose summary changed (seconds counters excluded from the comparison).
            for p, group in zip(progress, groups):
                key = "\n".join(_SECONDS.sub("", x) for x in group)
                if self._last_lines.get(p.name) != key:
                    self._last_lines[p.name] = key
                    self.stream.write(f"[up] {elapsed} " + " | ".join(x.strip() for x in group) + "\n")
        self.stream.flush()


