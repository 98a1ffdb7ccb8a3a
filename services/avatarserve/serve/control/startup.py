"""What each stage replica is doing while it starts, for `avatarserve up` and operators.

A replica reports its phase to Redis as it goes (synchronously: Serve runs the replica's constructor on a thread
that blocks until the model is loaded):

    startup:{deployment}:{replica_id}   hash  deployment, replica_id, phase, detail, pid, node, log_file,
                                              started_ms, phase_ms, updated_ms, error

Phases: "starting" (constructor entered), "serving" (data-plane server listening), "importing" (the handler's
module), "loading" (building the model / reading weights), "measuring" (timing the stage's forward on synthetic
sessions, for its measured capacity), "registering", "ready", "failed". While a replica is
starting, a daemon thread refreshes the record every `REFRESH_S`, and the record expires `LIVE_TTL_S` after the
last refresh: a replica process that dies stops being shown. Records of ready and failed replicas are kept for
`DONE_TTL_S`, so the launcher can show them and name the failing replica, its exception and its log file.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import redis

__all__ = ["PHASES", "StartupRecord", "StartupReporter", "read_startup_records"]

log = logging.getLogger(__name__)

PHASES = ("starting", "serving", "importing", "loading", "measuring", "registering", "ready", "failed")
REFRESH_S = 5.0
LIVE_TTL_S = 30.0
DONE_TTL_S = 900.0


def _key(namespace: str, deployment: str, replica_id: str) -> str:
    return f"{namespace}startup:{deployment}:{replica_id}"


@dataclass(frozen=True)
class StartupRecord:
    deployment: str
    replica_id: str
    phase: str
    detail: str = ""
    pid: int = 0
    node: str = ""
    log_file: str = ""
    error: str = ""
    started_ms: int = 0
    phase_ms: int = 0

    @property
    def phase_seconds(self) -> float:
        return max(0.0, time.time() - self.phase_ms / 1000.0) if self.phase_ms else 0.0


class StartupReporter:
    """Writes one replica's startup phases to Redis. Never raises: reporting must not stop a replica from starting."""

    def __init__(self, redis_url: str, *, namespace: str, deployment: str, replica_id: str,
                 log_file: Optional[str] = None) -> None:
        self._client = redis.Redis.from_url(redis_url, socket_connect_timeout=10, socket_timeout=10)
        self._key = _key(namespace, deployment, replica_id)
        self._base = {"deployment": deployment, "replica_id": replica_id, "pid": os.getpid(),
                      "node": socket.gethostname(), "log_file": log_file or "", "started_ms": _now_ms()}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.phase = ""

    def report(self, phase: str, detail: str = "", error: str = "") -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown startup phase {phase!r}")
        self.phase = phase
        done = phase in ("ready", "failed")
        fields = {**self._base, "phase": phase, "detail": detail, "error": error, "phase_ms": _now_ms(),
                  "updated_ms": _now_ms()}
        self._write(fields, DONE_TTL_S if done else LIVE_TTL_S)
        if done:
            self._done.set()
        elif self._thread is None:
            self._thread = threading.Thread(target=self._refresh, name="startup-reporter", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._done.set()
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass

    def _write(self, fields: Dict[str, object], ttl_s: float) -> None:
        try:
            with self._lock:
                p = self._client.pipeline(transaction=True)
                p.hset(self._key, mapping={k: str(v) for k, v in fields.items()})
                p.pexpire(self._key, int(ttl_s * 1000))
                p.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("startup report %s failed: %s", self._key, exc)

    def _refresh(self) -> None:
        while not self._done.wait(REFRESH_S):
            try:
                with self._lock:
                    p = self._client.pipeline(transaction=True)
                    p.hset(self._key, "updated_ms", str(_now_ms()))
                    p.pexpire(self._key, int(LIVE_TTL_S * 1000))
                    p.execute()
            except (redis.RedisError, OSError) as exc:
                log.warning("startup report refresh %s failed: %s", self._key, exc)


def read_startup_records(client: "redis.Redis", namespace: str) -> List[StartupRecord]:
    """Every unexpired startup record under `namespace` (a sync client)."""
    out: List[StartupRecord] = []
    for key in client.scan_iter(match=f"{namespace}startup:*", count=500):
        h = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in client.hgetall(key).items()}
        if not h.get("deployment"):
            continue
        out.append(StartupRecord(deployment=h["deployment"], replica_id=h.get("replica_id", ""),
                                 phase=h.get("phase", ""), detail=h.get("detail", ""), pid=int(h.get("pid") or 0),
                                 node=h.get("node", ""), log_file=h.get("log_file", ""), error=h.get("error", ""),
                                 started_ms=int(h.get("started_ms") or 0), phase_ms=int(h.get("phase_ms") or 0)))
    return sorted(out, key=lambda r: (r.deployment, r.replica_id))


def _now_ms() -> int:
    return int(time.time() * 1000)
