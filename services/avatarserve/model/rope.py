"""3D rotary position embeddings for the causal S2V transformer.

Upstream precomputes a complex table of 45,000 temporal positions and indexes it (wrapping, or failing, after
~2 h of 6.25 latent frames per second). We compute the rotation angles directly from integer positions in
float64 instead, so a noisy token's position is exact for any stream length: angle = position * inv_freq has a
relative error of ~1e-16, i.e. below 1e-9 rad even after a year of streaming. Positions therefore never wrap.
This matters because attention only sees *relative* positions inside the KV window and between the window
and the sink; a wrap would put a jump into the window once every two hours.

Token grids follow upstream exactly:
- noisy block: temporal positions [f0, f0 + F), spatial grid (h, w) of patch tokens;
- reference (sink): temporal position `sink_index` (30 at prefill; rolled forward by rolling RoPE);
- FramePack motion tokens: fixed negative temporal positions (-1; -3; -19, -14, -9, -4 for buckets (1, 2, 16))
  and a spatial grid compressed by 2x / 4x that samples positions of the full grid like numpy.linspace(...).astype(int).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch


def _inv_freqs(axis_dim: int, theta: float) -> torch.Tensor:
    # Matches rope_params(): 1 / theta^(2i / axis_dim) for i < axis_dim / 2, in float64.
    # Explicit CPU device: models are often built under `with torch.device("meta")`.
    return 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64, device="cpu") / axis_dim)


@dataclass(frozen=True)
class TokenGrid:
    """Positions of a run of tokens laid out (t, h, w) in row-major order."""

    t: Tuple[int, ...]
    h: Tuple[int, ...]
    w: Tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.t) * len(self.h) * len(self.w)


def _linspace_int(start: int, stop: int, num: int) -> Tuple[int, ...]:
    return tuple(int(v) for v in np.linspace(start, stop, num).astype(int).tolist())


def noisy_grid(frame_start: int, num_frames: int, grid_h: int, grid_w: int) -> TokenGrid:
    return TokenGrid(tuple(range(frame_start, frame_start + num_frames)), tuple(range(grid_h)), tuple(range(grid_w)))


def reference_grid(sink_index: int, grid_h: int, grid_w: int) -> TokenGrid:
    return TokenGrid((sink_index,), tuple(range(grid_h)), tuple(range(grid_w)))


def motion_grids(buckets: Sequence[int], latent_h: int, latent_w: int) -> List[TokenGrid]:
    """Grids of the FramePack motion tokens, newest bucket first (post, 2x, 4x).

    Bucket i compresses buckets[i] latent frames by 2**i in every axis (kernel (1,2,2), (2,4,4), (4,8,8)
    on the latent), so it has buckets[i] // 2**i temporal and latent_h // 2**(i+1) spatial tokens. Its temporal
    positions are negative: the run starts at -(sum of buckets[:i+1]).
    """
    grids = []
    full_h, full_w = latent_h // 2, latent_w // 2
    for i, frames in enumerate(buckets):
        factor = 2 ** i
        seq_f = frames // factor
        seq_h, seq_w = latent_h // (2 * factor), latent_w // (2 * factor)
        start = sum(buckets[: i + 1])
        # upstream: linspace(-f_o, -t_f - f_o + 1, seq_f) on magnitudes, then conjugated (negative angles)
        t = tuple(-v for v in _linspace_int(start, start - frames + 1, seq_f))
        h = _linspace_int(0, full_h - 1, seq_h)
        w = _linspace_int(0, full_w - 1, seq_w)
        grids.append(TokenGrid(t, h, w))
    return grids


class RotaryEmbedding:
    """Computes complex rotations [S, head_dim / 2] for token grids; stateless and cheap to keep per model."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        if head_dim % 2:
            raise ValueError("head_dim must be even")
        self.head_dim = head_dim
        d = head_dim
        self.axis_dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
        self.inv = [_inv_freqs(a, theta) for a in self.axis_dims]

    def angles(self, grids: Sequence[TokenGrid]) -> torch.Tensor:
        """float64 angles [S, head_dim / 2] for the concatenation of `grids`."""
        parts = []
        for g in grids:
            if g.num_tokens == 0:
                continue
            t = torch.tensor(g.t, dtype=torch.float64, device="cpu")[:, None] * self.inv[0]
            h = torch.tensor(g.h, dtype=torch.float64, device="cpu")[:, None] * self.inv[1]
            w = torch.tensor(g.w, dtype=torch.float64, device="cpu")[:, None] * self.inv[2]
            nt, nh, nw = len(g.t), len(g.h), len(g.w)
            full = torch.cat(
                [
                    t[:, None, None, :].expand(nt, nh, nw, -1),
                    h[None, :, None, :].expand(nt, nh, nw, -1),
                    w[None, None, :, :].expand(nt, nh, nw, -1),
                ],
                dim=-1,
            )
            parts.append(full.reshape(nt * nh * nw, -1))
        if not parts:
            return torch.zeros(0, self.head_dim // 2, dtype=torch.float64, device="cpu")
        return torch.cat(parts, dim=0)

    def freqs(self, grids: Sequence[TokenGrid], device: torch.device | str = "cpu") -> torch.Tensor:
        """Unit complex rotations (complex128) [S, head_dim / 2]."""
        a = self.angles(grids)
        return torch.polar(torch.ones_like(a), a).to(device)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, S, H, D] by freqs [S, D/2] (complex); returns x's dtype.

    Computed in float64 like upstream's rope_apply, then cast back.
    """
    b, s, n, d = x.shape
    if freqs.shape != (s, d // 2):
        raise ValueError(f"rotary freqs {tuple(freqs.shape)} do not match tokens/head_dim ({s}, {d // 2})")
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, s, n, d // 2, 2))
    out = torch.view_as_real(xc * freqs[None, :, None, :]).reshape(b, s, n, d)
    return out.to(x.dtype)


def sink_temporal_index(base: int, frame_start: int, distance: int) -> int:
    """Rolling RoPE for the sink: base + max(0, f - (base - d)).

    With base 30: the sink stays at 30 until the block's first latent frame f reaches 30 - d, then moves so
    that it is always d frames *ahead* of the current block.
    """
    return base + max(0, frame_start - (base - distance))
