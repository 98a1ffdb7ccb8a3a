"""The single-process pipeline and the runners it chains (tiny config, random weights)."""

import itertools
import math

import numpy as np
import pytest
import torch

from avatarserve.engine.errors import BlockOrderError, InvalidInput, SessionExists, SessionNotFound
from avatarserve.engine.pipeline import SequentialPipeline
from avatarserve.engine.runners import AudioEncoderRunner, StageRunner
from avatarserve.engine.sink import SinkState, block_noise, derive_seed

from .conftest import speech_like


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return SequentialPipeline(tiny_bundle)


def test_frames_cover_audio_rounded_up_to_blocks(pipe, face_png):
    st = pipe.stream
    audio = speech_like(2.0)
    blocks = pipe.generate(face_png, audio, prompt="hello", seed=1)
    expected_blocks = math.ceil(len(audio) / st.samples_per_block)
    assert len(blocks) == expected_blocks == 5
    assert [b.block_index for b in blocks] == list(range(5))
    assert [b.pts_ms for b in blocks] == [480 * i for i in range(5)]
    for b in blocks:
        assert b.frames.shape == (12, st.height, st.width, 3) and b.frames.dtype == np.uint8


def test_deterministic_for_a_seed_and_seed_matters(pipe, face_png):
    audio = speech_like(1.0, seed=2)
    a = pipe.generate(face_png, audio, seed=7)
    b = pipe.generate(face_png, audio, seed=7)
    c = pipe.generate(face_png, audio, seed=8)
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b))
    assert not all(np.array_equal(x.frames, y.frames) for x, y in zip(a, c))


def test_chunking_of_audio_does_not_change_output(pipe, face_png):
    audio = speech_like(1.5, seed=3)
    a = pipe.generate(face_png, audio, seed=1, chunk_samples=320)
    b = pipe.generate(face_png, audio, seed=1, chunk_samples=16000)
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b))


def test_sessions_interleaved_do_not_interfere(pipe, face_png, tiny_bundle):
    other = (np.random.default_rng(5).random((64, 64, 3)) * 255).astype(np.uint8)
    aud1, aud2 = speech_like(1.0, seed=4), speech_like(1.0, seed=5)
    alone1 = pipe.generate(face_png, aud1, seed=1)
    alone2 = pipe.generate(other, aud2, seed=2)
    g1 = pipe.stream_blocks(face_png, iter([aud1]), seed=1, session_id="s1")
    g2 = pipe.stream_blocks(other, iter([aud2]), seed=2, session_id="s2")
    inter1, inter2 = [], []
    for x, y in itertools.zip_longest(g1, g2):
        inter1.append(x)
        inter2.append(y)
    assert len(inter1) == len(alone1) and len(inter2) == len(alone2)
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(alone1, inter1))
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(alone2, inter2))
    # every runner freed both sessions
    assert len(pipe.audio.sessions) == 0 and len(pipe.decoder.sessions) == 0
    assert all(len(s.sessions) == 0 for s in pipe.stages)


def test_adaptive_attention_sink_swaps_reference_after_first_clip(pipe, face_png, tiny_bundle):
    st = pipe.stream
    audio = speech_like(st.block_seconds * (st.aas_after_blocks + 2), seed=6)
    sid = "aas"
    gen = pipe.stream_blocks(face_png, iter([audio]), seed=3, session_id=sid)
    first = next(gen)
    for stage in pipe.stages:
        sess = stage.sessions.get(sid)
        assert sess.cache.sink_version == 0
        assert torch.equal(sess.sink.aas_latent, first.latents[:, :, :1].float())
    blocks = [first]
    while len(blocks) < st.aas_after_blocks + 1:
        blocks.append(next(gen))
    model = tiny_bundle.transformer
    for stage in pipe.stages:
        sess = stage.sessions.get(sid)
        assert sess.cache.sink_version == 1  # re-prefilled with the generated latent
        fresh = model.new_cache(st.latent_height, st.latent_width, st.latent_frames_per_block, st.window_blocks)
        from avatarserve.model.transformer import SinkInputs

        model.prefill_sink(fresh, SinkInputs(sess.sink.aas_latent, sess.sink.motion), sess.sink.text)
        for a, b in zip(fresh.layers, sess.cache.layers):
            assert torch.equal(a.cond_k, b.cond_k) and torch.equal(a.cond_v, b.cond_v)
    gen.close()


def test_rolling_sink_distance_is_seeded_and_in_range(tiny_bundle):
    st = tiny_bundle.stream
    sink = SinkState(reference=torch.zeros(1), motion=torch.zeros(1), text=torch.zeros(1), seed=11)
    ds = [sink.sink_distance(b, s, st) for b in range(50) for s in range(4)]
    assert min(ds) >= 4 and max(ds) <= 30 and len(set(ds)) > 5
    assert ds == [sink.sink_distance(b, s, st) for b in range(50) for s in range(4)]
    for b in range(50):
        idx = sink.sink_index(b, 0, st)
        d = sink.sink_distance(b, 0, st)
        assert idx == 30 + max(0, 3 * b - (30 - d))
    assert sink.sink_index(40, 0, st.replace(rolling_rope=False)) == 30


def test_block_noise_is_pure_function_of_seed_and_block():
    a = block_noise(5, 3, (1, 16, 3, 8, 8))
    assert torch.equal(a, block_noise(5, 3, (1, 16, 3, 8, 8)))
    assert not torch.equal(a, block_noise(5, 4, (1, 16, 3, 8, 8)))
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_runner_errors(tiny_bundle, face_png):
    st = tiny_bundle.stream
    audio = AudioEncoderRunner(tiny_bundle.audio, st)
    audio.create("x")
    with pytest.raises(SessionExists):
        audio.create("x")
    with pytest.raises(SessionNotFound):
        audio.push("nope", np.zeros(10, np.float32))
    with pytest.raises(InvalidInput, match="NaN"):
        audio.push("x", np.array([np.nan], np.float32))
    with pytest.raises(InvalidInput, match="float32"):
        audio.push("x", np.zeros(10, np.int16))
    audio.close("x")
    with pytest.raises(SessionNotFound):
        audio.close("x")

    pipe = SequentialPipeline(tiny_bundle)
    with pytest.raises(InvalidInput, match="decode"):
        list(pipe.stream_blocks(b"not an image", iter([np.zeros(100, np.float32)])))
    stage = StageRunner(1, tiny_bundle.transformer, tiny_bundle.schedule, st)
    sink = pipe.decoder.prepare_sink(face_png, tiny_bundle.encode_prompt(""), 0)
    stage.create("s", sink)
    audio.create("s")
    audio.push("s", np.zeros(st.samples_per_block * 2, np.float32))
    p0 = audio.next_block("s")
    with pytest.raises(BlockOrderError):  # stage 1 cannot take a block that skipped stage 0
        stage.step(p0)
    p1 = audio.next_block("s")
    p1.steps_done = 1
    with pytest.raises(BlockOrderError):
        stage.step(p1)  # block 1 before block 0
    stage.close("s")
    audio.close("s")
