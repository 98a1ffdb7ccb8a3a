"""The TPP cluster on a real local Ray cluster + a real redis-server reproduces the sequential pipeline.

Frames are compared through their JPEG bytes: the VAE replica encodes frames with the same deterministic encoder
used here on the sequential pipeline's frames, so equal bytes mean equal frames (bit-exact on CPU).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from avatarserve.engine.bundle import build_bundle
from avatarserve.engine.pipeline import SequentialPipeline
from avatarserve.serve.dataplane.media import encode_jpeg_frames

pytestmark = pytest.mark.integration

from .conftest import APP, png as _png, speech as _speech

QUALITY = 90


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)  # replicas run with one torch thread; same reductions, same bits
    bundle = build_bundle("tiny", seed=0)
    pipe = SequentialPipeline(bundle)

    def frames_for(image: bytes, pcm: np.ndarray, seed: int, prompt: str):
        blocks = pipe.generate(image, pcm.astype(np.float32) / 32768.0, prompt=prompt, seed=seed)
        return [encode_jpeg_frames(b.frames, QUALITY) for b in blocks]

    return frames_for


def _stream(address: str, image: bytes, pcm: np.ndarray, seed: int, prompt: str):
    from avatarserve_client import AvatarClient
    from avatarserve_client.audio import chunk_pcm

    with AvatarClient(address, application=APP, timeout=120) as client:
        with client.session(image, prompt, seed=seed, formats=("jpeg",), jpeg_quality=QUALITY,
                            idle_mode="wait_for_audio") as s:
            blocks = list(s.stream(chunk_pcm(pcm, chunk_ms=100), decode=False, timeout=600))
            info = client.get_session(s.handle)
    return blocks, info


def test_cluster_reproduces_sequential_pipeline_20_blocks(cluster, reference):
    image, pcm = _png(1), _speech(20, seed=1)
    blocks, _ = _stream(cluster, image, pcm, seed=42, prompt="a person talking")
    expected = reference(image, pcm, 42, "a person talking")
    assert len(blocks) == len(expected) == 20
    assert [b.block_index for b in blocks] == list(range(20))
    assert [b.pts_ms for b in blocks] == [480 * i for i in range(20)]
    for got, exp in zip(blocks, expected):
        assert got.num_frames == 12
        assert list(got.jpeg_frames) == exp, f"block {got.block_index} differs from the sequential pipeline"


def test_two_concurrent_sessions_no_cross_talk(cluster, reference):
    inputs = [(_png(10), _speech(6, seed=2), 7, "first"), (_png(20), _speech(6, seed=3), 8, "second")]
    results = [None, None]
    errors = []

    def run(i):
        try:
            results[i] = _stream(cluster, *inputs[i])[0]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for (image, pcm, seed, prompt), got in zip(inputs, results):
        expected = reference(image, pcm, seed, prompt)
        assert [list(b.jpeg_frames) for b in got] == expected
    assert [list(b.jpeg_frames) for b in results[0]] != [list(b.jpeg_frames) for b in results[1]]
