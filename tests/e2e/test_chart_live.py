"""The Helm chart's Serve config is live, not just valid: the CPU profile (k8s/avatarserve/values-cpu.yaml) is
rendered, its `serveConfigV2` is deployed as it is on a local two-node Ray cluster shaped like the chart's pods (the
head offers the head group's Ray resources, one worker node the `cpu` group's), with REDIS_URL / REDIS_PASSWORD /
RAY_CLUSTER_NAME in every node's environment as KubeRay and the chart's Secret set them, and a session streams
through it and equals SequentialPipeline bit for bit.

Two things differ from a pod, both because every node shares this machine's loopback: the proxies' ports are free
ports (values `serve.grpcPort` / `serve.httpPort`) and the HTTP proxy binds the head's address instead of 0.0.0.0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from avatarserve.engine.bundle import build_bundle
from avatarserve.engine.pipeline import SequentialPipeline
from avatarserve.serve.dataplane.media import encode_jpeg_frames
from avatarserve.serve.ops.launcher import free_port, wait_grpc_healthy
from tests.e2e.conftest import REDIS_PASSWORD
from tests.support.multinode import LocalRayNodes, NodeSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

HEAD, WORKER = "127.0.0.5", "127.0.0.6"
CLUSTER_NAME = "avatarserve-raycluster-test"  # KubeRay names the RayService's cluster <service>-raycluster-<hash>
QUALITY = 85


def _num_cpus(group: dict) -> int:
    return int(str(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]))


def test_rendered_cpu_profile_serves_a_session(tmp_path, password_redis):
    from avatarserve_client import AvatarClient
    from avatarserve_client.audio import chunk_pcm
    from avatarserve.toy.demo import write_demo_inputs

    from tests.k8s.render import render

    grpc_port, http_port = free_port(), free_port()
    r = render("cpu", values={"serve": {"grpcPort": grpc_port, "httpPort": http_port}})
    config = r.serve_config
    assert config["http_options"]["host"] == "0.0.0.0"
    config["http_options"]["host"] = HEAD  # loopback only on this machine (see the module docstring)
    path = tmp_path / "serveConfigV2.yaml"
    path.write_text(yaml.safe_dump(config))

    groups = r.groups()
    port, client = password_redis
    env = {"RAY_CLUSTER_NAME": CLUSTER_NAME, "REDIS_URL": f"redis://127.0.0.1:{port}/0",
           "REDIS_PASSWORD": REDIS_PASSWORD}
    nodes = LocalRayNodes([NodeSpec(HEAD, _num_cpus(groups["head"]), r.head_ray_resources),
                           NodeSpec(WORKER, _num_cpus(groups["cpu"]), r.ray_resources("cpu"))],
                          tmp_path / "nodes", env=env).start()
    try:
        driver = subprocess.run([sys.executable, "-m", "tests.support.multinode", "deploy", "--address", nodes.address,
                                 "--nodes", "2", "--app", f"@{path}"],
                                env={**os.environ, **nodes.env}, capture_output=True, text=True, timeout=1800)
        assert driver.returncode == 0, f"{driver.stderr[-4000:]}\n{nodes.logs()}"
        address = f"{HEAD}:{grpc_port}"
        wait_grpc_healthy(address, timeout=300)

        # The Gateway is where the chart pins it (the head's ingress resource); stages registered under the
        # cluster's namespace with addresses of the chart's data-plane port range.
        lo, hi = r.app_args["data_plane"]["port_min"], r.app_args["data_plane"]["port_max"]
        records = [{k.decode(): v.decode() for k, v in client.hgetall(key).items()}
                   for key in client.scan_iter(match=f"{CLUSTER_NAME}:replica:*")]
        assert {rec["deployment"] for rec in records} >= {"AudioEncoder", "VaeDecoder", "DenoiseStage0"}
        for rec in records:
            host, p = rec["address"].rsplit(":", 1)
            assert host in (HEAD, WORKER) and lo <= int(p) <= hi, rec

        demo = write_demo_inputs(str(tmp_path), seconds=2.0)
        import soundfile

        pcm, rate = soundfile.read(demo["audio"], dtype="int16")
        image = open(demo["image"], "rb").read()
        # The chart's app requires API keys (the default): an operator's key in the cluster's Redis, made the
        # documented way (REDIS_URL + REDIS_PASSWORD, as on the head pod).
        made = subprocess.run([sys.executable, "-m", "avatarserve.cli", "keys", "create", "--name", "chart-live",
                               "--namespace", r.app_args.get("namespace", "avatarserve:")],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        api_key = json.loads(made.stdout)["api_key"]
        with AvatarClient(address, application="avatarserve", timeout=300, api_key=api_key) as c:
            with c.session(image, "a face", seed=5, formats=("jpeg",), jpeg_quality=QUALITY,
                           idle_mode="wait_for_audio") as s:
                blocks = list(s.stream(chunk_pcm(pcm, chunk_ms=100, sample_rate=rate), decode=False, timeout=900))
    finally:
        nodes.stop()
    torch.set_num_threads(1)
    expected = SequentialPipeline(build_bundle("toy")).generate(
        image, pcm.astype(np.float32) / 32768.0, prompt="a face", seed=5)
    assert len(blocks) == len(expected) > 0
    for got, exp in zip(blocks, expected):
        assert list(got.jpeg_frames) == encode_jpeg_frames(exp.frames, QUALITY), \
            f"block {got.block_index} differs from the sequential pipeline"
