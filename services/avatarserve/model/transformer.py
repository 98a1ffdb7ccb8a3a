"""The causal Wan2.2-S2V transformer of Live Avatar.

Parameter names, shapes and registration order equal the official Wan2.2-S2V-14B checkpoint
(`WanModel_S2V`), so real weights load key for key (see tests/model/test_manifest.py). Behaviour follows
Live Avatar's `CausalWanModel_S2V` inference path:

- one *sink prefill* forward over the reference latent + FramePack motion tokens fills each layer's cond
  K/V (stored without RoPE);
- each streaming forward embeds one block of noisy latents, attends over the KV window of this stage's own
  noisy K/V (timestep forcing) plus the sink (re-rotated with rolling RoPE), cross-attends to the text, and
  injects audio after the configured layers (residual on the noisy tokens only);
- `forward_masked` runs many blocks at once with a block-causal, windowed attention mask: the training
  forward (diffusion forcing) and the reference the cached path is tested against.

We reuse diffusers' `AdaLayerNorm` (what upstream uses for the audio AdaIN layers); the rest is written here
because diffusers has no Wan S2V model and its Wan blocks use different parameter names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import AdaLayerNorm

from .config import ModelConfig
from .kv_cache import CacheContext, CacheError, KVCache
from .rope import RotaryEmbedding, TokenGrid, apply_rotary, motion_grids, noisy_grid, reference_grid

# trainable_cond_mask ids
NOISY_ID, REFERENCE_ID, MOTION_ID = 0, 1, 2


class ModelInputError(ValueError):
    """An input tensor given to the transformer has the wrong shape, dtype or values."""


# --------------------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMS norm over the full width (qk-norm across heads), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 (upstream's WanLayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    s = torch.outer(pos, freqs)
    return torch.cat([torch.cos(s), torch.sin(s)], dim=1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [B,S,H,D], k/v [B,L,H,D] -> [B,S,H*D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class Attention(nn.Module):
    """q/k/v/o projections with qk RMS norm (the layout of WanSelfAttention / WanCrossAttention)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim)

    def qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._split(self.norm_q(self.q(x))), self._split(self.norm_k(self.k(x))), self._split(self.v(x))

    def cross(self, x: torch.Tensor, context: "torch.Tensor | Sequence[torch.Tensor]") -> torch.Tensor:
        """Attend x [B,S,C] to `context` [B,L,C], or to one context [1,L_i,C] per batch row (lengths may differ)."""
        q = self._split(self.norm_q(self.q(x)))
        if isinstance(context, torch.Tensor):
            return self.o(_attend(q, self._split(self.norm_k(self.k(context))), self._split(self.v(context))))
        rows = [_attend(q[i:i + 1], self._split(self.norm_k(self.k(c))), self._split(self.v(c)))
                for i, c in enumerate(context)]
        return self.o(torch.cat(rows))


@dataclass
class TokenLayout:
    """Everything position-dependent for one forward: rotary freqs and what the self-attention does."""

    freqs: torch.Tensor  # [S, D/2] complex rotations for the sequence's tokens
    noisy_tokens: int  # leading noisy tokens (the rest are sink tokens)
    frame_tokens: int
    cache: Optional[CacheContext] = None
    mask: Optional[torch.Tensor] = None  # dense attention mask for forward_masked


@dataclass
class BatchLayout:
    """Several sessions' blocks in one forward: row i of the batch attends with `parts[i]` (its own KV cache and
    RoPE positions); everything else (projections, FFN, audio injection, head) runs on the whole batch."""

    parts: List[TokenLayout]


class S2VBlock(nn.Module):
    """One Wan S2V transformer block (AdaLN-modulated self-attention, text cross-attention, FFN)."""

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        dim = cfg.dim
        self.layer_index = layer_index
        self.norm1 = FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def self_attention(self, x: torch.Tensor, layout: "TokenLayout | BatchLayout") -> torch.Tensor:
        attn = self.self_attn
        q, k, v = attn.qkv(x)
        if isinstance(layout, BatchLayout):
            return attn.o(torch.cat([self._attend_part(q[i:i + 1], k[i:i + 1], v[i:i + 1], part)
                                     for i, part in enumerate(layout.parts)]))
        return attn.o(self._attend_part(q, k, v, layout))

    def _attend_part(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Self-attention of the rows that share `layout` (one cache, one set of positions), before `o`."""
        rq = apply_rotary(q, layout.freqs).type_as(v)
        rk = apply_rotary(k, layout.freqs).type_as(v)
        ctx = layout.cache
        if ctx is None:  # dense masked forward (training / reference)
            return _attend(rq, rk, v, layout.mask)
        cache = ctx.cache
        if ctx.sink_prefill:
            # Sink tokens attend among themselves; the cache keeps their keys un-rotated.
            cache.write_cond(self.layer_index, k, v)
            return _attend(rq, rk, v)
        wk, wv = cache.window_kv(self.layer_index, ctx.block_index, rk, v, ctx.write)
        ck, cv = cache.cond(self.layer_index)
        ck = apply_rotary(ck, ctx.cond_freqs).type_as(v)
        return _attend(rq, torch.cat([wk, ck], dim=1), torch.cat([wv, cv], dim=1))

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: "torch.Tensor | Sequence[torch.Tensor]",
                layout: "TokenLayout | BatchLayout") -> torch.Tensor:
        """x [B,S,C]; e [B,S,6,C] float32 per-token modulation (already expanded)."""
        mod = (self.modulation.float().unsqueeze(0) + e).unbind(dim=2)  # 6 x [B,S,C]
        h = self.norm1(x).float() * (1 + mod[1]) + mod[0]
        y = self.self_attention(h.type_as(x), layout)
        x = (x.float() + y.float() * mod[2]).type_as(x)
        x = x + self.cross_attn.cross(self.norm3(x), context)
        h = self.norm2(x).float() * (1 + mod[4]) + mod[3]
        y = self.ffn(h.type_as(x))
        return (x.float() + y.float() * mod[5]).type_as(x)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B,S,C]; e [B,S,C] float32 per-token time embedding."""
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(dim=2)
        return self.head((self.norm(x).float() * (1 + scale) + shift).type_as(x))


class CausalConv1d(nn.Module):
    """Conv1d with left (causal) replicate padding; parameters live under `.conv` as upstream."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(chan_in, chan_out, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0), mode="replicate"))


class AudioMotionEncoder(nn.Module):
    """Causal Conv1d stack (strides 1, 2, 2) giving per-latent-frame audio tokens (+ a global AdaIN token)."""

    def __init__(self, in_dim: int, hidden_dim: int, num_tokens: int, need_global: bool):
        super().__init__()
        self.num_tokens = num_tokens
        self.need_global = need_global
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))
        self.conv1_local = CausalConv1d(in_dim, hidden_dim // 4 * num_tokens, 3, stride=1)
        if need_global:
            self.conv1_global = CausalConv1d(in_dim, hidden_dim // 4, 3, stride=1)
        self.conv2 = CausalConv1d(hidden_dim // 4, hidden_dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(hidden_dim // 2, hidden_dim, 3, stride=2)
        if need_global:
            self.final_linear = nn.Linear(hidden_dim, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim // 4, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden_dim // 2, elementwise_affine=False, eps=1e-6)
        self.norm3 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, T, C/4] -> [N, T', C] through the shared strided convs."""
        x = F.silu(self.norm1(x)).transpose(1, 2)
        x = F.silu(self.norm2(self.conv2(x).transpose(1, 2))).transpose(1, 2)
        return F.silu(self.norm3(self.conv3(x).transpose(1, 2)))

    def forward(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """x [B, T, C_in] -> (global [B,T',1,C] or None, local [B,T',num_tokens+1,C])."""
        b = x.shape[0]
        xc = x.transpose(1, 2)
        loc = self.conv1_local(xc)  # [B, n*C/4, T]
        loc = loc.view(b, self.num_tokens, -1, loc.shape[-1]).permute(0, 1, 3, 2).flatten(0, 1)  # [(B n), T, C/4]
        loc = self._tail(loc)
        loc = loc.view(b, self.num_tokens, loc.shape[1], loc.shape[2]).permute(0, 2, 1, 3)  # [B, T', n, C]
        loc = torch.cat([loc, self.padding_tokens.expand(b, loc.shape[1], 1, -1).to(loc.dtype)], dim=2)
        if not self.need_global:
            return None, loc
        glo = self.final_linear(self._tail(self.conv1_global(xc).transpose(1, 2)))
        return glo.unsqueeze(2), loc


class CausalAudioEncoder(nn.Module):
    """Learned SiLU-weighted mix of all wav2vec2 hidden states, then the causal conv stack."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(1, cfg.audio_num_layers, 1, 1) * 0.01)
        self.encoder = AudioMotionEncoder(cfg.audio_dim, cfg.dim, cfg.num_audio_token, cfg.enable_adain)

    def forward(self, features: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """features [B, L, C_a, T] (float) -> (global, local) token sequences, computed in float32."""
        w = F.silu(self.weights.float())
        mixed = (features.float() * w / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, C_a, T]
        x = mixed.transpose(1, 2)
        if self.encoder.padding_tokens.dtype == torch.float32:
            return self.encoder(x)
        # Upstream runs this encoder under float32 autocast even for bf16 weights: do the same explicitly.
        params = {k: v.float() for k, v in self.encoder.named_parameters()}
        return torch.func.functional_call(self.encoder, params, (x,))


class AudioInjector(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = len(cfg.audio_inject_layers)
        self.injector = nn.ModuleList([Attention(cfg.dim, cfg.num_heads, True, cfg.eps) for _ in range(n)])
        self.injector_pre_norm_feat = nn.ModuleList(
            [nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6) for _ in range(n)])
        self.injector_pre_norm_vec = nn.ModuleList(
            [nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6) for _ in range(n)])
        if cfg.enable_adain:
            self.injector_adain_layers = nn.ModuleList(
                [AdaLayerNorm(embedding_dim=cfg.dim, output_dim=cfg.dim * 2, chunk_dim=1) for _ in range(n)])
        # injector j serves block audio_inject_layers[j] (not block j)
        self.block_to_injector = {layer: j for j, layer in enumerate(cfg.audio_inject_layers)}


class FramePackMotioner(nn.Module):
    """Packs the 19 motion latents into tokens at three compressions (buckets newest-first: 1, 2, 16 frames)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.buckets = tuple(cfg.framepack_buckets)
        self.proj = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """motion [B, C, T, h, w] -> tokens [B, S_motion, dim] ordered (post, 2x, 4x)."""
        b, c, t, h, w = motion.shape
        total = sum(self.buckets)
        padded = motion.new_zeros(b, c, total, h, w)
        keep = min(total, t)
        if keep:
            padded[:, :, -keep:] = motion[:, :, -keep:]
        far, mid, near = padded.split(list(self.buckets)[::-1], dim=2)
        toks = [p(x).flatten(2).transpose(1, 2) for p, x in ((self.proj, near), (self.proj_2x, mid), (self.proj_4x, far))]
        return torch.cat(toks, dim=1)


# --------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------
@dataclass
class AudioTokens:
    """Per-latent-frame audio tokens of one block: local [B,F,n+1,C] and global [B,F,1,C] (AdaIN)."""

    local: torch.Tensor
    global_: Optional[torch.Tensor]


@dataclass
class BlockRequest:
    """One session's block in a batched forward (`forward_blocks`)."""

    cache: KVCache  # the session's own cache at this stage (batch 1)
    latents: torch.Tensor  # [1, 16, F, h, w]
    timestep: torch.Tensor  # [1] or [1, F]
    audio: AudioTokens  # batch 1
    text: torch.Tensor  # embed_text(context) [1, L, dim]; L may differ between requests
    block_index: int
    sink_index: int
    write: bool = True


@dataclass
class SinkInputs:
    """What the sink prefill embeds: the reference latent and the motion latents (+ text)."""

    reference: torch.Tensor  # [B, 16, 1, h, w]
    motion: torch.Tensor  # [B, 16, T_m, h, w]


class CausalS2VTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([S2VBlock(cfg, i) for i in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.casual_audio_encoder = CausalAudioEncoder(cfg)  # sic: the official key spelling
        self.audio_injector = AudioInjector(cfg)
        self.trainable_cond_mask = nn.Embedding(3, dim)
        self.frame_packer = FramePackMotioner(cfg)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.reset_parameters()

    # ----- init -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Upstream's init: Xavier linears, N(0, .02) embeddings, zero head / audio outputs / cond paths."""
        if any(p.is_meta for p in self.parameters()):
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        nn.init.zeros_(self.trainable_cond_mask.weight)
        nn.init.zeros_(self.cond_encoder.weight)
        nn.init.zeros_(self.cond_encoder.bias)
        for inj in self.audio_injector.injector:
            nn.init.zeros_(inj.o.weight)
            nn.init.zeros_(inj.o.bias)
        if self.config.enable_adain:
            for ada in self.audio_injector.injector_adain_layers:
                nn.init.zeros_(ada.linear.weight)
                nn.init.zeros_(ada.linear.bias)

    @torch.no_grad()
    def randomize_for_tests(self, seed: int = 0, scale: float = 0.5) -> "CausalS2VTransformer":
        """Fill every parameter with random values (zero-initialised paths included) so tests exercise them."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            fan = p.shape[-1] if p.dim() > 1 else p.numel()
            std = scale / math.sqrt(max(1, fan)) if p.dim() > 1 else 0.1
            p.copy_((torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith("norm_q.weight") or name.endswith(
                "norm_k.weight") or name.endswith("norm3.weight") else 0.0)).to(p.dtype))
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # ----- geometry ---------------------------------------------------------------------------------------------
    def sink_token_count(self, latent_h: int, latent_w: int) -> int:
        """Reference + motion tokens for a latent resolution (2640 at 704x384): sizes the cond cache."""
        ref = (latent_h // 2) * (latent_w // 2)
        return ref + sum(g.num_tokens for g in motion_grids(self.config.framepack_buckets, latent_h, latent_w))

    def new_cache(self, latent_h: int, latent_w: int, frames_per_block: int, window_blocks: int,
                  batch_size: int = 1, dtype: Optional[torch.dtype] = None,
                  device: Optional[torch.device | str] = None) -> KVCache:
        cfg = self.config
        return KVCache(
            num_layers=cfg.num_layers, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
            block_tokens=frames_per_block * (latent_h // 2) * (latent_w // 2), window_blocks=window_blocks,
            cond_tokens=self.sink_token_count(latent_h, latent_w), batch_size=batch_size,
            dtype=dtype or self.dtype, device=device or self.device)

    # ----- embeddings -------------------------------------------------------------------------------------------
    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """context [B, L, text_dim] (real tokens) -> [B, text_len, dim], zero-padded to text_len like upstream."""
        cfg = self.config
        if context.dim() != 3 or context.shape[-1] != cfg.text_dim:
            raise ModelInputError(f"text embeddings must be [B, L, {cfg.text_dim}], got {tuple(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ModelInputError(f"text has {context.shape[1]} tokens, more than text_len={cfg.text_len}")
        pad = context.new_zeros(context.shape[0], cfg.text_len - context.shape[1], cfg.text_dim)
        return self.text_embedding(torch.cat([context, pad], dim=1).to(self.dtype))

    def encode_audio(self, features: torch.Tensor, num_latent_frames: int) -> AudioTokens:
        """wav2vec2 features of one block [B, L, C_a, 4F] -> per-latent-frame tokens for F latent frames.

        Like upstream, the block's features are left-padded with `motion_frames` copies of their first frame
        and the leading motion latents are dropped, so each block is encoded on its own (strictly causal).
        """
        cfg = self.config
        if features.dim() != 4 or features.shape[1] != cfg.audio_num_layers or features.shape[2] != cfg.audio_dim:
            raise ModelInputError(
                f"audio features must be [B, {cfg.audio_num_layers}, {cfg.audio_dim}, T], got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ModelInputError("audio features contain NaN or inf")
        padded = torch.cat([features[..., :1].expand(-1, -1, -1, cfg.motion_frames), features], dim=-1)
        glo, loc = self.casual_audio_encoder(padded)
        drop = cfg.motion_latent_frames
        loc = loc[:, drop:]
        if loc.shape[1] != num_latent_frames:
            raise ModelInputError(
                f"{features.shape[-1]} audio frames give {loc.shape[1]} latent frames, expected {num_latent_frames}")
        return AudioTokens(local=loc.to(self.dtype), global_=None if glo is None else glo[:, drop:].to(self.dtype))

    def _time_modulation(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """t [B, F] -> (e [B,F,C] for the head, e0 [B,F,6,C] for the blocks), both float32."""
        cfg = self.config
        b, f = t.shape
        emb = sinusoidal_embedding(cfg.freq_dim, t.flatten()).float()
        tw = self.time_embedding[0].weight.dtype
        e = self.time_embedding(emb.to(tw)).float()
        e0 = self.time_projection(e.to(tw)).float().unflatten(1, (6, cfg.dim))
        return e.view(b, f, cfg.dim), e0.view(b, f, 6, cfg.dim)

    def _zero_time_modulation(self, batch: int) -> torch.Tensor:
        """Modulation [B,1,6,C] of the t=0 slot used by sink (reference / motion) tokens."""
        _, e0 = self._time_modulation(torch.zeros(batch, 1, device=self.device))
        return e0

    def _embed_noisy(self, latents: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        cfg = self.config
        x = self.patch_embedding(latents.to(self.dtype))
        # The pose condition is all zeros in Live Avatar: cond_encoder(0) is exactly its bias.
        x = x + self.cond_encoder.bias.view(1, -1, 1, 1, 1).to(x.dtype)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        x = x + self.trainable_cond_mask.weight[NOISY_ID].to(x.dtype)
        return x, grid  # type: ignore[return-value]

    def _embed_sink(self, sink: SinkInputs) -> torch.Tensor:
        ref = self.patch_embedding(sink.reference.to(self.dtype)).flatten(2).transpose(1, 2)
        ref = ref + self.trainable_cond_mask.weight[REFERENCE_ID].to(ref.dtype)
        mot = self.frame_packer(sink.motion.to(self.dtype))
        mot = mot + self.trainable_cond_mask.weight[MOTION_ID].to(mot.dtype)
        return torch.cat([ref, mot], dim=1)

    def sink_grids(self, latent_h: int, latent_w: int, sink_index: int) -> List[TokenGrid]:
        return [reference_grid(sink_index, latent_h // 2, latent_w // 2)] + motion_grids(
            self.config.framepack_buckets, latent_h, latent_w)

    def _check_latents(self, x: torch.Tensor, what: str) -> None:
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_dim:
            raise ModelInputError(f"{what} must be [B, {cfg.in_dim}, F, h, w], got {tuple(x.shape)}")
        if x.shape[3] % 2 or x.shape[4] % 2:
            raise ModelInputError(f"{what} latent height/width must be even, got {tuple(x.shape[3:])}")
        if not torch.isfinite(x).all():
            raise ModelInputError(f"{what} contains NaN or inf")

    def _inject_audio(self, layer: int, x: torch.Tensor, audio: AudioTokens, noisy_tokens: int, frames: int) -> torch.Tensor:
        j = self.audio_injector.block_to_injector.get(layer)
        if j is None:
            return x
        inj = self.audio_injector
        b = x.shape[0]
        h = x[:, :noisy_tokens].reshape(b * frames, noisy_tokens // frames, -1)
        if self.config.enable_adain:
            temb = audio.global_.reshape(b * frames, -1)
            h = inj.injector_adain_layers[j](h, temb=temb)
        else:
            h = inj.injector_pre_norm_feat[j](h)
        ctx = audio.local.reshape(b * frames, audio.local.shape[2], -1)
        res = inj.injector[j].cross(h, ctx).reshape(b, noisy_tokens, -1)
        return torch.cat([x[:, :noisy_tokens] + res, x[:, noisy_tokens:]], dim=1)

    def _unpatchify(self, x: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
        cfg = self.config
        f, h, w = grid
        p, q, r = cfg.patch_size
        b = x.shape[0]
        x = x.view(b, f, h, w, p, q, r, cfg.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(b, cfg.out_dim, f * p, h * q, w * r)

    # ----- streaming forwards -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill_sink(self, cache: KVCache, sink: SinkInputs, context: torch.Tensor, sink_version: int = 0) -> None:
        """Fill every layer's cond cache from the reference + motion tokens (t = 0, no audio).

        `context` is the text embedding [B, L, text_dim] (real tokens only).
        """
        self._check_latents(sink.reference, "reference latent")
        self._check_latents(sink.motion, "motion latents")
        if sink.reference.shape[2] != 1:
            raise ModelInputError("reference latent must have exactly one latent frame")
        lh, lw = sink.reference.shape[3:]
        x = self._embed_sink(sink)
        expected = self.sink_token_count(lh, lw)
        if x.shape[1] != expected or expected > cache.cond_tokens:
            raise CacheError(f"sink has {x.shape[1]} tokens; cache expects {cache.cond_tokens}")
        ctx = self.embed_text(context)
        e0 = self._zero_time_modulation(x.shape[0]).expand(-1, x.shape[1], -1, -1)
        freqs = self.rope.freqs(self.sink_grids(lh, lw, 30), x.device)
        layout = TokenLayout(freqs=freqs, noisy_tokens=0, frame_tokens=0,
                             cache=CacheContext(cache=cache, block_index=0, sink_prefill=True))
        for block in self.blocks:
            x = block(x, e0, ctx, layout)
        cache.cond_len = x.shape[1]
        cache.sink_version = sink_version

    @torch.no_grad()
    def forward_block(
        self,
        cache: KVCache,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        audio: AudioTokens,
        context: torch.Tensor,
        block_index: int,
        sink_index: int,
        write: bool = True,
        text: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """One denoising forward for one block: returns the flow velocity [B, 16, F, h, w].

        latents [B,16,F,h,w] at this stage's noise level; timestep [B] or [B,F]; `block_index` counts blocks from
        the start of the stream (frame start = block_index * F); `sink_index` is the temporal RoPE index of the
        reference token run (rolling RoPE), see rope.sink_temporal_index. `text` may pass a precomputed
        `embed_text(context)` to skip that projection.
        """
        self._check_latents(latents, "block latents")
        ctx = text if text is not None else self.embed_text(context)
        return self._forward_cached(latents, timestep, audio, ctx, [(cache, block_index, sink_index, write)])

    @torch.no_grad()
    def forward_blocks(self, requests: Sequence[BlockRequest]) -> torch.Tensor:
        """The blocks of several sessions at one denoising step in ONE forward -> velocities [N, 16, F, h, w], row i
        for request i. Projections, FFN, audio injection and head run on the whole batch; each row's self-attention
        reads and writes its own KV cache at its own block position. Equals `forward_block` per request up to float
        round-off. All blocks must have one shape (same resolution)."""
        if not requests:
            raise ModelInputError("forward_blocks needs at least one block")
        shapes = {tuple(r.latents.shape) for r in requests}
        if len(shapes) != 1:
            raise ModelInputError(f"batched blocks must share one shape, got {sorted(shapes)}")
        if requests[0].latents.dim() != 5 or requests[0].latents.shape[0] != 1:
            raise ModelInputError(f"each batched block must be [1, 16, F, h, w], got {tuple(requests[0].latents.shape)}")
        if len({id(r.cache) for r in requests}) != len(requests):
            raise ModelInputError("two blocks of one batch share a KV cache")
        latents = torch.cat([r.latents for r in requests])
        self._check_latents(latents, "block latents")
        f = latents.shape[2]
        steps = []
        for r in requests:
            t = r.timestep.to(self.device, torch.float32)
            steps.append(t[:, None].expand(1, f) if t.dim() == 1 else t)
        if any(t.shape != (1, f) for t in steps):
            raise ModelInputError(f"each timestep must be [1] or [1, {f}], got {[tuple(r.timestep.shape) for r in requests]}")
        glo = [r.audio.global_ for r in requests]
        audio = AudioTokens(local=torch.cat([r.audio.local for r in requests]),
                            global_=None if glo[0] is None else torch.cat(glo))
        texts = [r.text for r in requests]
        ctx = torch.cat(texts) if len({tuple(t.shape) for t in texts}) == 1 else texts
        return self._forward_cached(latents, torch.cat(steps), audio, ctx,
                                    [(r.cache, r.block_index, r.sink_index, r.write) for r in requests])

    def _forward_cached(self, latents: torch.Tensor, timestep: torch.Tensor, audio: AudioTokens,
                        ctx: "torch.Tensor | Sequence[torch.Tensor]",
                        slots: Sequence[Tuple[KVCache, int, int, bool]]) -> torch.Tensor:
        """The cached streaming forward. `slots`: (cache, block_index, sink_index, write), one for the whole batch
        (a cache of that batch size) or one per batch row (caches of batch 1)."""
        for cache, block_index, _, _ in slots:
            cache.check_block(block_index)
        b, _, f, lh, lw = latents.shape
        x, grid = self._embed_noisy(latents)
        gh, gw = grid[1], grid[2]
        for cache, _, _, _ in slots:
            if gh * gw * f != cache.block_tokens:
                raise ModelInputError(f"block has {gh * gw * f} tokens; this cache was sized for {cache.block_tokens}")
        t = timestep.to(self.device, torch.float32)
        if t.dim() == 1:
            t = t[:, None].expand(b, f)
        if t.shape != (b, f):
            raise ModelInputError(f"timestep must be [B] or [B, F]=[{b}, {f}], got {tuple(timestep.shape)}")
        e, e0 = self._time_modulation(t)
        frame_tokens = gh * gw
        e_tok = e.repeat_interleave(frame_tokens, dim=1)
        e0_tok = e0.repeat_interleave(frame_tokens, dim=1)
        parts = []
        for cache, block_index, sink_index, write in slots:
            freqs = self.rope.freqs([noisy_grid(block_index * f, f, gh, gw)], x.device)
            cond_freqs = self.rope.freqs(self.sink_grids(lh, lw, sink_index), x.device)
            if cond_freqs.shape[0] != cache.cond_len:
                raise CacheError(f"sink rotary covers {cond_freqs.shape[0]} tokens, cache holds {cache.cond_len}")
            parts.append(TokenLayout(freqs=freqs, noisy_tokens=x.shape[1], frame_tokens=frame_tokens,
                                     cache=CacheContext(cache=cache, block_index=block_index, write=write,
                                                        cond_freqs=cond_freqs)))
        layout = parts[0] if len(parts) == 1 else BatchLayout(parts)
        n = x.shape[1]
        for i, block in enumerate(self.blocks):
            x = block(x, e0_tok, ctx, layout)
            x = self._inject_audio(i, x, audio, n, f)
        for cache, block_index, _, write in slots:
            if write:
                cache.mark_block_written(block_index)
        out = self.head(x, e_tok)
        return self._unpatchify(out, grid)

    # ----- dense block-causal forward (training, and the reference for the cached path) ------------------------
    def block_causal_mask(self, num_blocks: int, block_tokens: int, sink_tokens: int, window_blocks: Optional[int],
                          device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean mask [S, S] over [noisy blocks..., sink tokens]: block i sees blocks (i-W, i] and the sink;
        sink tokens see only the sink."""
        n = num_blocks * block_tokens
        s = n + sink_tokens
        blk = torch.arange(n, device=device) // block_tokens
        mask = torch.zeros(s, s, dtype=torch.bool, device=device)
        diff = blk[:, None] - blk[None, :]
        allowed = diff >= 0
        if window_blocks is not None:
            allowed &= diff < window_blocks
        mask[:n, :n] = allowed
        mask[:, n:] = True
        mask[n:, :n] = False
        return mask

    def forward_masked(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        audio_features: torch.Tensor,
        context: torch.Tensor,
        sink: SinkInputs,
        frames_per_block: int,
        window_blocks: Optional[int] = None,
        first_block_index: int = 0,
        sink_index: int = 30,
    ) -> torch.Tensor:
        """Many blocks in one forward with a block-causal (optionally windowed) mask.

        latents [B,16,N*F,h,w]; timesteps [B, N*F] per latent frame; audio_features [B, L, C_a, N*4F];
        returns velocities [B,16,N*F,h,w]. Equals streaming the blocks one by one through `forward_block`
        with a KV cache (with the sink at a fixed `sink_index`), see tests/model/test_causal_equivalence.py.
        Differentiable: this is the diffusion-forcing training forward.
        """
        self._check_latents(latents, "latents")
        b, _, total_f, lh, lw = latents.shape
        if total_f % frames_per_block:
            raise ModelInputError(f"{total_f} latent frames is not a whole number of {frames_per_block}-frame blocks")
        nb = total_f // frames_per_block
        x, grid = self._embed_noisy(latents)
        gh, gw = grid[1], grid[2]
        frame_tokens = gh * gw
        n = x.shape[1]
        sink_x = self._embed_sink(sink)
        xs = torch.cat([x, sink_x], dim=1)
        e, e0 = self._time_modulation(timesteps.to(self.device, torch.float32))
        e0_tok = torch.cat([e0.repeat_interleave(frame_tokens, dim=1),
                            self._zero_time_modulation(b).expand(-1, sink_x.shape[1], -1, -1)], dim=1)
        ctx = self.embed_text(context)
        per_block_audio = []
        a_per_block = audio_features.shape[-1] // nb
        for i in range(nb):
            per_block_audio.append(self.encode_audio(audio_features[..., i * a_per_block:(i + 1) * a_per_block],
                                                     frames_per_block))
        audio = AudioTokens(
            local=torch.cat([a.local for a in per_block_audio], dim=1),
            global_=None if per_block_audio[0].global_ is None else torch.cat([a.global_ for a in per_block_audio], dim=1))
        freqs = self.rope.freqs([noisy_grid(first_block_index * frames_per_block, total_f, gh, gw)]
                                + self.sink_grids(lh, lw, sink_index), x.device)
        mask = self.block_causal_mask(nb, frames_per_block * frame_tokens, sink_x.shape[1], window_blocks, x.device)
        layout = TokenLayout(freqs=freqs, noisy_tokens=n, frame_tokens=frame_tokens, mask=mask)
        for i, block in enumerate(self.blocks):
            xs = block(xs, e0_tok, ctx, layout)
            xs = self._inject_audio(i, xs, audio, n, total_f)
        out = self.head(xs[:, :n], e.repeat_interleave(frame_tokens, dim=1))
        return self._unpatchify(out, grid)
