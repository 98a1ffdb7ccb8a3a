"""Cross-session batching in the cluster: with `scheduling.max_batch` 4 the stages may put the blocks of several
sessions into one forward (denoise) or one batched decode (VAE), and every session's video still equals the
sequential pipeline's up to float round-off.

An application of its own ("batching", one replica per stage) on the test session's Ray cluster; three sessions
stream at once, faster than real time, so their blocks meet in the queue of the slowest stage (the VAE decoder: on
the tiny model it takes ~60 ms a block, a denoise step ~4 ms). Checked:

- each session's frames against the sequential pipeline run alone (decoded JPEG: mean and max pixel difference
  bounded; the count of blocks equal bit for bit is printed);
- the sessions' videos differ from each other (no cross talk between batch rows);
- the replicas did batch: Ray's metrics show calls of more than one block (`avatarserve_stage_batch_size`).
"""

from __future__ import annotations

import io
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

from avatarserve.engine.bundle import build_bundle
from avatarserve.engine.pipeline import SequentialPipeline
from avatarserve.serve.dataplane.media import encode_jpeg_frames

from .conftest import png as _png, speech as _speech

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP = "batching"
NS = "batching:"
QUALITY = 90
BLOCKS = 8
SESSIONS = 3
METRICS_ARRIVAL_S = 120.0  # Ray exports every second; its agent may lag on a busy machine
# Batched forwards sum in another order: latents differ by ~1e-6 (tests/model/test_batched_forward.py), which moves
# a pixel by at most one level before JPEG; JPEG then spreads a flipped coefficient over its 8x8 block.
MAX_MEAN_ABS_DIFF = 0.5
MAX_PIXEL_DIFF = 24


@pytest.fixture(scope="module")
def batching_app(serve_instance, redis_server):
    from ray import serve

    from avatarserve.serve.builder import build_app
    from avatarserve.serve.ops.launcher import wait_grpc_healthy
    from avatarserve.serve.ops.progress import wait_running

    cfg = {"name": APP, "route_prefix": f"/{APP}", "redis_url": redis_server.url, "namespace": NS,
           "registry_namespace": NS, "model": {"config": "tiny", "seed": 0}, "auth": {"mode": "disabled"},
           "replicas": {"gateway": 1, "audio": 1, "denoise": 1, "vae": 1},
           "resources": {"audio": {"num_cpus": 0.05}, "denoise": {"num_cpus": 0.05}, "vae": {"num_cpus": 0.05}},
           "autoscaling": {"enabled": False}, "ops": {"enabled": False},
           # admit_by configured: about batching, not admission (three sessions whatever this machine measures)
           "scheduling": {"max_batch": 4, "admit_by": "configured"}, "timeouts": {"session_drain_s": 30}}
    serve.run(build_app(cfg), name=APP, route_prefix=f"/{APP}", blocking=False)
    try:
        wait_running([APP], redis_server.url, NS)
        wait_grpc_healthy(serve_instance.grpc_address, timeout=300, application=APP)
        yield serve_instance.grpc_address
    finally:
        serve.delete(APP)


def _stream(address: str, image: bytes, pcm: np.ndarray, seed: int, prompt: str):
    from avatarserve_client import AvatarClient
    from avatarserve_client.audio import chunk_pcm

    with AvatarClient(address, application=APP, timeout=300) as client:
        with client.session(image, prompt, seed=seed, formats=("jpeg",), jpeg_quality=QUALITY,
                            idle_mode="wait_for_audio") as s:
            return list(s.stream(chunk_pcm(pcm, chunk_ms=480), decode=False, timeout=900))


def _decode(jpegs) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB"), dtype=np.int16) for j in jpegs])


def _batch_sizes(port: int) -> dict:
    """{"count": forwards, "single": forwards of one block} of this app's stages, from Ray's exposition."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    count = single = 0.0
    for line in text.splitlines():
        if not line.startswith("ray_avatarserve_stage_batch_size") or f'application="{APP}"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("ray_avatarserve_stage_batch_size_count"):
            count += value
        elif re.search(r'le="1(\.0)?"', line):
            single += value
    return {"count": count, "single": single}


def test_batched_sessions_equal_the_sequential_pipeline_up_to_round_off(batching_app, ray_cluster):
    inputs = [(_png(30 + i), _speech(BLOCKS, seed=10 + i), 100 + i, ["first", "second", "third"][i])
              for i in range(SESSIONS)]
    results, errors = [None] * SESSIONS, []
    start = threading.Barrier(SESSIONS)

    def run(i):
        try:
            start.wait(60)
            results[i] = _stream(batching_app, *inputs[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    torch.set_num_threads(1)
    pipe = SequentialPipeline(build_bundle("tiny", seed=0))
    streams = []
    for (image, pcm, seed, prompt), got in zip(inputs, results):
        assert [b.block_index for b in got] == list(range(BLOCKS))
        expected = [encode_jpeg_frames(b.frames, QUALITY)
                    for b in pipe.generate(image, pcm.astype(np.float32) / 32768.0, prompt=prompt, seed=seed)]
        a = _decode([j for b in got for j in b.jpeg_frames])
        e = _decode([j for blk in expected for j in blk])
        diff = np.abs(a - e)
        exact = sum(list(b.jpeg_frames) == blk for b, blk in zip(got, expected))
        print(f"session {seed}: {exact}/{BLOCKS} blocks bit for bit; pixel diff mean {diff.mean():.4f} "
              f"max {diff.max()}")
        assert diff.mean() <= MAX_MEAN_ABS_DIFF and diff.max() <= MAX_PIXEL_DIFF
        streams.append(a)
    for i in range(SESSIONS):
        for j in range(i + 1, SESSIONS):
            assert np.abs(streams[i] - streams[j]).mean() > 5 * MAX_MEAN_ABS_DIFF  # no cross talk

    deadline = time.monotonic() + METRICS_ARRIVAL_S
    sizes = _batch_sizes(ray_cluster.metrics_export_port)
    while sizes["count"] < 4 * BLOCKS and time.monotonic() < deadline:  # the stages' last forwards still arriving
        time.sleep(1.0)
        sizes = _batch_sizes(ray_cluster.metrics_export_port)
    print(f"stage calls: {sizes['count']:.0f}, of more than one block: {sizes['count'] - sizes['single']:.0f}")
    assert sizes["count"] > 0, "no avatarserve_stage_batch_size series for this application"
    assert sizes["single"] < sizes["count"], "no stage call held more than one session's block"
