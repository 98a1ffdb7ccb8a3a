"""Typed KV cache for one session at one denoising step (timestep forcing).

Per transformer layer:
- a preallocated ring of `window_blocks` blocks of noisy-token K/V. Keys are stored *after* RoPE at their
  absolute positions; block n lives in slot n % window_blocks, so memory is constant for endless streams;
- a separate cond (sink) cache holding the reference + motion tokens' K/V *without* RoPE, so rolling RoPE can
  re-rotate the sink keys on every forward.

Timestep forcing: a pipeline stage owns one `KVCache` per session and writes the K/V of *its own* noisy input
(at its own timestep) into it. There is no clean re-forward.

Modes: `write` (the normal streaming step: store this block, then attend) and `read_only` (attend as if the
block were stored, but leave the cache untouched: used to recompute a step without side effects).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch


class CacheError(RuntimeError):
    """Misuse of a KV cache (wrong block order, no sink prefilled, shape mismatch)."""


@dataclass
class LayerKV:
    k: torch.Tensor  # [B, window_tokens, H, D]  (roped)
    v: torch.Tensor  # [B, window_tokens, H, D]
    cond_k: torch.Tensor  # [B, cond_tokens, H, D] (not roped)
    cond_v: torch.Tensor  # [B, cond_tokens, H, D]


class KVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        block_tokens: int,
        window_blocks: int,
        cond_tokens: int,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if window_blocks < 1 or block_tokens < 1:
            raise CacheError("window_blocks and block_tokens must be >= 1")
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.block_tokens = block_tokens
        self.window_blocks = window_blocks
        self.cond_tokens = cond_tokens
        self.batch_size = batch_size
        shape = (batch_size, block_tokens * window_blocks, num_heads, head_dim)
        cond_shape = (batch_size, cond_tokens, num_heads, head_dim)
        self.layers: List[LayerKV] = [
            LayerKV(
                k=torch.zeros(shape, dtype=dtype, device=device),
                v=torch.zeros(shape, dtype=dtype, device=device),
                cond_k=torch.zeros(cond_shape, dtype=dtype, device=device),
                cond_v=torch.zeros(cond_shape, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]
        self.cond_len = 0  # valid sink tokens (0 until the sink prefill)
        self.blocks_written = 0  # highest block index written + 1
        self.first_block = 0  # the first block this cache holds (> 0 for a session resumed mid-stream)
        self.sink_version = -1  # which sink (reference / AAS) the cond cache holds

    # ----- geometry -------------------------------------------------------------------------------------------
    @property
    def window_tokens(self) -> int:
        return self.block_tokens * self.window_blocks

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.k, layer.v, layer.cond_k, layer.cond_v))

    @staticmethod
    def bytes_for(*, num_layers: int, num_heads: int, head_dim: int, block_tokens: int, window_blocks: int,
                  cond_tokens: int, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        per_token = 2 * num_heads * head_dim * elem * batch_size
        return num_layers * per_token * (block_tokens * window_blocks + cond_tokens)

    def slot(self, block_index: int) -> slice:
        s = (block_index % self.window_blocks) * self.block_tokens
        return slice(s, s + self.block_tokens)

    def start_at(self, block_index: int) -> None:
        """Start an empty window at `block_index` (a session rebuilt mid-stream): blocks before it are not held, and
        attention covers only the blocks written since."""
        if block_index < 0:
            raise CacheError(f"block index {block_index} is negative")
        if self.blocks_written > self.first_block:
            raise CacheError("start_at needs an empty window (reset the cache first)")
        self.first_block = self.blocks_written = block_index

    def _valid_slots(self, block_index: int) -> List[int]:
        """Ring slots of the blocks in the window that ends with `block_index` (that block included)."""
        first = max(self.first_block, block_index - self.window_blocks + 1)
        return [b % self.window_blocks for b in range(first, block_index + 1)]

    def check_block(self, block_index: int) -> None:
        if self.cond_len == 0:
            raise CacheError("the sink (cond) cache is empty: prefill the sink before streaming blocks")
        if block_index < 0:
            raise CacheError(f"block index {block_index} is negative")
        if block_index < self.first_block:
            raise CacheError(f"block {block_index} is before the first block this cache holds ({self.first_block})")
        if block_index > self.blocks_written:
            raise CacheError(
                f"block {block_index} skips ahead: this cache has written blocks up to {self.blocks_written - 1}")

    # ----- per-layer operations (called by the attention module) ----------------------------------------------
    def write_cond(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[1]
        if n > self.cond_tokens:
            raise CacheError(f"sink has {n} tokens but the cond cache holds {self.cond_tokens}")
        lk = self.layers[layer]
        lk.cond_k[:, :n].copy_(k)
        lk.cond_v[:, :n].copy_(v)

    def cond(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        lk = self.layers[layer]
        return lk.cond_k[:, : self.cond_len], lk.cond_v[:, : self.cond_len]

    def window_kv(self, layer: int, block_index: int, k: torch.Tensor, v: torch.Tensor, write: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the window ending with `block_index` (whose roped k, v are given).

        Attention is order-free over keys, so the ring is returned in slot order.
        """
        lk = self.layers[layer]
        sl = self.slot(block_index)
        bt = self.block_tokens
        if self.first_block == 0 or block_index - self.first_block + 1 >= self.window_blocks:
            # The window holds slots 0..valid-1 (a stream from block 0, or a full ring): contiguous views.
            valid = list(range(min(block_index + 1, self.window_blocks)))
        else:
            valid = self._valid_slots(block_index)
        contiguous = valid == list(range(len(valid)))
        if write:
            lk.k[:, sl].copy_(k)
            lk.v[:, sl].copy_(v)
            if contiguous:
                n = len(valid) * bt
                return lk.k[:, :n], lk.v[:, :n]
            return (torch.cat([lk.k[:, i * bt:(i + 1) * bt] for i in valid], dim=1),
                    torch.cat([lk.v[:, i * bt:(i + 1) * bt] for i in valid], dim=1))
        # read-only: the stored blocks of the window except the slot this block would overwrite, plus this block.
        keep = [i for i in valid if i != block_index % self.window_blocks]
        ks = [lk.k[:, i * bt:(i + 1) * bt] for i in keep] + [k]
        vs = [lk.v[:, i * bt:(i + 1) * bt] for i in keep] + [v]
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)

    def mark_block_written(self, block_index: int) -> None:
        self.blocks_written = max(self.blocks_written, block_index + 1)

    def reset(self) -> None:
        for layer in self.layers:
            for t in (layer.k, layer.v, layer.cond_k, layer.cond_v):
                t.zero_()
        self.cond_len = 0
        self.blocks_written = 0
        self.first_block = 0
        self.sink_version = -1


@dataclass
class CacheContext:
    """What one forward does with a cache: which block, and whether it persists K/V."""

    cache: KVCache
    block_index: int
    write: bool = True
    sink_prefill: bool = False
    cond_freqs: Optional[torch.Tensor] = None  # complex rotations for the sink keys in this forward
