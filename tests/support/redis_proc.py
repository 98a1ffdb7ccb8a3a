"""A redis-server a test owns: started on a free port, killed with SIGKILL, restarted on the same port with its data
kept (append-only file in its own folder) or lost (a fresh, empty folder). Never the session-wide `redis_server`."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from avatarserve.serve.ops.launcher import free_port

START_S = 20.0  # redis-server must accept connections (its data set loaded) within this after it is started


class OwnRedis:
    """`start()`, `kill()` (SIGKILL: no shutdown save), `start(keep_data=...)` again on the same port."""

    def __init__(self, *, appendonly: bool = True) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.appendonly = appendonly
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self._root = Path(tempfile.mkdtemp(prefix="own-redis-"))
        self._generation = 0
        self.dir = self._new_dir()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _new_dir(self) -> Path:
        self._generation += 1
        d = self._root / f"data{self._generation}"
        d.mkdir()
        return d

    def start(self, *, keep_data: bool = True) -> float:
        """Start (or restart on the same port); returns when it answers PING. Returns the time.monotonic() of the
        moment the process was started. `keep_data=False` starts from an empty folder (the data set is lost)."""
        import redis

        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("redis-server is already running")
        if not keep_data:
            self.dir = self._new_dir()
        for _attempt in range(3):
            if not self.port:
                self.port = free_port()
            args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                    "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                    "--daemonize", "no", "--loglevel", "warning"]
            started = time.monotonic()
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
            try:
                deadline = time.monotonic() + START_S
                while time.monotonic() < deadline and self.proc.poll() is None:
                    try:
                        if client.ping():
                            return started
                    except (redis.ConnectionError, redis.BusyLoadingError):
                        time.sleep(0.02)
            finally:
                client.close()
            err = self.proc.stderr.read().decode() if self.proc.poll() is not None and self.proc.stderr else ""
            self.stop()
            if self._generation == 1 and "Address already in use" in err:
                self.port = 0  # the first start only: a later one must keep its port
                continue
            raise RuntimeError(f"redis-server on port {self.port} did not answer within {START_S} s: {err}")
        raise RuntimeError("redis-server did not start (no free port)")

    def kill(self) -> float:
        """SIGKILL, and wait until the process is gone; returns the time.monotonic() of the kill."""
        assert self.proc is not None
        t = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        return t

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._root, ignore_errors=True)
