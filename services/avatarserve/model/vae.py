"""Streaming Wan VAE built on diffusers' `AutoencoderKLWan`.

Why this wrapper exists: `AutoencoderKLWan.decode()` clears the causal-convolution feature cache at the
start and end of every call, so decoding a stream block by block with the public API restarts the
temporal causality each time (7 latents in chunks [1, 3, 3] give 19 frames instead of 25). The decoder
itself accepts an external cache: calling `post_quant_conv` and then
`decoder(x_i, feat_cache=..., feat_idx=..., first_chunk=...)` one latent frame at a time, with a cache
that outlives the call, reproduces the full-clip decode bit for bit. `StreamingVAE` keeps that cache in
a per-session `VaeDecodeState`, never in the module's shared `_feat_map`, so several sessions can
interleave calls on one set of weights.

These are private diffusers internals, which is why `diffusers==0.42.1` is pinned;
`check_diffusers_compatibility()` runs on construction and fails loudly if they change.

Latent "model space" is the normalized space the DiT works in, exactly as the Wan pipelines do it:
`z = (mu - latents_mean) * (1 / latents_std)`, and decode undoes it. Encoding uses the posterior mean.

Checkpoints: a diffusers folder (`config.json` + safetensors) or the original Wan-format
`Wan2.1_VAE.pth` that the official Wan2.2-S2V folder ships; the latter is converted to diffusers names
by `convert_original_vae_state_dict` (architecture inferred from tensor shapes).
"""

from __future__ import annotations

import inspect
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

import diffusers
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders import autoencoder_kl_wan as _wan_vae_module
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm, patchify, unpatchify

PINNED_DIFFUSERS_VERSION = "0.42.1"

# Wan2.1 VAE per-channel latent statistics (the values in Wan2.1's own VAE wrapper and in diffusers'
# AutoencoderKLWan defaults). Used when an original-format .pth (which carries no config) is loaded.
WAN21_LATENTS_MEAN: Tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD: Tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

ORIGINAL_VAE_FILENAME = "Wan2.1_VAE.pth"

PathLike = Union[str, "os.PathLike[str]"]


class VaeError(ValueError):
    """Base class for StreamingVAE errors."""


class VaeShapeError(VaeError):
    """An input tensor has the wrong rank, channel count, frame count, size or values."""


class VaeStateError(VaeError):
    """A VaeDecodeState is used with the wrong VAE or with latents that do not continue its stream."""


class VaeCheckpointError(VaeError):
    """A checkpoint path or state dict cannot be loaded as a Wan VAE."""


class VaeCompatibilityError(RuntimeError):
    """The installed diffusers no longer has the private AutoencoderKLWan internals this module drives."""


# --------------------------------------------------------------------------------------------------
# Pin guard
# --------------------------------------------------------------------------------------------------

_EXPECTED_SIGNATURES: Dict[str, Tuple[str, ...]] = {
    "WanDecoder3d.forward": ("self", "x", "feat_cache", "feat_idx", "first_chunk"),
    "WanEncoder3d.forward": ("self", "x", "feat_cache", "feat_idx"),
    "WanCausalConv3d.forward": ("self", "x", "cache_x"),  # its conv: `_CausalConv3dOneDNN` on CPU
    "WanRMS_norm.forward": ("self", "x"),  # replaced on CPU by `_RMSNormBySumOfSquares`
}


def check_diffusers_compatibility() -> None:
    """Raise VaeCompatibilityError if the diffusers internals driven here differ from 0.42.1's."""
    problems: List[str] = []
    if diffusers.__version__ != PINNED_DIFFUSERS_VERSION:
        problems.append(f"diffusers {diffusers.__version__} installed, {PINNED_DIFFUSERS_VERSION} required")
    for qualname, expected in _EXPECTED_SIGNATURES.items():
        cls_name, meth = qualname.split(".")
        cls = getattr(_wan_vae_module, cls_name, None)
        if cls is None:
            problems.append(f"{cls_name} is missing from {_wan_vae_module.__name__}")
            continue
        got = tuple(inspect.signature(getattr(cls, meth)).parameters)
        if got != expected:
            problems.append(f"{qualname} takes {got}, expected {expected}")
    if getattr(_wan_vae_module, "CACHE_T", None) != 2:
        problems.append(f"CACHE_T is {getattr(_wan_vae_module, 'CACHE_T', None)!r}, expected 2")
    if problems:
        raise VaeCompatibilityError(
            "StreamingVAE drives private AutoencoderKLWan internals that changed: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# Decode state
# --------------------------------------------------------------------------------------------------


@dataclass
class VaeDecodeState:
    """Causal-conv feature cache of one decode stream (one session).

    `feat_cache` holds one entry per `WanCausalConv3d` of the decoder: the last frames that conv saw,
    or the marker string diffusers uses for "first chunk, upsampler not primed yet". Only the owning
    `StreamingVAE` reads or writes it.
    """

    owner_id: int
    num_convs: int
    feat_cache: List[Any] = field(default_factory=list)
    latent_frames: int = 0  # latent frames decoded so far
    batch_size: Optional[int] = None
    latent_hw: Optional[Tuple[int, int]] = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.feat_cache:
            self.feat_cache = [None] * self.num_convs

    @property
    def started(self) -> bool:
        return self.latent_frames > 0

    def reset(self) -> None:
        """Forget the stream: the next decode is a causal first chunk again."""
        self.feat_cache = [None] * self.num_convs
        self.latent_frames = 0
        self.batch_size = None
        self.latent_hw = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.feat_cache if isinstance(t, torch.Tensor))


# --------------------------------------------------------------------------------------------------
# StreamingVAE
# --------------------------------------------------------------------------------------------------


class _RMSNormBySumOfSquares(WanRMS_norm):
    """diffusers' `WanRMS_norm` whose L2 norm over the channels is computed as sqrt(sum(x^2)) on CPU.

    The same formula as `F.normalize` (x / max(norm, 1e-12)), equal up to float round-off, but PyTorch's CPU
    `vector_norm` over dim 1 of a [B, C, T, H, W] tensor is slow: it took a quarter of a toy-model decode (192 of 738
    ms for 4 sessions' blocks, one thread), and sum-of-squares is 1.4-11x faster on the decoder's shapes (measured
    here). Other devices keep diffusers' own code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        y = x if x.dtype in (torch.float32, torch.float64) else x.float()  # half types normalise in fp32, as upstream
        norm = y.square().sum(dim=1 if self.channel_first else -1, keepdim=True).sqrt().clamp_min(1e-12)
        return (y / norm).to(x.dtype) * self.scale * self.gamma + self.bias


_ONEDNN_CPU = torch.backends.mkldnn.is_available()


class _CausalConv3dOneDNN(WanCausalConv3d):
    """diffusers' `WanCausalConv3d` whose convolution always takes oneDNN (mkldnn) on CPU for float32.

    PyTorch picks its kernel with a heuristic written for 4-D inputs: a 5-D input of batch 1 with a 3x3 spatial kernel
    whose N*C*T*H is at most 20480 goes to the reference `slow_conv3d`. That is every conv of a one-session decode of
    the toy VAE (e.g. [1, 16, 6, 66, 66]), which ran 5-6x slower there than on oneDNN (21.8 vs 3.6 ms, one thread,
    measured here): one block took 344 ms to decode, three batched 561 ms. oneDNN is the kernel PyTorch already uses
    for batches, so results differ from the reference kernel's by float round-off. 1x1 spatial kernels keep PyTorch's
    choice (forced onto oneDNN they made a batch of four slower on one thread), as do other devices, dtypes and
    anything that needs gradients."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if (input.device.type == "cpu" and input.dtype == torch.float32 and weight.dtype == torch.float32
                and self.padding_mode == "zeros" and _ONEDNN_CPU and (weight.shape[-1] > 1 or weight.shape[-2] > 1)
                and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))):
            # Channels-last: oneDNN's native layout (one A/B run: one block 9%, three 15% faster; same pixels).
            # Outputs stay channels-last, so the elementwise ops between convs keep that layout.
            cl = torch.channels_last_3d
            return torch.mkldnn_convolution(input.contiguous(memory_format=cl), weight.contiguous(memory_format=cl),
                                            bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


class StreamingVAE:
    """Wan VAE with deterministic normalized encode and per-session streaming decode."""

    def __init__(self, vae: AutoencoderKLWan) -> None:
        if not isinstance(vae, AutoencoderKLWan):
            raise TypeError(f"StreamingVAE needs a diffusers AutoencoderKLWan, got {type(vae).__name__}")
        check_diffusers_compatibility()
        self.vae = vae.eval().requires_grad_(False)
        for module in vae.modules():
            if type(module) is WanRMS_norm:
                module.__class__ = _RMSNormBySumOfSquares  # same parameters and state-dict keys, faster on CPU
            elif type(module) is WanCausalConv3d:
                module.__class__ = _CausalConv3dOneDNN  # likewise
        cfg = vae.config
        self._patch = int(cfg.patch_size) if cfg.patch_size else 1
        self._temporal_stride = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        self._spatial_stride = 2 ** (len(cfg.dim_mult) - 1) * self._patch
        self._dec_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self._enc_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.encoder.modules())
        mean = torch.tensor(list(cfg.latents_mean), dtype=torch.float32)
        std = torch.tensor(list(cfg.latents_std), dtype=torch.float32)
        if mean.numel() != cfg.z_dim or std.numel() != cfg.z_dim:
            raise VaeCheckpointError(
                f"latents_mean/std have {mean.numel()}/{std.numel()} entries, z_dim is {cfg.z_dim}")
        if not bool((std > 0).all()):
            raise VaeCheckpointError("latents_std must be positive")
        self._mean = mean.view(1, -1, 1, 1, 1)
        self._inv_std = (1.0 / std).view(1, -1, 1, 1, 1)
        self._stat_cache: Dict[Tuple[torch.device, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- geometry ---------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def temporal_stride(self) -> int:
        return self._temporal_stride

    @property
    def spatial_stride(self) -> int:
        return self._spatial_stride

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def num_output_frames(self, latent_frames: int, first_chunk: bool) -> int:
        """Video frames produced by decoding `latent_frames` latents (causal first frame if first_chunk)."""
        if latent_frames <= 0:
            return 0
        s = self._temporal_stride
        return 1 + s * (latent_frames - 1) if first_chunk else s * latent_frames

    # ---- normalization ------------------------------------------------------------------------------

    def _stats(self, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._stat_cache:
            self._stat_cache[key] = (self._mean.to(like), self._inv_std.to(like))
        return self._stat_cache[key]

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw VAE posterior mean -> model-space latent."""
        mean, inv_std = self._stats(mu)
        return (mu - mean) * inv_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space latent -> raw VAE latent."""
        mean, inv_std = self._stats(z)
        return z / inv_std + mean

    # ---- encode -----------------------------------------------------------------------------------

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> model-space latent [B, C, 1, H/s, W/s]."""
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            raise VaeShapeError(f"encode_image expects a [B, 3, H, W] tensor, got {_describe(image)}")
        return self.encode_video(image.unsqueeze(2))

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> model-space latent [B, C, 1 + (T-1)//4, H/s, W/s].

        Same chunking as diffusers' `_encode` (first frame alone, then groups of `temporal_stride`),
        with the encoder cache held in a local list so concurrent encodes never share state.
        """
        self._check_video(video)
        s = self._temporal_stride
        x = video.to(device=self.device, dtype=self.dtype)
        if self._patch > 1:
            x = patchify(x, patch_size=self._patch)
        cache: List[Any] = [None] * self._enc_convs
        outs = []
        with torch.no_grad():
            n_lat = 1 + (x.shape[2] - 1) // s
            for i in range(n_lat):
                chunk = x[:, :, :1] if i == 0 else x[:, :, 1 + s * (i - 1): 1 + s * i]
                outs.append(self.vae.encoder(chunk, feat_cache=cache, feat_idx=[0]))
            h = self.vae.quant_conv(torch.cat(outs, dim=2))
            mu = h[:, : self.latent_channels]
            return self.normalize(mu)

    def _check_video(self, video: Any) -> None:
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            raise VaeShapeError(f"encode_video expects a [B, 3, T, H, W] tensor, got {_describe(video)}")
        b, c, t, h, w = video.shape
        in_ch = int(self.vae.config.in_channels)
        if b < 1 or c != in_ch:
            raise VaeShapeError(f"expected [B>=1, {in_ch}, T, H, W] pixels, got shape {tuple(video.shape)}")
        if not video.is_floating_point():
            raise VaeShapeError(f"pixels must be a float tensor in [-1, 1], got dtype {video.dtype}")
        s = self._temporal_stride
        if t < 1 or (t - 1) % s:
            raise VaeShapeError(f"frame count must be 1 + {s}k (causal VAE), got {t}")
        ss = self._spatial_stride
        if h < ss or w < ss or h % ss or w % ss:
            raise VaeShapeError(f"height and width must be positive multiples of {ss}, got {h}x{w}")
        lo, hi = torch.aminmax(video.detach())
        lo, hi = float(lo), float(hi)
        if not (lo == lo and hi == hi) or lo < -1.001 or hi > 1.001:  # NaN fails both comparisons
            raise VaeShapeError(f"pixels must be finite and in [-1, 1], got range [{lo}, {hi}]")

    # ---- decode -----------------------------------------------------------------------------------

    def new_decode_state(self) -> VaeDecodeState:
        """A fresh stream for one session; its first decode is a causal first chunk."""
        return VaeDecodeState(owner_id=id(self), num_convs=self._dec_convs)

    def decode_stream(self, state: VaeDecodeState, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next `n` model-space latents of a stream -> frames [B, 3, T, H, W] in [-1, 1].

        T is 1 + 4(n-1) on the first call of a fresh state and 4n afterwards; the concatenation of all
        outputs equals `decode_full` of the concatenated latents exactly.
        """
        if not isinstance(state, VaeDecodeState):
            raise VaeStateError(f"expected a VaeDecodeState, got {type(state).__name__}")
        if state.owner_id != id(self) or state.num_convs != self._dec_convs:
            raise VaeStateError("this VaeDecodeState was created by a different StreamingVAE")
        self._check_latents(latents)
        b, _, n, h, w = latents.shape
        with state.lock:  # one stream is strictly sequential
            if state.started and (state.batch_size != b or state.latent_hw != (h, w)):
                raise VaeStateError(
                    f"stream was started with batch {state.batch_size} and latent size {state.latent_hw}, "
                    f"got batch {b} and latent size {(h, w)}")
            z = self.denormalize(latents.to(device=self.device, dtype=self.dtype))
            outs = []
            with torch.no_grad():
                x = self.vae.post_quant_conv(z)  # 1x1x1 conv: frame-local, safe to apply per chunk
                for i in range(n):
                    first = state.latent_frames == 0
                    out = self.vae.decoder(
                        x[:, :, i: i + 1], feat_cache=state.feat_cache, feat_idx=[0], first_chunk=first)
                    state.latent_frames += 1
                    outs.append(out)
            state.batch_size, state.latent_hw = b, (h, w)
        frames = torch.cat(outs, dim=2)
        if self._patch > 1:
            frames = unpatchify(frames, patch_size=self._patch)
        return frames.clamp_(-1.0, 1.0)

    def decode_stream_many(self, states: Sequence[VaeDecodeState],
                           latents: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The next latents of several streams (sessions) -> frames per stream, as `decode_stream` gives each up to
        float round-off. Streams that are under way, one batch row each, with the same latent shape and cache layout
        are decoded as ONE batch (their caches joined along the batch, then split back); any other stream (a fresh
        one, another size) is decoded on its own."""
        if len(states) != len(latents):
            raise VaeShapeError(f"{len(states)} streams but {len(latents)} latent blocks")
        if len({id(s) for s in states}) != len(states):
            raise VaeStateError("one stream appears twice in a batch")
        groups: Dict[Any, List[int]] = {}
        for i, (state, z) in enumerate(zip(states, latents)):
            key = self._batch_key(state, z)
            groups.setdefault(key if key is not None else ("alone", i), []).append(i)
        out: List[Optional[torch.Tensor]] = [None] * len(states)
        for members in groups.values():
            if len(members) == 1:
                i = members[0]
                out[i] = self.decode_stream(states[i], latents[i])
                continue
            for i, frames in zip(members, self._decode_joined([states[i] for i in members],
                                                              [latents[i] for i in members])):
                out[i] = frames
        return out  # type: ignore[return-value]

    def _batch_key(self, state: VaeDecodeState, latents: Any) -> Optional[tuple]:
        """What streams must share to be decoded as one batch; None for a stream that goes alone."""
        if (not isinstance(state, VaeDecodeState) or state.owner_id != id(self) or not state.started
                or state.batch_size != 1 or not isinstance(latents, torch.Tensor) or latents.dim() != 5
                or latents.shape[0] != 1):
            return None
        layout = []
        for c in state.feat_cache:
            if c is None:
                layout.append(None)
            elif isinstance(c, torch.Tensor) and c.shape[0] == 1:
                layout.append(tuple(c.shape[1:]))
            else:  # a marker of a stream still priming its upsamplers
                return None
        return tuple(latents.shape), state.latent_hw, tuple(layout)

    def _decode_joined(self, states: List[VaeDecodeState], latents: List[torch.Tensor]) -> List[torch.Tensor]:
        for state in states:
            state.lock.acquire()
        try:
            joined = VaeDecodeState(owner_id=id(self), num_convs=self._dec_convs,
                                    feat_cache=[None if all(s.feat_cache[j] is None for s in states)
                                                else torch.cat([s.feat_cache[j] for s in states])
                                                for j in range(self._dec_convs)],
                                    latent_frames=min(s.latent_frames for s in states), batch_size=len(states),
                                    latent_hw=states[0].latent_hw)
            frames = self.decode_stream(joined, torch.cat(latents))
            n = latents[0].shape[2]
            for row, state in enumerate(states):
                # copies: a view would keep the whole joined cache alive for as long as the stream lives
                state.feat_cache = [None if c is None else c[row:row + 1].clone() for c in joined.feat_cache]
                state.latent_frames += n
            return [frames[row:row + 1] for row in range(len(states))]
        finally:
            for state in states:
                state.lock.release()

    def decode_full(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a whole clip of model-space latents at once (same result as one fresh stream)."""
        return self.decode_stream(self.new_decode_state(), latents)

    def _check_latents(self, latents: Any) -> None:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise VaeShapeError(f"latents must be a [B, C, n, h, w] tensor, got {_describe(latents)}")
        b, c, n, h, w = latents.shape
        if c != self.latent_channels or b < 1 or n < 1 or h < 1 or w < 1:
            raise VaeShapeError(
                f"latents must be [B>=1, {self.latent_channels}, n>=1, h, w], got shape {tuple(latents.shape)}")
        if not latents.is_floating_point():
            raise VaeShapeError(f"latents must be a float tensor, got dtype {latents.dtype}")
        if not bool(torch.isfinite(latents).all()):
            raise VaeShapeError("latents contain NaN or inf")

    # ---- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: PathLike,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        subfolder: Optional[str] = None,
    ) -> "StreamingVAE":
        """Load a diffusers-format folder (config.json + weights) or an original Wan `.pth`.

        `path` may be: a diffusers VAE folder; a folder that contains `Wan2.1_VAE.pth` (the official
        Wan2.2-S2V layout); or a `.pth`/`.pt`/`.safetensors` file with original Wan key names.
        """
        root = os.fspath(path)
        if subfolder:
            root = os.path.join(root, subfolder)
        if os.path.isdir(root):
            if os.path.isfile(os.path.join(root, "config.json")):
                vae = AutoencoderKLWan.from_pretrained(root, torch_dtype=dtype)
                return cls(vae.to(device))
            original = os.path.join(root, ORIGINAL_VAE_FILENAME)
            if os.path.isfile(original):
                return cls.from_original_checkpoint(original, dtype=dtype, device=device)
            raise VaeCheckpointError(
                f"{root} has neither a diffusers config.json nor {ORIGINAL_VAE_FILENAME}")
        if os.path.isfile(root):
            return cls.from_original_checkpoint(root, dtype=dtype, device=device)
        raise VaeCheckpointError(f"VAE checkpoint path {root} does not exist")

    @classmethod
    def from_original_checkpoint(
        cls,
        file: PathLike,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        latents_mean: Optional[Tuple[float, ...]] = None,
        latents_std: Optional[Tuple[float, ...]] = None,
    ) -> "StreamingVAE":
        """Load an original Wan-format VAE state dict (e.g. `Wan2.1_VAE.pth`)."""
        state_dict = _load_state_dict_file(os.fspath(file))
        converted, config = convert_original_vae_state_dict(state_dict)
        z_dim = config["z_dim"]
        if latents_mean is None or latents_std is None:
            if z_dim != len(WAN21_LATENTS_MEAN):
                raise VaeCheckpointError(
                    f"checkpoint has z_dim={z_dim}; pass latents_mean/latents_std for a non-Wan2.1 VAE")
            latents_mean, latents_std = WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
        config.update(latents_mean=list(latents_mean), latents_std=list(latents_std))
        converted = {k: v.to(dtype=dtype) for k, v in converted.items()}
        with torch.device("meta"):
            vae = AutoencoderKLWan(**config)
        try:
            result = vae.load_state_dict(converted, strict=False, assign=True)
        except RuntimeError as exc:  # size mismatches
            raise VaeCheckpointError(f"{file}: tensor shapes do not fit the inferred architecture: {exc}") from exc
        if result.missing_keys or result.unexpected_keys:
            raise VaeCheckpointError(
                f"{file}: converted state dict does not match AutoencoderKLWan{config}: "
                f"missing {sorted(result.missing_keys)[:8]}, unexpected {sorted(result.unexpected_keys)[:8]}")
        return cls(vae.to(device))


# --------------------------------------------------------------------------------------------------
# Original Wan checkpoint conversion
# --------------------------------------------------------------------------------------------------

# Sub-keys inside one original ResidualBlock (Sequential: 0 RMS_norm, 1 SiLU, 2 conv, 3 RMS_norm,
# 4 SiLU, 5 Dropout, 6 conv; plus a 1x1 `shortcut` when channels change) -> diffusers WanResidualBlock.
_RESBLOCK_RENAMES = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_ATTN_SUBKEYS = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
_RESAMPLE_SUBKEYS = ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")
_SEQ_KEY = re.compile(r"^(encoder|decoder)\.(downsamples|upsamples|middle)\.(\d+)\.(.+)$")


def convert_original_vae_state_dict(
    state_dict: Dict[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Rename an original Wan2.1-format VAE state dict to diffusers `AutoencoderKLWan` names.

    Returns (converted_state_dict, AutoencoderKLWan constructor kwargs inferred from the tensor shapes).
    The original layout stores encoder/decoder stages as flat sequences; diffusers keeps the encoder flat
    (`down_blocks.{i}` = `downsamples.{i}`) but groups the decoder into `up_blocks.{level}` with
    `resnets.{j}` and `upsamplers.0`.
    """
    sd = dict(state_dict)
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = dict(sd["state_dict"])
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VaeCheckpointError("checkpoint is not a flat tensor state dict")
    if any(k.startswith(("encoder.conv_in.", "decoder.up_blocks.")) for k in sd):
        raise VaeCheckpointError("state dict already uses diffusers names; load its folder with config.json")
    for required in ("encoder.conv1.weight", "decoder.conv1.weight", "conv1.weight", "conv2.weight",
                     "decoder.head.2.weight"):
        if required not in sd:
            raise VaeCheckpointError(f"not an original Wan VAE state dict: {required!r} is missing")

    config = _infer_original_vae_config(sd)
    nrb = config["num_res_blocks"]
    out: Dict[str, torch.Tensor] = {}
    top = {
        "conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
        "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias",
    }
    for key, value in sd.items():
        new = top.get(key)
        if new is None:
            new = _convert_coder_key(key, nrb)
        if new in out:
            raise VaeCheckpointError(f"two checkpoint keys map to {new}")
        out[new] = value
    return out, config


def _convert_coder_key(key: str, nrb: int) -> str:
    for side in ("encoder", "decoder"):
        if key in (f"{side}.conv1.weight", f"{side}.conv1.bias"):
            return f"{side}.conv_in.{key.rsplit('.', 1)[1]}"
        if key == f"{side}.head.0.gamma":
            return f"{side}.norm_out.gamma"
        if key in (f"{side}.head.2.weight", f"{side}.head.2.bias"):
            return f"{side}.conv_out.{key.rsplit('.', 1)[1]}"
    m = _SEQ_KEY.match(key)
    if not m:
        raise VaeCheckpointError(f"unrecognised original VAE key {key!r}")
    side, seq, idx, sub = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    if seq == "middle":
        # middle = ResidualBlock, AttentionBlock, ResidualBlock
        if idx == 1 and sub in _ATTN_SUBKEYS:
            return f"{side}.mid_block.attentions.0.{sub}"
        if idx in (0, 2) and sub in _RESBLOCK_RENAMES:
            return f"{side}.mid_block.resnets.{idx // 2}.{_RESBLOCK_RENAMES[sub]}"
    elif seq == "downsamples":
        if sub in _RESBLOCK_RENAMES:
            return f"encoder.down_blocks.{idx}.{_RESBLOCK_RENAMES[sub]}"
        if sub in _RESAMPLE_SUBKEYS:
            return f"encoder.down_blocks.{idx}.{sub}"
    elif seq == "upsamples":
        # each decoder level: nrb + 1 residual blocks, then one Resample (absent on the last level)
        level, j = divmod(idx, nrb + 2)
        if j <= nrb and sub in _RESBLOCK_RENAMES:
            return f"decoder.up_blocks.{level}.resnets.{j}.{_RESBLOCK_RENAMES[sub]}"
        if j == nrb + 1 and sub in _RESAMPLE_SUBKEYS:
            return f"decoder.up_blocks.{level}.upsamplers.0.{sub}"
    raise VaeCheckpointError(f"unsupported original VAE key {key!r} (attention outside the middle block?)")


def _infer_original_vae_config(sd: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    enc_items: Dict[int, set] = {}
    for key in sd:
        m = _SEQ_KEY.match(key)
        if m and m.group(1) == "encoder" and m.group(2) == "downsamples":
            enc_items.setdefault(int(m.group(3)), set()).add(m.group(4))
    if not enc_items or sorted(enc_items) != list(range(len(enc_items))):
        raise VaeCheckpointError("original VAE encoder.downsamples is missing or not contiguous")
    base_dim = int(sd["encoder.conv1.weight"].shape[0])
    levels: List[List[int]] = [[]]  # out-channels of residual blocks per level
    temporal: List[bool] = []
    for i in range(len(enc_items)):
        subs = enc_items[i]
        if "residual.2.weight" in subs:
            levels[-1].append(int(sd[f"encoder.downsamples.{i}.residual.2.weight"].shape[0]))
        elif "resample.1.weight" in subs:
            temporal.append("time_conv.weight" in subs)
            levels.append([])
        elif "to_qkv.weight" in subs:
            raise VaeCheckpointError("VAEs with attention in the down path (attn_scales) are not supported")
        else:
            raise VaeCheckpointError(f"cannot classify encoder.downsamples.{i} with keys {sorted(subs)}")
    nrb = len(levels[0])
    if nrb < 1 or any(len(lv) != nrb for lv in levels):
        raise VaeCheckpointError(f"uneven residual blocks per level: {[len(lv) for lv in levels]}")
    if any(len(set(lv)) != 1 for lv in levels):
        raise VaeCheckpointError("residual blocks within a level change width; not a Wan2.1 VAE layout")
    widths = [lv[0] for lv in levels]
    if any(w % base_dim for w in widths):
        raise VaeCheckpointError(f"level widths {widths} are not multiples of base_dim {base_dim}")
    dim_mult = [w // base_dim for w in widths]
    # the decoder repeats the dim_mult ladder from its own base width; its last level is dim*dim_mult[0]
    dec_last = int(sd["decoder.head.2.weight"].shape[1])
    if dec_last % dim_mult[0]:
        raise VaeCheckpointError("decoder width does not fit dim_mult")
    dec_base = dec_last // dim_mult[0]
    z_dim = int(sd["conv2.weight"].shape[0])
    config: Dict[str, Any] = dict(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=dim_mult,
        num_res_blocks=nrb,
        attn_scales=[],
        temperal_downsample=temporal + [False] * (len(dim_mult) - 1 - len(temporal)),
        in_channels=int(sd["encoder.conv1.weight"].shape[1]),
        out_channels=int(sd["decoder.head.2.weight"].shape[0]),
    )
    if dec_base != base_dim:
        config["decoder_base_dim"] = dec_base
    if len(temporal) != len(dim_mult) - 1:
        raise VaeCheckpointError("number of encoder resample stages does not match dim_mult")
    return config


def _load_state_dict_file(file: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(file):
        raise VaeCheckpointError(f"VAE checkpoint {file} does not exist")
    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(file)
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch.save format cannot be memory-mapped
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: report it as a checkpoint problem
        raise VaeCheckpointError(f"cannot read VAE checkpoint {file}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Tiny model for tests
# --------------------------------------------------------------------------------------------------

TINY_VAE_CONFIG: Dict[str, Any] = dict(
    base_dim=4,
    z_dim=16,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=[0.0] * 16,
    latents_std=[1.0] * 16,
)


def tiny_vae(seed: int = 0, **overrides: Any) -> StreamingVAE:
    """A tiny random Wan VAE (same classes, strides 4x8x8) that decodes a 64x64 block in milliseconds."""
    config = {**TINY_VAE_CONFIG, **overrides}
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**config)
    finally:
        torch.random.set_rng_state(gen_state)
    return StreamingVAE(vae)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__
