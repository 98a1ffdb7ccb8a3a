"""Session-wide deployment of the AvatarServe app on the shared local Ray cluster + redis-server."""

from __future__ import annotations

import io
import numpy as np
import pytest

APP = "avatarserve"


def png(seed: int, size=(80, 96)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((size[0], size[1], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def speech(blocks: int, seed: int) -> np.ndarray:
    """Speech-like int16 PCM of exactly `blocks` blocks (tiny config: 7680 samples per block)."""
    rng = np.random.default_rng(seed)
    n = blocks * 7680
    t = np.arange(n) / 16000
    env = (np.sin(2 * np.pi * (2 + seed) * t) > 0).astype(np.float32)
    x = 0.3 * env * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(n)
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


@pytest.fixture(scope="session")
def cluster(serve_instance, redis_server):
    """gRPC address of a running AvatarServe app (tiny model) on the test session's Ray cluster."""
    from ray import serve

    from avatarserve.serve.builder import build_app
    from avatarserve.serve.ops.launcher import wait_grpc_healthy
    from avatarserve.serve.ops.progress import wait_running

    cfg = {"redis_url": redis_server.url, "namespace": "itest:", "registry_namespace": "itest:",
           "model": {"config": "tiny", "seed": 0},
           "auth": {"mode": "disabled"},  # not about API keys (tests/integration/test_auth.py deploys its own app)
           # One block per forward: concurrent sessions here are compared with the sequential pipeline bit for bit
           # (batched forwards equal it up to float round-off: tests/integration/test_batching.py).
           # admit_by configured: tests here fill the app to its configured capacity (test_vanished_clients).
           "scheduling": {"max_batch": 1, "admit_by": "configured"},
           # Teardown (serve.delete) waits for the stage replicas: a short drain keeps it within Serve's wait.
           "timeouts": {"session_drain_s": 30,
                        # sessions past their idle timeout close within a second (test_contract.py)
                        "idle_sweep_s": 1.0}}
    serve.run(build_app(cfg), name=APP, route_prefix="/avatarserve", blocking=False)
    wait_running([APP], redis_server.url, "itest:")  # no time limit: a busy machine loads slowly, it does not fail
    wait_grpc_healthy(serve_instance.grpc_address, timeout=300)
    yield serve_instance.grpc_address
    serve.delete(APP)
