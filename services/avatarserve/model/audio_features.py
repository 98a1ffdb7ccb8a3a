"""wav2vec2 audio features for the S2V audio path, whole-file and incremental (streaming).

Upstream (Wan2.2-S2V / Live Avatar `AudioEncoder`) runs wav2vec2 over the whole 16 kHz file, keeps
all hidden states (num_layers + 1 of them, 1024-d, 50 Hz), linearly resamples them with
`align_corners=True` to `int(T / 50 * 30)` steps at 30 Hz, and then picks one 30 Hz step per video
frame: frame i takes step `round(i / fps * 30)`, or zeros past the end of the audio.
`AudioFeatureExtractor.whole_file` reproduces that exactly.

Streaming cannot see the whole file, so `block_features` encodes, for video block b (frames
[12b, 12b + 12)), only the audio from `left_context_s` before the block up to the block's last sample
(no lookahead) and samples the hidden states at the same per-frame 30 Hz steps, mapped back to 50 Hz
with the long-file limit of the align_corners ratio (5/3). Input normalization (if the checkpoint's
feature extractor does it) is applied per encoded window instead of per file.

Streaming vs whole file, measured on the `tiny` model (random weights; 2 layers, 32-d, positional
conv kernel 128 frames like wav2vec2-large, normalize=True) with a 10 s synthetic speech-like signal,
video frames 0..239 (20 blocks). Per-frame cosine similarity (mean / min over frames and the 3 hidden
states; the 3 layers agree to within 0.001) and max |diff| divided by the whole-file feature std:

    left context | vs whole_file (upstream mapping) | vs whole-file states, streaming time mapping
    0.5 s        | 0.864 / 0.335, 3.05              | 0.962 / 0.580, 2.09
    1.0 s        | 0.875 / 0.319, 3.03              | 0.979 / 0.734, 2.06
    2.0 s        | 0.880 / 0.352, 2.90              | 0.985 / 0.786, 2.08
    4.0 s        | 0.879 / 0.331, 2.96              | 0.986 / 0.798, 2.09
    8.0 s        | 0.880 / 0.332, 2.98              | 0.986 / 0.800, 2.09

The right column isolates the bounded window. It saturates at 4 s (4 s and 8 s agree to 3 decimals),
hence DEFAULT_LEFT_CONTEXT_S = 4.0; encoding 4.48 s per 0.48 s block is cheap for wav2vec2. What is
left is the missing right context: frames 0..10 of a block reach cosine ~0.99, the block's last frame
~0.95 (its 50 Hz position lies past the newest wav2vec2 frame, which is held), and per-window instead of
per-file input normalization costs ~0.003. The left column adds upstream's length-dependent
align_corners drift (its 30 Hz grid runs up to ~1.3 wav2vec2 frames, 26 ms, late by the end of a 10 s
file). No streaming encoder can reproduce it, since it depends on the total file length; on its own it
already gives 0.894 / 0.346 (whole-file states, only the time mapping differs), because random tiny
features decorrelate within one frame. Trained wav2vec2 features vary far more smoothly, so the gap to
upstream should be much smaller with real weights (not measured here: no weights offline).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2Model

SAMPLE_RATE = 16000
FEATURE_RATE = 50  # wav2vec2 frames per second (hop 320 samples)
RESAMPLE_RATE = 30  # upstream's intermediate rate ("video_rate" in its AudioEncoder)
DEFAULT_FPS = 25
DEFAULT_FRAMES_PER_BLOCK = 12
DEFAULT_LEFT_CONTEXT_S = 4.0
DEFAULT_MAX_AHEAD_S = 30.0

PathLike = Union[str, "os.PathLike[str]"]


class AudioError(ValueError):
    """Base class for audio feature errors."""


class AudioFormatError(AudioError):
    """PCM input has the wrong type, dtype, shape or length, or contains NaN/inf."""


class AudioNotReadyError(AudioError):
    """The audio for the requested block has not fully arrived yet."""


class AudioWindowError(AudioError):
    """The requested block is older than the audio the stream still holds."""


class AudioBufferOverflowError(AudioError):
    """A push would buffer more unconsumed audio than the stream allows."""


class AudioModelError(AudioError):
    """The wav2vec2 model or checkpoint does not fit the S2V audio path."""


# --------------------------------------------------------------------------------------------------
# PCM helpers
# --------------------------------------------------------------------------------------------------


def pcm_s16le_to_float(data: Union[bytes, bytearray, memoryview]) -> np.ndarray:
    """Signed 16-bit little-endian mono PCM bytes -> float32 samples in [-1, 1)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AudioFormatError(f"s16le PCM must be bytes, got {type(data).__name__}")
    raw = memoryview(data).cast("B")
    if len(raw) == 0:
        raise AudioFormatError("s16le PCM is empty")
    if len(raw) % 2:
        raise AudioFormatError(f"s16le PCM has an odd byte count ({len(raw)}); samples are 2 bytes")
    ints = np.frombuffer(raw, dtype="<i2")
    return ints.astype(np.float32) / np.float32(32768.0)


def _check_pcm(pcm: object, what: str = "pcm") -> np.ndarray:
    if not isinstance(pcm, np.ndarray):
        raise AudioFormatError(f"{what} must be a numpy float32 array, got {type(pcm).__name__}")
    if pcm.dtype != np.float32:
        raise AudioFormatError(f"{what} must be float32 mono samples at {SAMPLE_RATE} Hz, got dtype {pcm.dtype}")
    if pcm.ndim != 1:
        raise AudioFormatError(f"{what} must be 1-D mono samples, got shape {pcm.shape}")
    if pcm.size == 0:
        raise AudioFormatError(f"{what} is empty")
    if not np.isfinite(pcm).all():
        raise AudioFormatError(f"{what} contains NaN or inf")
    return pcm


def _zero_mean_unit_var(x: np.ndarray) -> np.ndarray:
    # Same formula as transformers' Wav2Vec2FeatureExtractor (do_normalize=True), in float32.
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32, copy=False)


def frame_to_resample_index(frame: int, fps: int) -> int:
    """30 Hz step picked for video frame `frame` (upstream: round(i / fps * 30), no ties at 25 fps)."""
    return int(np.round(frame / fps * RESAMPLE_RATE))


# --------------------------------------------------------------------------------------------------
# Streaming state
# --------------------------------------------------------------------------------------------------


@dataclass
class AudioStreamState:
    """Audio of one session: a sliding buffer of recent samples and the consumption cursor."""

    left_context_samples: int
    max_buffer_samples: int
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    buffer_start: int = 0  # global index of buffer[0]
    min_block: int = 0  # blocks below this were consumed and their audio may be gone

    @property
    def total_samples(self) -> int:
        """Samples pushed since the stream started."""
        return self.buffer_start + int(self.buffer.size)

    @property
    def buffered_seconds(self) -> float:
        return self.buffer.size / SAMPLE_RATE


# Buffer mechanics shared by every front end that streams from an AudioStreamState (wav2vec2 here, log-mel in
# model/logmel.py): what differs between them is only which samples a block's features need.


def push_pcm(state: AudioStreamState, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Append float32 mono samples (rejected whole if invalid or if the buffer would overflow)."""
    pcm = _check_pcm(pcm)
    if state.buffer.size + pcm.size > state.max_buffer_samples:
        raise AudioBufferOverflowError(
            f"pushing {pcm.size} samples would buffer {(state.buffer.size + pcm.size) / sample_rate:.2f} s "
            f"of audio; the limit is {state.max_buffer_samples / sample_rate:.2f} s (consume blocks first)")
    state.buffer = np.concatenate([state.buffer, pcm])


def span_rms(state: AudioStreamState, block_index: int, start: int, end: int) -> float:
    """RMS of global samples [start, end) of block `block_index` (e.g. to tell silence from speech)."""
    if state.total_samples < end:
        raise AudioNotReadyError(f"block {block_index} needs audio up to sample {end}; "
                                 f"only {state.total_samples} arrived")
    if start < state.buffer_start:
        raise AudioWindowError(f"audio for block {block_index} was already released")
    seg = state.buffer[start - state.buffer_start: end - state.buffer_start].astype(np.float64)
    return float(np.sqrt(np.mean(seg * seg)))


def release_before(state: AudioStreamState, keep_from: int) -> None:
    """Drop buffered samples before global sample `keep_from`."""
    drop = keep_from - state.buffer_start
    if drop > 0:
        state.buffer = state.buffer[drop:].copy()
        state.buffer_start = keep_from


# --------------------------------------------------------------------------------------------------
# Extractor
# --------------------------------------------------------------------------------------------------


class AudioFeatureExtractor:
    """All wav2vec2 hidden states, resampled to one vector per video frame ([L, C, frames])."""

    def __init__(self, model: Wav2Vec2Model, normalize: bool, fps: int = DEFAULT_FPS) -> None:
        if not isinstance(model, Wav2Vec2Model):
            raise AudioModelError(f"expected a transformers Wav2Vec2Model, got {type(model).__name__}")
        cfg = model.config
        hop = int(np.prod(cfg.conv_stride))
        if hop * FEATURE_RATE != SAMPLE_RATE:
            raise AudioModelError(
                f"wav2vec2 hop is {hop} samples ({SAMPLE_RATE / hop:.1f} Hz); the S2V resampling assumes "
                f"{SAMPLE_RATE // FEATURE_RATE} samples (50 Hz)")
        if fps <= 0 or (SAMPLE_RATE % fps):
            raise AudioModelError(f"fps must divide {SAMPLE_RATE}, got {fps}")
        self.model = model.eval().requires_grad_(False)
        self.normalize = bool(normalize)
        self.fps = int(fps)
        self.hop = hop
        # samples seen by one output frame: 1 + sum((k - 1) * stride-product before the layer)
        rf, jump = 1, 1
        for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
            rf += (k - 1) * jump
            jump *= s
        self.receptive_field = rf

    @property
    def num_layers(self) -> int:
        """Hidden states returned per frame (transformer layers + 1)."""
        return int(self.model.config.num_hidden_layers) + 1

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def samples_for_frames(self, frames: int) -> int:
        return frames * SAMPLE_RATE // self.fps

    def num_feature_frames(self, samples: int) -> int:
        """wav2vec2 output frames for `samples` input samples (same cascade as transformers)."""
        n = samples
        for k, s in zip(self.model.config.conv_kernel, self.model.config.conv_stride):
            n = (n - k) // s + 1
            if n <= 0:
                return 0
        return n

    # ---- model --------------------------------------------------------------------------------------

    def hidden_states(self, pcm: np.ndarray) -> torch.Tensor:
        """float32 mono 16 kHz -> all hidden states [L, T, C] (float32) at 50 Hz."""
        pcm = _check_pcm(pcm)
        if self.num_feature_frames(pcm.size) < 1:
            raise AudioFormatError(
                f"need at least {self.receptive_field} samples for one wav2vec2 frame, got {pcm.size}")
        x = _zero_mean_unit_var(pcm) if self.normalize else pcm
        inp = torch.from_numpy(np.ascontiguousarray(x)).to(device=self.device, dtype=self.dtype)[None]
        with torch.no_grad():
            out = self.model(inp, output_hidden_states=True)
        return torch.cat(out.hidden_states, dim=0).float()  # [L, T, C]

    # ---- whole file (upstream-faithful) --------------------------------------------------------------

    def whole_file(self, pcm: np.ndarray, num_frames: int) -> torch.Tensor:
        """Features for video frames [0, num_frames) from the whole file -> [L, C, num_frames]."""
        if not isinstance(num_frames, int) or num_frames < 1:
            raise AudioFormatError(f"num_frames must be a positive int, got {num_frames!r}")
        h = self.hidden_states(pcm)  # [L, T, C]
        t = h.shape[1]
        n30 = int(t / float(FEATURE_RATE) * RESAMPLE_RATE)
        out = torch.zeros(h.shape[0], h.shape[2], num_frames, device=h.device, dtype=h.dtype)
        if n30 < 1:
            return out
        z30 = F.interpolate(h.transpose(1, 2), size=n30, mode="linear", align_corners=True)  # [L, C, n30]
        idx = np.round(np.linspace(0.0, num_frames / self.fps, num_frames, endpoint=False) * RESAMPLE_RATE)
        idx = idx.astype(np.int64)
        valid = np.nonzero(idx < n30)[0]
        if valid.size:
            out[:, :, torch.from_numpy(valid).to(h.device)] = z30[:, :, torch.from_numpy(idx[valid]).to(h.device)]
        return out

    # ---- streaming ---------------------------------------------------------------------------------

    def new_stream_state(
        self, left_context_s: float = DEFAULT_LEFT_CONTEXT_S, max_ahead_s: float = DEFAULT_MAX_AHEAD_S,
    ) -> AudioStreamState:
        """A fresh audio stream. Memory stays below left context + one block + `max_ahead_s` of audio."""
        if not (isinstance(left_context_s, (int, float)) and math.isfinite(left_context_s) and left_context_s >= 0):
            raise AudioFormatError(f"left_context_s must be a finite number >= 0, got {left_context_s!r}")
        if not (isinstance(max_ahead_s, (int, float)) and math.isfinite(max_ahead_s) and max_ahead_s > 0):
            raise AudioFormatError(f"max_ahead_s must be a finite number > 0, got {max_ahead_s!r}")
        ctx = int(round(left_context_s * SAMPLE_RATE / self.hop)) * self.hop  # keep the 50 Hz grid aligned
        ahead = int(round(max_ahead_s * SAMPLE_RATE))
        return AudioStreamState(left_context_samples=ctx, max_buffer_samples=ctx + ahead)

    def push(self, state: AudioStreamState, pcm: np.ndarray) -> None:
        """Append float32 mono 16 kHz samples to the stream (rejected whole if invalid or too much)."""
        push_pcm(state, pcm)

    def blocks_ready(self, state: AudioStreamState, frames_per_block: int = DEFAULT_FRAMES_PER_BLOCK) -> int:
        """Number of blocks, counted from block 0, whose audio has fully arrived."""
        return state.total_samples // self.samples_for_frames(frames_per_block)

    def _window(self, state: AudioStreamState, block_index: int, frames_per_block: int) -> Tuple[int, int]:
        start = self.samples_for_frames(block_index * frames_per_block)
        end = self.samples_for_frames((block_index + 1) * frames_per_block)
        return max(0, start - state.left_context_samples) // self.hop * self.hop, end

    def block_features(
        self, state: AudioStreamState, block_index: int, frames_per_block: int = DEFAULT_FRAMES_PER_BLOCK,
    ) -> torch.Tensor:
        """Features [L, C, frames_per_block] for video frames [b*fpb, (b+1)*fpb), from audio up to the
        block's end only. Requesting block b releases the audio that only blocks < b needed."""
        if not isinstance(block_index, int) or block_index < 0:
            raise AudioFormatError(f"block_index must be an int >= 0, got {block_index!r}")
        if not isinstance(frames_per_block, int) or frames_per_block < 1:
            raise AudioFormatError(f"frames_per_block must be a positive int, got {frames_per_block!r}")
        if self.samples_for_frames(frames_per_block) % self.hop:
            raise AudioFormatError(
                f"{frames_per_block} frames at {self.fps} fps is not a whole number of wav2vec2 hops")
        if block_index < state.min_block:
            raise AudioWindowError(
                f"block {block_index} is older than the oldest block still held ({state.min_block})")
        s0, end = self._window(state, block_index, frames_per_block)
        if state.total_samples < end:
            raise AudioNotReadyError(
                f"block {block_index} needs audio up to sample {end}; only {state.total_samples} arrived "
                f"({(end - state.total_samples) / SAMPLE_RATE:.3f} s missing)")
        if s0 < state.buffer_start:  # cannot happen unless min_block was advanced by hand
            raise AudioWindowError(f"audio for block {block_index} was already released")
        window = state.buffer[s0 - state.buffer_start: end - state.buffer_start]
        h = self.hidden_states(np.ascontiguousarray(window))  # [L, Tw, C]
        frames = np.arange(block_index * frames_per_block, (block_index + 1) * frames_per_block)
        feats = self._sample_frames(h, frames, first_feature=s0 // self.hop)
        self._release(state, block_index, frames_per_block)
        return feats

    def block_rms(
        self, state: AudioStreamState, block_index: int, frames_per_block: int = DEFAULT_FRAMES_PER_BLOCK,
    ) -> float:
        """RMS level of block b's own samples (e.g. to tell silence from speech); same availability rules
        as `block_features`, but releases nothing."""
        if not isinstance(block_index, int) or block_index < 0:
            raise AudioFormatError(f"block_index must be an int >= 0, got {block_index!r}")
        start = self.samples_for_frames(block_index * frames_per_block)
        end = self.samples_for_frames((block_index + 1) * frames_per_block)
        return span_rms(state, block_index, start, end)

    def _sample_frames(self, h: torch.Tensor, frames: np.ndarray, first_feature: int) -> torch.Tensor:
        # Video frame -> upstream 30 Hz step -> 50 Hz position with the long-file align_corners ratio.
        k = np.round(frames / self.fps * RESAMPLE_RATE)
        pos = k * (FEATURE_RATE / RESAMPLE_RATE) - first_feature
        pos = np.clip(pos, 0.0, h.shape[1] - 1)  # past the newest frame: hold it (no lookahead)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, h.shape[1] - 1)
        w = torch.from_numpy((pos - lo).astype(np.float32)).to(h.device)
        lo_t, hi_t = torch.from_numpy(lo).to(h.device), torch.from_numpy(hi).to(h.device)
        out = h[:, lo_t] * (1.0 - w)[None, :, None] + h[:, hi_t] * w[None, :, None]  # [L, F, C]
        return out.transpose(1, 2).contiguous()  # [L, C, F]

    def _release(self, state: AudioStreamState, block_index: int, frames_per_block: int) -> None:
        state.min_block = max(state.min_block, block_index)
        keep_from, _ = self._window(state, state.min_block, frames_per_block)
        release_before(state, keep_from)

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        local_path: PathLike,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        normalize: Optional[bool] = None,
        fps: int = DEFAULT_FPS,
    ) -> "AudioFeatureExtractor":
        """Load a local HF wav2vec2 folder (e.g. `wav2vec2-large-xlsr-53-english`, a Wav2Vec2ForCTC
        checkpoint: the CTC head is ignored). `normalize` defaults to the folder's
        preprocessor_config.json `do_normalize` (True when absent, as in transformers)."""
        path = os.fspath(local_path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise AudioModelError(f"{path} is not a local wav2vec2 folder (no config.json)")
        if normalize is None:
            normalize = True
            pre = os.path.join(path, "preprocessor_config.json")
            if os.path.isfile(pre):
                with open(pre, encoding="utf-8") as fh:
                    pcfg = json.load(fh)
                normalize = bool(pcfg.get("do_normalize", True))
                rate = pcfg.get("sampling_rate", SAMPLE_RATE)
                if rate != SAMPLE_RATE:
                    raise AudioModelError(f"{pre} says sampling_rate={rate}; the S2V path needs {SAMPLE_RATE}")
        model = Wav2Vec2Model.from_pretrained(path, dtype=dtype)
        return cls(model.to(device), normalize=normalize, fps=fps)

    @classmethod
    def tiny(cls, seed: int = 0, normalize: bool = True, fps: int = DEFAULT_FPS,
             **config_overrides: object) -> "AudioFeatureExtractor":
        """Random tiny wav2vec2 with the real 320-sample hop and 128-frame positional conv:
        3 hidden states x 32-d by default (the `tiny` preset's audio_dim=32, audio_num_layers=3);
        `config_overrides` go to Wav2Vec2Config (e.g. hidden_size, num_hidden_layers)."""
        config = tiny_wav2vec2_config(**config_overrides)
        rng = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = Wav2Vec2Model(config)
        finally:
            torch.random.set_rng_state(rng)
        return cls(model, normalize=normalize, fps=fps)


def tiny_wav2vec2_config(**overrides: object) -> Wav2Vec2Config:
    """Layout of wav2vec2-large-xlsr-53 (layer-norm conv stack, stable layer norm) at toy width."""
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        mask_time_prob=0.0,
        vocab_size=32,
    )
    kwargs.update(overrides)
    return Wav2Vec2Config(**kwargs)


def cosine_per_frame(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two [L, C, F] feature tensors along C -> [L, F]."""
    return F.cosine_similarity(a, b, dim=1)


def features_to_model_input(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-block [L, C, f] features along frames and add the batch axis -> [1, L, C, F]
    (the layout upstream's DiT slices per block)."""
    if not features:
        raise AudioFormatError("no feature blocks given")
    return torch.cat(list(features), dim=-1).unsqueeze(0)
