"""LogMelFrontEnd: the toy model's fixed audio front end is exactly streamable and strictly causal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatarserve.engine.runners import AudioEncoderRunner
from avatarserve.model.audio_features import (
    AudioBufferOverflowError,
    AudioFormatError,
    AudioModelError,
    AudioNotReadyError,
    AudioWindowError,
)
from avatarserve.model.config import StreamConfig
from avatarserve.model.logmel import LogMelConfig, LogMelFrontEnd, is_logmel_folder

SR = 16000
FPB = 12
SPB = FPB * SR // 25  # 7680


@pytest.fixture(scope="module")
def fe() -> LogMelFrontEnd:
    return LogMelFrontEnd()


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    phase = 2 * np.pi * np.cumsum(150 + 30 * np.sin(2 * np.pi * 0.9 * t)) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 10))
    env = np.clip(np.sin(2 * np.pi * 3.7 * t), 0, None) ** 1.5
    return (0.3 * env * voiced + 0.003 * rng.standard_normal(n)).astype(np.float32)


def stream(fe: LogMelFrontEnd, pcm: np.ndarray, blocks: int, chunks) -> torch.Tensor:
    st = fe.new_stream_state()
    out, pos, i = [], 0, 0
    for b in range(blocks):
        while fe.blocks_ready(st, FPB) <= b:
            n = chunks[i % len(chunks)]
            fe.push(st, pcm[pos: pos + n])
            pos += n
            i += 1
        out.append(fe.block_features(st, b, FPB))
    return torch.cat(out, dim=-1)


def test_shapes_match_the_extractor_interface(fe: LogMelFrontEnd) -> None:
    cfg = fe.config
    assert fe.num_layers == 1 and fe.feature_dim == cfg.n_mels * 4 == 128
    feats = fe.whole_file(speechlike(1.0), 25)
    assert feats.shape == (1, 128, 25) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()


@pytest.mark.parametrize("chunks", [[SPB], [1000, 37, 5000], [160]])
def test_streaming_equals_whole_file_bit_for_bit(fe: LogMelFrontEnd, chunks) -> None:
    pcm = speechlike(3 * SPB / SR + 0.01, seed=1)
    whole = fe.whole_file(pcm, 3 * FPB)
    streamed = stream(fe, pcm, 3, chunks)
    assert torch.equal(whole, streamed)


def test_no_lookahead_and_bounded_left_context(fe: LogMelFrontEnd) -> None:
    pcm = speechlike(4 * SPB / SR, seed=2)
    base = fe.whole_file(pcm, 4 * FPB)
    # Changing audio after block 1 ends leaves blocks 0-1 untouched.
    later = pcm.copy()
    later[2 * SPB:] = np.random.default_rng(0).standard_normal(later.size - 2 * SPB).astype(np.float32) * 0.5
    assert torch.equal(fe.whole_file(later, 4 * FPB)[..., : 2 * FPB], base[..., : 2 * FPB])
    # Audio more than left_context samples before block 2 does not reach it; audio just before does.
    ctx = fe.config.left_context
    far = pcm.copy()
    far[: 2 * SPB - ctx] = 0.0
    assert torch.equal(fe.whole_file(far, 4 * FPB)[..., 2 * FPB:], base[..., 2 * FPB:])
    near = pcm.copy()
    near[2 * SPB - ctx: 2 * SPB] += 0.5
    assert not torch.equal(fe.whole_file(near, 4 * FPB)[..., 2 * FPB: 2 * FPB + 1], base[..., 2 * FPB: 2 * FPB + 1])


def test_features_follow_loudness(fe: LogMelFrontEnd) -> None:
    t = np.arange(SPB) / SR
    tone = np.sin(2 * np.pi * 300 * t).astype(np.float32)
    quiet = fe.whole_file(0.01 * tone, FPB).mean().item()
    loud = fe.whole_file(0.5 * tone, FPB).mean().item()
    silent = fe.whole_file(np.zeros(SPB, np.float32), FPB).mean().item()
    assert silent < quiet < loud


def test_whole_file_pads_with_silence_like_the_engine(fe: LogMelFrontEnd) -> None:
    pcm = speechlike(0.7, seed=3)
    padded = np.concatenate([pcm, np.zeros(2 * SPB - pcm.size, np.float32)])
    assert torch.equal(fe.whole_file(pcm, 2 * FPB), fe.whole_file(padded, 2 * FPB))


def test_stream_errors(fe: LogMelFrontEnd) -> None:
    st = fe.new_stream_state(max_ahead_s=1.0)
    fe.push(st, speechlike(0.5))
    with pytest.raises(AudioNotReadyError):
        fe.block_features(st, 1, FPB)
    with pytest.raises(AudioBufferOverflowError):
        fe.push(st, np.zeros(SR, np.float32))
    fe.block_features(st, 0, FPB)
    fe.push(st, np.zeros(SPB, np.float32))
    fe.block_features(st, 1, FPB)
    with pytest.raises(AudioWindowError):
        fe.block_features(st, 0, FPB)
    with pytest.raises(AudioFormatError):
        fe.push(st, np.zeros(10, np.float64))
    with pytest.raises(AudioFormatError):
        fe.push(st, np.array([np.nan], np.float32))
    with pytest.raises(AudioFormatError):
        fe.block_features(st, -1, FPB)
    with pytest.raises(AudioFormatError):
        fe.whole_file(np.zeros(100, np.float32), 0)


def test_bad_config_is_a_typed_error() -> None:
    with pytest.raises(AudioModelError, match="hop_length"):
        LogMelConfig(hop_length=300)
    with pytest.raises(AudioModelError, match="n_mels"):
        LogMelFrontEnd(LogMelConfig(n_mels=400))


def test_save_and_load_roundtrip(tmp_path, fe: LogMelFrontEnd) -> None:
    fe.save_pretrained(tmp_path / "logmel")
    assert is_logmel_folder(tmp_path / "logmel") and not is_logmel_folder(tmp_path)
    again = LogMelFrontEnd.from_pretrained(tmp_path / "logmel")
    assert again.config == fe.config
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"type": "logmel", "n_mel": 3}')
    with pytest.raises(AudioModelError, match="unknown"):
        LogMelFrontEnd.from_pretrained(tmp_path / "bad")


def test_engine_audio_runner_uses_it(fe: LogMelFrontEnd) -> None:
    runner = AudioEncoderRunner(fe, StreamConfig(height=64, width=64))
    runner.create("s")
    pcm = speechlike(1.0)
    assert runner.push("s", pcm) == 2
    p0, p1 = runner.next_block("s"), runner.next_block("s")
    assert runner.next_block("s") is None
    assert p0.audio.shape == (1, 1, 128, FPB)
    assert torch.equal(torch.cat([p0.audio, p1.audio], -1)[0], fe.whole_file(pcm, 2 * FPB))
    runner.close("s")
