"""The data plane across nodes: a real three-node Ray cluster on this machine (head 127.0.0.2, workers 127.0.0.3 and
127.0.0.4, each started with `ray start`), with custom resources that force the stage roles onto different nodes.

What it proves:
- each stage replica binds and registers its own node's address (127.0.0.2:<port> / 127.0.0.3:<port>, not
  127.0.0.1 for all), from the configured fixed port range; a replica bound to 127.0.0.4 is not reachable on
  127.0.0.1, so a hop that used a wrong address would fail, not silently work;
- the registry is namespaced by RAY_CLUSTER_NAME (set in every node's environment, as KubeRay does), and the Redis
  URL and password come from the environment (REDIS_URL / REDIS_PASSWORD), not from the Serve config;
- a session streamed through the gateway on the head equals SequentialPipeline bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from avatarserve.engine.bundle import build_bundle
from avatarserve.engine.pipeline import SequentialPipeline
from avatarserve.serve.dataplane.media import encode_jpeg_frames
from avatarserve.serve.ops.launcher import free_port, wait_grpc_healthy
from tests.e2e.conftest import REDIS_PASSWORD
from tests.support.multinode import LocalRayNodes, NodeSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

CLUSTER_NAME = "avatarserve-mn"
PORTS = (23100, 23199)
QUALITY = 90
# Roles pinned to nodes: AudioEncoder and VaeDecoder on 127.0.0.3, every DenoiseStage on 127.0.0.4; gateway, sink
# cache and ops page on the head (127.0.0.2: Ray swaps 127.0.0.1 for the routable address in a multi-node cluster).
PLACEMENT = {"audio": "node-b", "vae": "node-b", "denoise": "node-c", "gateway": "head", "cache": "head", "ops": "head"}
NODES = [NodeSpec("127.0.0.2", 2, {"head": 100}), NodeSpec("127.0.0.3", 2, {"node-b": 100}),
         NodeSpec("127.0.0.4", 2, {"node-c": 100})]


def _speech(blocks: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = blocks * 7680  # tiny config: 7680 samples per block
    t = np.arange(n) / 16000
    x = 0.3 * (np.sin(2 * np.pi * 3 * t) > 0) * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(n)
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    arr = (np.random.default_rng(seed).random((80, 96, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def multinode(tmp_path_factory, password_redis):
    port, client = password_redis
    env = {"RAY_CLUSTER_NAME": CLUSTER_NAME, "REDIS_URL": f"redis://127.0.0.1:{port}/0",
           "REDIS_PASSWORD": REDIS_PASSWORD}
    nodes = LocalRayNodes(NODES, tmp_path_factory.mktemp("multinode"), env=env).start()
    grpc_port, http_port = free_port(), free_port()
    app = {"model": {"config": "tiny", "seed": 0}, "namespace": "mn:", "auth": {"mode": "disabled"},
           "data_plane": {"port_min": PORTS[0], "port_max": PORTS[1]},
           "resources": {role: {"num_cpus": 0.1, "resources": {node: 1}} for role, node in PLACEMENT.items()},
           "timeouts": {"session_drain_s": 5}}
    try:
        driver = subprocess.run(
            [sys.executable, "-m", "tests.support.multinode", "deploy", "--address", nodes.address, "--nodes",
             str(len(NODES)), "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--app", json.dumps(app)],
            env={**os.environ, **nodes.env}, capture_output=True, text=True, timeout=1800)
        assert driver.returncode == 0, f"{driver.stderr[-4000:]}\n{nodes.logs()}"
        address = f"{NODES[0].ip}:{grpc_port}"  # the Serve proxy runs on the head only
        wait_grpc_healthy(address, timeout=300)
        yield address, client
    finally:
        nodes.stop()


def _registry(client) -> dict:
    """deployment -> [address] of every registered replica, read straight from Redis."""
    out: dict = {}
    for key in client.scan_iter(match=f"{CLUSTER_NAME}:replica:*"):
        h = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
        out.setdefault(h["deployment"], []).append(h["address"])
    return out


def test_stages_on_three_nodes_register_their_own_address_and_match_sequential(multinode):
    from avatarserve_client import AvatarClient
    from avatarserve_client.audio import chunk_pcm

    address, client = multinode
    registry = _registry(client)
    print("MULTINODE_REGISTRY", json.dumps({d: sorted(a) for d, a in sorted(registry.items())}))
    expected_nodes = {"AudioEncoder": "127.0.0.3", "VaeDecoder": "127.0.0.3",
                      **{f"DenoiseStage{k}": "127.0.0.4" for k in range(4)}}
    assert set(registry) == set(expected_nodes), registry
    for deployment, addresses in registry.items():
        for addr in addresses:
            host, port = addr.rsplit(":", 1)
            assert host == expected_nodes[deployment], f"{deployment} registered {addr}"
            assert PORTS[0] <= int(port) <= PORTS[1], f"{deployment} bound {addr}, outside the port range {PORTS}"
    # Nothing is registered without the cluster's namespace (the registry is per Ray cluster).
    assert not [k for k in client.scan_iter(match="replica:*")]
    # Bound to its node's address only: the same port on 127.0.0.1 refuses (a wrong address would fail loudly).
    import socket

    host, port = registry["DenoiseStage0"][0].rsplit(":", 1)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()

    image, pcm = _png(3), _speech(8, seed=4)
    with AvatarClient(address, application="avatarserve", timeout=300) as c:
        with c.session(image, "a person talking", seed=11, formats=("jpeg",), jpeg_quality=QUALITY,
                       idle_mode="wait_for_audio") as s:
            blocks = list(s.stream(chunk_pcm(pcm, chunk_ms=100), decode=False, timeout=900))
    torch.set_num_threads(1)  # replicas run one torch thread: same reductions, same bits
    expected = SequentialPipeline(build_bundle("tiny", seed=0)).generate(
        image, pcm.astype(np.float32) / 32768.0, prompt="a person talking", seed=11)
    assert [b.block_index for b in blocks] == list(range(len(expected))) and len(expected) == 8
    for got, exp in zip(blocks, expected):
        assert list(got.jpeg_frames) == encode_jpeg_frames(exp.frames, QUALITY), \
            f"block {got.block_index} differs from the sequential pipeline"
