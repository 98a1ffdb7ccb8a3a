"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from avatarserve.serve.ops.launcher import free_port

REDIS_PASSWORD = "s3cret/pass"


@pytest.fixture(scope="session")
def password_redis():
    """A redis-server that requires a password (the chart's Secret-backed Redis)."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--requirepass", REDIS_PASSWORD, "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, password=REDIS_PASSWORD)
    while True:  # redis-server starts in milliseconds; a hang is caught by the test timeout
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None, "redis-server exited"
            time.sleep(0.05)
    yield port, client
    client.close()
    proc.terminate()
    proc.wait(30)
