"""A fixed, exactly streamable log-mel audio front end behind the `AudioFeatureExtractor` interface.

The `toy` model's audio path: 16 kHz PCM -> one feature vector per 25 fps video frame, shaped like the
wav2vec2 extractor's output ([L, C, frames] with L = 1 "hidden state" and C = hops_per_frame * n_mels), so
the engine (`AudioEncoderRunner`) and the DiT's `CausalAudioEncoder` use it unchanged.

Per video frame t (audio samples [640 t, 640 t + 640)) we take the 4 STFT frames whose 25 ms Hann windows
*end* at 640 t + 160, + 320, + 480, + 640 (hop 10 ms), i.e. windows are right-aligned, so a video frame's
features depend on its own samples and on at most `win_length - hop_length` = 240 samples (15 ms) before
it, never on later audio (no lookahead). Samples before the stream start count as zeros. Each STFT frame
becomes an HTK-mel power spectrum, log10 with a floor, and a fixed affine normalisation; the frame's 4 mel
vectors are concatenated (sub-frame major).

Streaming equals whole-file *bit for bit*: both call the same per-video-frame function on identical
inputs of identical shapes (numpy float64 FFT, elementwise mel projection with numpy's pairwise sum), so
no batch-size-dependent BLAS blocking or SIMD remainder path can change a bit. The left context a stream
keeps is bounded (240 samples), and memory is bounded by `max_ahead_s` of unconsumed audio.

Why a fixed log-mel front end and not a tiny wav2vec2 trained jointly with the DiT:
- The toy world's mouth follows the speech *loudness* envelope per video frame (`toy.faces.MouthFollower`),
  which a log-mel spectrum exposes directly; learned contextual speech features add nothing the DiT's own
  causal audio conv stack (`CausalAudioEncoder`, trained jointly) cannot learn from it.
- It has no weights, so it cannot drift, overfit the 5 hours of toy speech, or couple the audio encoder's
  training to the DiT's; the shipped checkpoint only stores a 12-number json config.
- It is exactly causal with a 15 ms left context. wav2vec2's positional convolution (128 frames, 2.56 s)
  and self-attention make streaming only approximate (see `audio_features.py`: cosine ~0.99 at best).
- It costs under 1 ms per 0.48 s block on a CPU (0.4 ms measured); a wav2vec2 re-encoding a multi-second
  window per block would be a sizable share of the real-time budget on 2 cores.
The price is that the features are not speech-aware (phonemes, visemes): fine for this world, where the
mouth only opens and closes; real speech would want wav2vec2 (which the 14B preset keeps).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from .audio_features import (
    AudioFormatError,
    AudioModelError,
    AudioNotReadyError,
    AudioStreamState,
    AudioWindowError,
    _check_pcm,
    push_pcm,
    release_before,
    span_rms,
)

CONFIG_NAME = "config.json"
FRONTEND_TYPE = "logmel"

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class LogMelConfig:
    """Everything that defines the features (saved as `logmel/config.json` in a checkpoint)."""

    sample_rate: int = 16000
    fps: int = 25
    hop_length: int = 160  # 10 ms
    win_length: int = 400  # 25 ms Hann window, right-aligned to each hop's end
    n_fft: int = 512
    n_mels: int = 32
    f_min: float = 50.0
    f_max: float = 7600.0
    log_floor: float = 1e-9  # power floor before log10 (about -90 dB re. a full-scale sine)
    # Fixed normalisation (log10 power -> roughly zero mean / unit variance on toy-world speech). Chosen once
    # from the statistics of a few training clips and then frozen; it is part of the front end's definition.
    offset: float = -5.7  # mean of log10 mel power over 6 training clips (seeds 0-5)
    scale: float = 1.6  # their std

    def __post_init__(self) -> None:
        def bad(msg: str) -> AudioModelError:
            return AudioModelError(f"invalid log-mel config: {msg}")

        if self.sample_rate <= 0 or self.fps <= 0 or self.sample_rate % self.fps:
            raise bad(f"fps {self.fps} must divide sample_rate {self.sample_rate}")
        if self.hop_length <= 0 or self.samples_per_frame % self.hop_length:
            raise bad(f"hop_length {self.hop_length} must divide the {self.samples_per_frame} samples of a video frame")
        if not self.hop_length <= self.win_length <= self.n_fft:
            raise bad(f"need hop_length <= win_length <= n_fft, got {self.hop_length}, {self.win_length}, {self.n_fft}")
        if self.n_mels < 1:
            raise bad(f"n_mels must be >= 1, got {self.n_mels}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise bad(f"need 0 <= f_min < f_max <= {self.sample_rate / 2}, got {self.f_min}, {self.f_max}")
        if not (self.log_floor > 0 and math.isfinite(self.offset) and self.scale > 0):
            raise bad("log_floor and scale must be > 0 and offset finite")

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps

    @property
    def hops_per_frame(self) -> int:
        return self.samples_per_frame // self.hop_length

    @property
    def left_context(self) -> int:
        """Samples before a video frame that its features depend on."""
        return self.win_length - self.hop_length

    @property
    def feature_dim(self) -> int:
        return self.hops_per_frame * self.n_mels

    def to_dict(self) -> Dict[str, Any]:
        return {"type": FRONTEND_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "LogMelConfig":
        if data.get("type", FRONTEND_TYPE) != FRONTEND_TYPE:
            raise AudioModelError(f"audio front end config has type {data.get('type')!r}, expected {FRONTEND_TYPE!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names - {"type"}
        if unknown:
            raise AudioModelError(f"unknown log-mel config keys {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def mel_filterbank(cfg: LogMelConfig) -> np.ndarray:
    """HTK-mel triangular filters [n_mels, n_fft // 2 + 1] (float64, peak 1)."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    bins = np.arange(cfg.n_fft // 2 + 1, dtype=np.float64) * cfg.sample_rate / cfg.n_fft
    edges = mel_to_hz(np.linspace(hz_to_mel(np.float64(cfg.f_min)), hz_to_mel(np.float64(cfg.f_max)), cfg.n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None] - lo) / (mid - lo)
    down = (hi - bins[None]) / (hi - mid)
    fb = np.clip(np.minimum(up, down), 0.0, None)
    if (fb.sum(axis=1) <= 0).any():
        raise AudioModelError(f"n_mels={cfg.n_mels} is too many for n_fft={cfg.n_fft}: some mel bands hold no FFT bin")
    return fb


class LogMelFrontEnd:
    """Fixed log-mel features, one [C] vector per video frame, returned as [1, C, frames]."""

    def __init__(self, config: LogMelConfig = LogMelConfig()) -> None:
        if not isinstance(config, LogMelConfig):
            raise AudioModelError(f"expected a LogMelConfig, got {type(config).__name__}")
        self.config = config
        self.fps = config.fps
        self._fb = mel_filterbank(config)  # [M, K]
        n = np.arange(config.win_length, dtype=np.float64)
        self._window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / config.win_length)  # periodic Hann
        # Power normalisation: a full-scale sine gives ~0 dB in its bin.
        self._power_scale = 4.0 / float(self._window.sum()) ** 2
        # Offsets (within a video frame's [left context + frame] segment) at which each STFT window starts.
        ctx = config.left_context
        self._starts = ctx + config.hop_length * (np.arange(config.hops_per_frame) + 1) - config.win_length
        self._segment = ctx + config.samples_per_frame

    # ---- interface shared with AudioFeatureExtractor -----------------------------------------------------
    @property
    def num_layers(self) -> int:
        return 1

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def samples_for_frames(self, frames: int) -> int:
        return frames * self.config.samples_per_frame

    # ---- the one feature function --------------------------------------------------------------------------
    def _frame_features(self, segment: np.ndarray) -> np.ndarray:
        """One video frame: float64 segment [left_context + samples_per_frame] -> float32 [C]."""
        cfg = self.config
        idx = self._starts[:, None] + np.arange(cfg.win_length)[None, :]
        frames = segment[idx] * self._window[None, :]  # [H, win]
        spec = np.fft.rfft(frames, n=cfg.n_fft, axis=-1)
        power = (spec.real * spec.real + spec.imag * spec.imag) * self._power_scale  # [H, K]
        # Elementwise product + numpy's pairwise sum along the contiguous last axis: no BLAS, so the result
        # cannot depend on how many frames are computed together.
        mel = (power[:, None, :] * self._fb[None, :, :]).sum(axis=-1)  # [H, M]
        logmel = (np.log10(mel + cfg.log_floor) - cfg.offset) / cfg.scale
        return logmel.reshape(-1).astype(np.float32)

    def _features(self, samples: np.ndarray, first_sample: int, first_frame: int, num_frames: int) -> torch.Tensor:
        """Features of video frames [first_frame, first_frame + num_frames) from `samples`, whose element 0
        is global sample `first_sample` (global samples before 0 are zeros)."""
        cfg = self.config
        spf, ctx = cfg.samples_per_frame, cfg.left_context
        x = samples.astype(np.float64)
        out = np.empty((num_frames, cfg.feature_dim), dtype=np.float32)
        for i in range(num_frames):
            start = (first_frame + i) * spf - ctx  # global index of the segment's first sample
            lo = start - first_sample
            if lo >= 0:
                seg = x[lo: lo + self._segment]
            else:  # only before the stream start: zeros
                if start + ctx < 0 or start >= 0 or first_sample != 0:
                    raise AudioWindowError(f"audio for video frame {first_frame + i} is not available")
                seg = np.concatenate([np.zeros(-start), x[: self._segment + start]])
            if seg.size != self._segment:
                raise AudioNotReadyError(f"audio for video frame {first_frame + i} has not fully arrived")
            out[i] = self._frame_features(seg)
        return torch.from_numpy(out.T.copy()).unsqueeze(0)  # [1, C, frames]

    # ---- whole file ------------------------------------------------------------------------------------------
    def whole_file(self, pcm: np.ndarray, num_frames: int) -> torch.Tensor:
        """Features [1, C, num_frames] of video frames [0, num_frames); audio past the end counts as silence
        (the engine pads the last block with silence the same way)."""
        pcm = _check_pcm(pcm)
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise AudioFormatError(f"num_frames must be a positive int, got {num_frames!r}")
        need = self.samples_for_frames(num_frames)
        x = pcm[:need] if pcm.size >= need else np.concatenate([pcm, np.zeros(need - pcm.size, np.float32)])
        return self._features(x, 0, 0, num_frames)

    # ---- streaming ---------------------------------------------------------------------------------------------
    def new_stream_state(self, max_ahead_s: float = 30.0) -> AudioStreamState:
        """A fresh stream. Memory stays below the left context + one block + `max_ahead_s` of audio."""
        if not (isinstance(max_ahead_s, (int, float)) and math.isfinite(max_ahead_s) and max_ahead_s > 0):
            raise AudioFormatError(f"max_ahead_s must be a finite number > 0, got {max_ahead_s!r}")
        ctx = self.config.left_context
        return AudioStreamState(left_context_samples=ctx,
                                max_buffer_samples=ctx + int(round(max_ahead_s * self.config.sample_rate)))

    def push(self, state: AudioStreamState, pcm: np.ndarray) -> None:
        """Append float32 mono PCM (rejected whole if invalid or if it would overflow the buffer)."""
        push_pcm(state, pcm, self.config.sample_rate)

    def blocks_ready(self, state: AudioStreamState, frames_per_block: int = 12) -> int:
        return state.total_samples // self.samples_for_frames(frames_per_block)

    def _check_block(self, state: AudioStreamState, block_index: int, frames_per_block: int) -> None:
        if isinstance(block_index, bool) or not isinstance(block_index, int) or block_index < 0:
            raise AudioFormatError(f"block_index must be an int >= 0, got {block_index!r}")
        if isinstance(frames_per_block, bool) or not isinstance(frames_per_block, int) or frames_per_block < 1:
            raise AudioFormatError(f"frames_per_block must be a positive int, got {frames_per_block!r}")
        end = self.samples_for_frames((block_index + 1) * frames_per_block)
        if state.total_samples < end:
            raise AudioNotReadyError(
                f"block {block_index} needs audio up to sample {end}; only {state.total_samples} arrived")

    def block_features(self, state: AudioStreamState, block_index: int, frames_per_block: int = 12) -> torch.Tensor:
        """Features [1, C, frames_per_block] of block b from audio up to the block's last sample. Asking for
        block b releases the audio that only blocks < b needed."""
        self._check_block(state, block_index, frames_per_block)
        if block_index < state.min_block:
            raise AudioWindowError(f"block {block_index} is older than the oldest block still held ({state.min_block})")
        first = block_index * frames_per_block
        start = max(0, self.samples_for_frames(first) - self.config.left_context)
        if start < state.buffer_start:
            raise AudioWindowError(f"audio for block {block_index} was already released")
        end = self.samples_for_frames(first + frames_per_block)
        window = state.buffer[start - state.buffer_start: end - state.buffer_start]
        feats = self._features(window, start, first, frames_per_block)
        self._release(state, block_index, frames_per_block)
        return feats

    def block_rms(self, state: AudioStreamState, block_index: int, frames_per_block: int = 12) -> float:
        """RMS of block b's own samples (silence detection); releases nothing."""
        self._check_block(state, block_index, frames_per_block)
        start = self.samples_for_frames(block_index * frames_per_block)
        return span_rms(state, block_index, start, self.samples_for_frames((block_index + 1) * frames_per_block))

    def _release(self, state: AudioStreamState, block_index: int, frames_per_block: int) -> None:
        state.min_block = max(state.min_block, block_index)
        release_before(state, max(0, self.samples_for_frames(state.min_block * frames_per_block) - self.config.left_context))

    # ---- persistence -------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=1, sort_keys=True) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, directory: PathLike) -> "LogMelFrontEnd":
        path = Path(directory) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AudioModelError(f"cannot read log-mel front end config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise AudioModelError(f"{path} must hold a JSON object")
        try:
            return cls(LogMelConfig.from_dict(data))
        except TypeError as exc:
            raise AudioModelError(f"{path}: {exc}") from exc


def is_logmel_folder(directory: PathLike) -> bool:
    """True if `directory` holds a log-mel front end config (as written by `save_pretrained`)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("type") == FRONTEND_TYPE
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
