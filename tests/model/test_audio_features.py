"""AudioFeatureExtractor: upstream-faithful whole-file resampling and bounded, causal streaming."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2ForCTC

from avatarserve.model.audio_features import (
    DEFAULT_LEFT_CONTEXT_S,
    SAMPLE_RATE,
    AudioBufferOverflowError,
    AudioFeatureExtractor,
    AudioFormatError,
    AudioModelError,
    AudioNotReadyError,
    AudioWindowError,
    cosine_per_frame,
    features_to_model_input,
    pcm_s16le_to_float,
    tiny_wav2vec2_config,
)
from avatarserve.model.config import TINY, StreamConfig

SPB = StreamConfig().samples_per_block  # 7680 samples = 12 frames at 25 fps


@pytest.fixture(scope="module")
def ex() -> AudioFeatureExtractor:
    return AudioFeatureExtractor.tiny(seed=0)


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Deterministic voiced signal with a moving pitch, syllable-rate envelope, pauses and noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t) + 15 * np.sin(2 * np.pi * 2.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * 3.9 * t + 2 * np.sin(2 * np.pi * 0.5 * t)), 0, None) ** 1.5
    env *= np.sin(2 * np.pi * 0.23 * t) > -0.8
    return (0.3 * env * voiced + 0.01 * rng.standard_normal(n)).astype(np.float32)


def _stream(ex: AudioFeatureExtractor, pcm: np.ndarray, blocks: int, ctx: float = DEFAULT_LEFT_CONTEXT_S,
            chunk: int = SPB) -> torch.Tensor:
    st = ex.new_stream_state(left_context_s=ctx)
    out, pos = [], 0
    for b in range(blocks):
        while ex.blocks_ready(st) <= b:
            ex.push(st, pcm[pos: pos + chunk])
            pos += chunk
        out.append(ex.block_features(st, b))
    return torch.cat(out, dim=-1)


# ---- PCM helpers ------------------------------------------------------------------------------------


def test_pcm_s16le_to_float() -> None:
    data = np.array([0, 1, -1, 32767, -32768, 16384], dtype="<i2").tobytes()
    out = pcm_s16le_to_float(data)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([0, 1, -1, 32767, -32768, 16384], np.float32) / 32768)
    assert pcm_s16le_to_float(bytearray(data)).shape == (6,)
    assert pcm_s16le_to_float(memoryview(data)).shape == (6,)
    with pytest.raises(AudioFormatError, match="empty"):
        pcm_s16le_to_float(b"")
    with pytest.raises(AudioFormatError, match="odd byte count"):
        pcm_s16le_to_float(b"\x00\x01\x02")
    with pytest.raises(AudioFormatError, match="bytes"):
        pcm_s16le_to_float(np.zeros(4, np.int16))  # type: ignore[arg-type]


@pytest.mark.parametrize("bad,msg", [
    (np.zeros(800, np.float64), "dtype float64"),
    (np.zeros(800, np.int16), "dtype int16"),
    (np.zeros((2, 800), np.float32), "1-D"),
    (np.zeros(0, np.float32), "empty"),
    (np.array([0.0, np.nan] * 400, np.float32), "NaN"),
    (np.array([0.0, np.inf] * 400, np.float32), "NaN or inf"),
    ([0.0] * 800, "numpy"),
])
def test_bad_pcm_is_rejected(ex: AudioFeatureExtractor, bad, msg: str) -> None:
    st = ex.new_stream_state()
    with pytest.raises(AudioFormatError, match=msg):
        ex.push(st, bad)
    assert st.total_samples == 0
    with pytest.raises(AudioFormatError, match=msg):
        ex.whole_file(bad, 10)


# ---- whole file ---------------------------------------------------------------------------------------


def test_tiny_matches_tiny_preset(ex: AudioFeatureExtractor) -> None:
    assert ex.hop == 320 and ex.receptive_field == 400
    assert ex.num_layers == TINY.model.audio_num_layers == 3
    assert ex.feature_dim == TINY.model.audio_dim == 32
    assert ex.num_feature_frames(SAMPLE_RATE) == 49  # 50 Hz like real wav2vec2


def test_whole_file_matches_upstream_resampling_oracle(ex: AudioFeatureExtractor) -> None:
    """Oracle written from upstream's definition: align_corners linear 50 Hz -> int(T*30/50) steps,
    frame i takes 30 Hz step round(6i/5) (exact integer arithmetic here: 6i/5 never ends in .5),
    zeros where that step is past the end."""
    pcm = speechlike(2.3, seed=1)
    frames = 70  # past the audio end (2.3 s = 57.5 frames)
    feats = ex.whole_file(pcm, frames)
    assert feats.shape == (3, 32, frames)
    h = ex.hidden_states(pcm).double().numpy()  # [L, T, C]
    t = h.shape[1]
    n30 = (3 * t) // 5
    for i in range(frames):
        k = (12 * i + 5) // 10  # round(1.2 i)
        if k >= n30:
            assert torch.count_nonzero(feats[:, :, i]) == 0, i
            continue
        pos = k * (t - 1) / (n30 - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, t - 1)
        w = pos - lo
        expected = h[:, lo] * (1 - w) + h[:, hi] * w
        np.testing.assert_allclose(feats[:, :, i].numpy(), expected, atol=2e-5, err_msg=f"frame {i}")
    assert torch.count_nonzero(feats[:, :, :55]) > 0


def test_whole_file_normalization(ex: AudioFeatureExtractor) -> None:
    pcm = speechlike(1.0, seed=2)
    loud = (pcm * 3.0).astype(np.float32)
    # normalize=True (xlsr feature extractor): gain-invariant
    assert torch.allclose(ex.whole_file(pcm, 20), ex.whole_file(loud, 20), atol=1e-4)
    raw = AudioFeatureExtractor(ex.model, normalize=False)
    assert not torch.allclose(raw.whole_file(pcm, 20), raw.whole_file(loud, 20), atol=1e-3)
    with pytest.raises(AudioFormatError, match="num_frames"):
        ex.whole_file(pcm, 0)
    with pytest.raises(AudioFormatError, match="at least 400 samples"):
        ex.whole_file(np.zeros(399, np.float32), 1)


# ---- streaming ----------------------------------------------------------------------------------------


def test_block_not_ready_raises_typed_error(ex: AudioFeatureExtractor) -> None:
    st = ex.new_stream_state()
    with pytest.raises(AudioNotReadyError, match="block 0"):
        ex.block_features(st, 0)
    ex.push(st, speechlike(0.47))
    assert ex.blocks_ready(st) == 0
    with pytest.raises(AudioNotReadyError, match="missing"):
        ex.block_features(st, 0)
    ex.push(st, np.zeros(SPB - st.total_samples, np.float32))
    assert ex.blocks_ready(st) == 1
    feats = ex.block_features(st, 0)
    assert feats.shape == (3, 32, 12) and feats.dtype == torch.float32
    with pytest.raises(AudioNotReadyError):
        ex.block_features(st, 1)
    for bad in (-1, 1.0, "0"):
        with pytest.raises(AudioFormatError):
            ex.block_features(st, bad)  # type: ignore[arg-type]


def test_push_granularity_does_not_matter(ex: AudioFeatureExtractor) -> None:
    pcm = speechlike(2.0, seed=3)
    a = _stream(ex, pcm, blocks=4, ctx=1.0, chunk=SPB)
    b = _stream(ex, pcm, blocks=4, ctx=1.0, chunk=1234)
    assert torch.equal(a, b)


def test_no_lookahead_and_bounded_context(ex: AudioFeatureExtractor) -> None:
    pcm = speechlike(3.0, seed=4)
    ctx = 0.5
    base = _stream(ex, pcm, blocks=5, ctx=ctx)
    # changing audio after block 2's end must not change blocks 0..2
    future = pcm.copy()
    future[3 * SPB:] = speechlike(3.0, seed=9)[3 * SPB:]
    changed = _stream(ex, future, blocks=5, ctx=ctx)
    assert torch.equal(base[..., :36], changed[..., :36])
    assert not torch.equal(base[..., 36:], changed[..., 36:])
    # changing audio before block 4's window (start - 0.5 s) must not change block 4
    past = pcm.copy()
    past[: 4 * SPB - int(ctx * SAMPLE_RATE)] = 0.0
    assert torch.equal(_stream(ex, past, blocks=5, ctx=ctx)[..., 48:], base[..., 48:])


def test_stream_sampling_oracle_when_window_is_whole_clip(ex: AudioFeatureExtractor) -> None:
    """With context covering the clip, the last block's window is the whole clip: its features must be
    the whole-clip hidden states linearly sampled at 50 Hz position round(1.2 i) * 5/3 (held at the end)."""
    blocks = 4
    pcm = speechlike(blocks * SPB / SAMPLE_RATE, seed=5)
    feats = _stream(ex, pcm, blocks=blocks, ctx=10.0)[..., -12:]
    h = ex.hidden_states(pcm).double().numpy()
    for j, i in enumerate(range(12 * (blocks - 1), 12 * blocks)):
        pos = min(((12 * i + 5) // 10) * 5 / 3, h.shape[1] - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, h.shape[1] - 1)
        expected = h[:, lo] * (1 - (pos - lo)) + h[:, hi] * (pos - lo)
        np.testing.assert_allclose(feats[:, :, j].numpy(), expected, atol=2e-5, err_msg=f"frame {i}")


def test_streaming_close_to_whole_file(ex: AudioFeatureExtractor) -> None:
    """Numbers in the module docstring come from the same comparison on a 10 s signal."""
    blocks = 10
    pcm = speechlike(blocks * SPB / SAMPLE_RATE + 0.2, seed=0)
    stream = _stream(ex, pcm, blocks=blocks)
    frames = 12 * blocks
    h = ex.hidden_states(pcm)
    same_mapping = ex._sample_frames(h, np.arange(frames), first_feature=0)
    cos = cosine_per_frame(stream, same_mapping)  # [L, F]
    assert cos.shape == (3, frames)
    assert cos.mean() > 0.97, cos.mean()
    interior = cos.reshape(3, blocks, 12)[:, :, :11]  # the block's last frame lacks right context
    assert interior.mean() > 0.98 and interior.min() > 0.9, (interior.mean(), interior.min())
    upstream = cosine_per_frame(stream, ex.whole_file(pcm, frames))
    assert upstream.mean() > 0.8, upstream.mean()
    # a tiny context is measurably worse than the default
    short = cosine_per_frame(_stream(ex, pcm, blocks=blocks, ctx=0.25), same_mapping)
    assert short.mean() < cos.mean()


def test_memory_stays_bounded_and_old_blocks_are_released(ex: AudioFeatureExtractor) -> None:
    ctx = 0.5
    st = ex.new_stream_state(left_context_s=ctx, max_ahead_s=2.0)
    rng = np.random.default_rng(0)
    peak = 0
    for b in range(30):
        ex.push(st, (0.1 * rng.standard_normal(SPB)).astype(np.float32))
        ex.block_features(st, b)
        peak = max(peak, st.buffer.size)
    assert peak <= int(ctx * SAMPLE_RATE) + 2 * SPB
    assert st.total_samples == 30 * SPB and st.buffer_start > 0
    ex.block_features(st, 29)  # the current block may be requested again
    with pytest.raises(AudioWindowError, match="older"):
        ex.block_features(st, 28)
    with pytest.raises(AudioBufferOverflowError, match="limit"):
        ex.push(st, np.zeros(3 * SAMPLE_RATE, np.float32))
    assert st.total_samples == 30 * SPB  # rejected push left no trace
    with pytest.raises(AudioFormatError):
        ex.new_stream_state(left_context_s=-1.0)
    with pytest.raises(AudioFormatError):
        ex.new_stream_state(left_context_s=float("nan"))


def test_model_input_layout(ex: AudioFeatureExtractor) -> None:
    pcm = speechlike(1.0, seed=6)
    st = ex.new_stream_state()
    blocks = []
    for b in range(2):
        ex.push(st, pcm[b * SPB:(b + 1) * SPB])
        blocks.append(ex.block_features(st, b))
    x = features_to_model_input(blocks)
    assert x.shape == (1, 3, 32, 24)
    with pytest.raises(AudioFormatError):
        features_to_model_input([])


# ---- loading ------------------------------------------------------------------------------------------


def test_from_pretrained_ctc_folder(tmp_path) -> None:
    torch.manual_seed(0)
    ctc = Wav2Vec2ForCTC(tiny_wav2vec2_config()).eval()
    ctc.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": False, "sampling_rate": 16000, "feature_size": 1, "return_attention_mask": True}))
    loaded = AudioFeatureExtractor.from_pretrained(tmp_path)
    assert loaded.normalize is False
    pcm = speechlike(0.5, seed=7)
    with torch.no_grad():
        ref = ctc(torch.from_numpy(pcm)[None], output_hidden_states=True).hidden_states
    assert torch.allclose(loaded.hidden_states(pcm), torch.cat(ref, 0), atol=1e-6)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 8000}))
    with pytest.raises(AudioModelError, match="sampling_rate"):
        AudioFeatureExtractor.from_pretrained(tmp_path)
    with pytest.raises(AudioModelError, match="config.json"):
        AudioFeatureExtractor.from_pretrained(tmp_path / "nope")


def test_wrong_hop_model_rejected() -> None:
    from transformers import Wav2Vec2Model

    model = Wav2Vec2Model(tiny_wav2vec2_config(conv_stride=(5, 2, 2, 2, 2, 2, 1)))
    with pytest.raises(AudioModelError, match="hop"):
        AudioFeatureExtractor(model, normalize=True)
    with pytest.raises(AudioModelError):
        AudioFeatureExtractor(torch.nn.Linear(1, 1), normalize=True)  # type: ignore[arg-type]


def test_tiny_overrides_and_block_rms() -> None:
    ex = AudioFeatureExtractor.tiny(seed=1, hidden_size=48, num_hidden_layers=3)
    assert ex.num_layers == 4 and ex.feature_dim == 48
    st = ex.new_stream_state(left_context_s=0.0)
    ex.push(st, np.zeros(SPB, np.float32))
    ex.push(st, np.full(SPB, 0.5, np.float32))
    with pytest.raises(AudioNotReadyError):
        ex.block_rms(st, 2)
    assert ex.block_rms(st, 0) == 0.0
    assert ex.block_features(st, 1).shape == (4, 48, 12)
    assert ex.block_rms(st, 1) == pytest.approx(0.5)
    with pytest.raises(AudioWindowError):
        ex.block_rms(st, 0)  # released once block 1 was taken (no left context kept)
