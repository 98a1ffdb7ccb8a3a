"""Typed model and streaming configurations.

`ModelConfig` describes the causal Wan2.2-S2V transformer. Its field names follow the official
`config.json` of Wan2.2-S2V-14B (dim, ffn_dim, num_heads, ...), so a checkpoint's config maps onto it
one to one. `StreamConfig` describes how a session streams: block size, KV window, sampler,
resolution and the Rolling Sink Frame Mechanism (RSFM) knobs. Nothing here allocates tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple


class ConfigError(ValueError):
    """A configuration value is invalid (unknown preset, bad resolution, token budget exceeded...)."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the causal S2V DiT (identical parameters to `WanModel_S2V`)."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # S2V additions
    cond_dim: int = 16
    audio_dim: int = 1024
    audio_num_layers: int = 25  # hidden states mixed by the causal audio encoder (wav2vec2 layers + 1)
    num_audio_token: int = 4
    audio_inject_layers: Tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    enable_adain: bool = True
    adain_mode: str = "attn_norm"
    zero_timestep: bool = True
    enable_framepack: bool = True
    framepack_buckets: Tuple[int, int, int] = (1, 2, 16)
    motion_frames: int = 73  # video frames of motion context (VAE-encoded to 19 latents)
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        d = self.head_dim
        if d % 2 or (d - 4 * (d // 6)) % 2:
            raise ConfigError(f"head_dim {d} cannot be split into 3D rotary axes")
        if any(not 0 <= i < self.num_layers for i in self.audio_inject_layers):
            raise ConfigError(f"audio_inject_layers {self.audio_inject_layers} out of range 0..{self.num_layers - 1}")
        if list(self.audio_inject_layers) != sorted(set(self.audio_inject_layers)):
            raise ConfigError("audio_inject_layers must be strictly increasing")
        if self.dim % 4:
            raise ConfigError("dim must be divisible by 4 (audio encoder widths)")
        if self.adain_mode != "attn_norm":
            raise ConfigError("only adain_mode='attn_norm' (the Live Avatar setting) is supported")
        if not self.zero_timestep:
            raise ConfigError("only zero_timestep=True (the Live Avatar setting) is supported")
        if not self.enable_framepack:
            raise ConfigError("only enable_framepack=True (the Live Avatar setting) is supported")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_axes(self) -> Tuple[int, int, int]:
        """Real-valued rotary widths for the (t, h, w) axes; their sum is head_dim."""
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    @property
    def motion_latent_frames(self) -> int:
        return (self.motion_frames + 3) // 4

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        out["audio_inject_layers"] = list(self.audio_inject_layers)
        out["framepack_buckets"] = list(self.framepack_buckets)
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("patch_size", "audio_inject_layers", "framepack_buckets"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def to_official_config(self) -> Dict[str, Any]:
        """The `config.json` an official Wan2.2-S2V checkpoint folder carries for this architecture."""
        return {
            "_class_name": "WanModel_S2V",
            "model_type": "s2v",
            "cond_dim": self.cond_dim,
            "audio_dim": self.audio_dim,
            "num_audio_token": self.num_audio_token,
            "enable_adain": self.enable_adain,
            "adain_mode": self.adain_mode,
            "audio_inject_layers": list(self.audio_inject_layers),
            "zero_init": True,
            "zero_timestep": self.zero_timestep,
            "enable_motioner": False,
            "add_last_motion": True,
            "enable_tsm": False,
            "trainable_token_pos_emb": False,
            "motion_token_num": 1024,
            "enable_framepack": self.enable_framepack,
            "framepack_drop_mode": "padd",
            "patch_size": list(self.patch_size),
            "text_len": self.text_len,
            "in_dim": self.in_dim,
            "dim": self.dim,
            "ffn_dim": self.ffn_dim,
            "freq_dim": self.freq_dim,
            "text_dim": self.text_dim,
            "out_dim": self.out_dim,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "window_size": [-1, -1],
            "qk_norm": self.qk_norm,
            "cross_attn_norm": self.cross_attn_norm,
            "eps": self.eps,
            # AvatarServe extras (ignored by upstream loaders): values upstream hard-codes.
            "audio_num_layers": self.audio_num_layers,
            "motion_frames": self.motion_frames,
            "framepack_buckets": list(self.framepack_buckets),
        }

    @classmethod
    def from_official_config(cls, data: Dict[str, Any]) -> "ModelConfig":
        """Read an official (or AvatarServe-written) `config.json`; unknown keys are ignored."""
        for flag, expected in (("enable_motioner", False), ("trainable_token_pos_emb", False)):
            if flag in data and bool(data[flag]) != expected:
                raise ConfigError(f"config.json sets {flag}={data[flag]!r}; Live Avatar requires {expected!r}")
        if data.get("model_type", "s2v") != "s2v":
            raise ConfigError(f"config.json model_type is {data.get('model_type')!r}, expected 's2v'")
        return cls.from_dict(data)


@dataclass(frozen=True)
class StreamConfig:
    """How one session streams. Defaults are Live Avatar's runtime values."""

    height: int = 384
    width: int = 704
    fps: int = 25
    sample_rate: int = 16000
    latent_frames_per_block: int = 3
    window_blocks: int = 4  # KV ring = this many blocks, the current one included
    vae_temporal_stride: int = 4
    vae_spatial_stride: int = 8
    # Resolution is free (multiples of 16) as long as one latent frame stays within this budget.
    max_tokens_per_frame: int = 4096
    # Sampler: flow-matching Euler, no CFG.
    num_steps: int = 4
    shift: float = 3.0
    num_train_timesteps: int = 1000
    # RSFM
    sink_base_index: int = 30  # temporal RoPE index of the reference in the sink prefill
    sink_distance_range: Tuple[int, int] = (4, 30)  # d drawn per forward, inclusive (upstream randint(4, 30))
    rolling_rope: bool = True
    adaptive_sink: bool = True
    aas_after_blocks: int = 4  # one clip: the sink is swapped to the first generated latent after it
    text_len: Optional[int] = None  # None: use the model's text_len

    def __post_init__(self) -> None:
        mult = 2 * self.vae_spatial_stride
        if self.height <= 0 or self.width <= 0 or self.height % mult or self.width % mult:
            raise ConfigError(f"resolution {self.width}x{self.height} must be positive multiples of {mult}")
        if self.tokens_per_frame > self.max_tokens_per_frame:
            raise ConfigError(
                f"resolution {self.width}x{self.height} gives {self.tokens_per_frame} tokens per latent frame, "
                f"over the budget of {self.max_tokens_per_frame}")
        if self.num_steps < 1:
            raise ConfigError("num_steps must be >= 1")
        if self.window_blocks < 1 or self.latent_frames_per_block < 1:
            raise ConfigError("window_blocks and latent_frames_per_block must be >= 1")
        lo, hi = self.sink_distance_range
        if not 0 <= lo <= hi <= self.sink_base_index:
            raise ConfigError(f"sink_distance_range {self.sink_distance_range} must lie within 0..{self.sink_base_index}")

    @property
    def latent_height(self) -> int:
        return self.height // self.vae_spatial_stride

    @property
    def latent_width(self) -> int:
        return self.width // self.vae_spatial_stride

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_height // 2) * (self.latent_width // 2)

    @property
    def frames_per_block(self) -> int:
        """Video frames per block (12 for 3 latent frames)."""
        return self.latent_frames_per_block * self.vae_temporal_stride

    @property
    def samples_per_block(self) -> int:
        return self.frames_per_block * self.sample_rate // self.fps

    @property
    def block_seconds(self) -> float:
        return self.frames_per_block / self.fps

    @property
    def tokens_per_block(self) -> int:
        return self.tokens_per_frame * self.latent_frames_per_block

    @property
    def window_tokens(self) -> int:
        return self.tokens_per_block * self.window_blocks

    def latent_shape(self, channels: int = 16) -> Tuple[int, int, int, int]:
        """Shape of one block latent without batch: [C, F, h, w]."""
        return (channels, self.latent_frames_per_block, self.latent_height, self.latent_width)

    def replace(self, **changes: Any) -> "StreamConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    stream: StreamConfig
    description: str = ""
    # Sub-model settings (tiny configs for CPU tests; real paths for the 14B model).
    extras: Dict[str, Any] = field(default_factory=dict)


LIVEAVATAR_14B = Preset(
    name="liveavatar-14b",
    model=ModelConfig(),
    stream=StreamConfig(),
    description="Live Avatar (Wan2.2-S2V-14B + distilled LoRA), upstream's exact architecture",
)

TINY = Preset(
    name="tiny",
    model=ModelConfig(
        dim=48,
        ffn_dim=96,
        num_heads=2,
        num_layers=2,
        text_dim=32,
        text_len=16,
        freq_dim=32,
        audio_dim=32,
        audio_num_layers=3,
        audio_inject_layers=(0, 1),
    ),
    stream=StreamConfig(height=64, width=64, max_tokens_per_frame=1024),
    description="Same classes as liveavatar-14b at sizes that run a block in milliseconds on a CPU",
)

TOY = Preset(
    name="toy",
    model=ModelConfig(
        dim=128,
        ffn_dim=512,
        num_heads=4,
        num_layers=6,
        text_dim=32,
        text_len=16,
        freq_dim=64,
        audio_dim=128,  # log-mel front end: 4 hops x 32 mel bands per video frame
        audio_num_layers=1,
        audio_inject_layers=(0, 1, 2, 3, 4, 5),
    ),
    stream=StreamConfig(height=64, width=64, max_tokens_per_frame=1024),
    description="Tiny Live Avatar trained by scripts/train_toy.py on the procedural talking-face world; "
                "its weights ship in the package (avatarserve/weights/toy)",
    extras={"default_checkpoint": "weights/toy", "audio_frontend": "logmel"},
)

PRESETS: Dict[str, Preset] = {p.name: p for p in (LIVEAVATAR_14B, TINY, TOY)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown config {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def stream_config(name: str, overrides: Optional[Mapping[str, Any]] = None) -> StreamConfig:
    """The stream settings of preset `name` with `overrides` applied (the one place this is derived)."""
    stream = get_preset(name).stream
    overrides = dict(overrides or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(StreamConfig)}
    if unknown:
        raise ConfigError(f"unknown stream settings {sorted(unknown)}")
    return stream.replace(**overrides) if overrides else stream
