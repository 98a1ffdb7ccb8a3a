"""Per-session sink state: what every stage needs to (re)build its cond cache, plus RSFM positions.

`SinkState` is plain data (tensors + ints) so the serving layer can store it in Redis and ship it to a
replacement replica. It is created once per session from the reference image by the VAE side
(`prepare_sink`), and updated once by the Adaptive Attention Sink (AAS): after the first clip the reference
latent is replaced by the first latent frame the model generated (a latent-space swap, no VAE round trip).
Motion tokens keep the reference image (as upstream does in TPP mode).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..model.config import StreamConfig
from ..model.rope import sink_temporal_index
from .errors import InvalidInput

MAX_IMAGE_PIXELS = 40_000_000
MIN_IMAGE_SIDE = 32  # smaller cannot show a face the model could animate


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (session seed, block, step...), stable across processes and platforms."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(struct.pack("<q", int(p)))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def block_noise(seed: int, block_index: int, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The initial N(0, I) latent of a block: a pure function of (session seed, block index)."""
    g = torch.Generator().manual_seed(derive_seed(seed, block_index, 0x6E6F))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(dtype)


@dataclass
class SinkState:
    reference: torch.Tensor  # [1, 16, 1, h, w] model-space latent of the reference image
    motion: torch.Tensor  # [1, 16, T_m, h, w] latents of `motion_frames` copies of the reference image
    text: torch.Tensor  # [1, L, text_dim] prompt embeddings (real tokens)
    seed: int
    aas_latent: Optional[torch.Tensor] = None  # [1, 16, 1, h, w] once the first block has been generated

    def reference_for_block(self, block_index: int, stream: StreamConfig) -> tuple[torch.Tensor, int]:
        """(reference latent, sink version) in force for `block_index`.

        Version 0 is the reference image; version 1 the AAS latent, in force from block `aas_after_blocks` on.
        """
        if stream.adaptive_sink and block_index >= stream.aas_after_blocks:
            if self.aas_latent is None:
                from .errors import SinkNotReady

                raise SinkNotReady(f"block {block_index} needs the adaptive-sink latent, which has not arrived")
            return self.aas_latent, 1
        return self.reference, 0

    def sink_distance(self, block_index: int, step: int, stream: StreamConfig) -> int:
        """Rolling-RoPE distance d for one forward: upstream draws randint(4, 30) per forward; we draw it from a
        generator seeded by (session seed, block, step) so every replica and the sequential pipeline agree."""
        lo, hi = stream.sink_distance_range
        if lo == hi:
            return lo
        rng = np.random.default_rng(derive_seed(self.seed, block_index, step, 0x5D))
        return int(rng.integers(lo, hi + 1))

    def sink_index(self, block_index: int, step: int, stream: StreamConfig) -> int:
        if not stream.rolling_rope:
            return stream.sink_base_index
        frame_start = block_index * stream.latent_frames_per_block
        return sink_temporal_index(stream.sink_base_index, frame_start, self.sink_distance(block_index, step, stream))


def load_image(data: bytes | str | Image.Image | np.ndarray) -> Image.Image:
    """Decode a reference image (PNG/JPEG bytes, a path, a PIL image or an HxWx3 uint8 array) to RGB."""
    try:
        if isinstance(data, Image.Image):
            img = data
        elif isinstance(data, np.ndarray):
            if data.ndim != 3 or data.shape[2] != 3 or data.dtype != np.uint8:
                raise InvalidInput(f"image array must be HxWx3 uint8, got {data.shape} {data.dtype}")
            img = Image.fromarray(data)
        elif isinstance(data, (bytes, bytearray)):
            import io

            if not data:
                raise InvalidInput("reference image is empty")
            img = Image.open(io.BytesIO(data))
            if img.format not in ("PNG", "JPEG"):
                raise InvalidInput(f"reference image must be PNG or JPEG, got {img.format}")
        else:
            img = Image.open(data)
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise InvalidInput(f"reference image is {img.width}x{img.height}, over {MAX_IMAGE_PIXELS} pixels")
        if min(img.width, img.height) < MIN_IMAGE_SIDE:
            raise InvalidInput(f"reference image is {img.width}x{img.height}; each side must be at least "
                               f"{MIN_IMAGE_SIDE} pixels")
        img.load()
        return img.convert("RGB")
    except InvalidInput:
        raise
    except Exception as exc:  # PIL raises many types for corrupt data
        from PIL import UnidentifiedImageError

        why = "not a PNG or JPEG image" if isinstance(exc, UnidentifiedImageError) else f"{type(exc).__name__}: {exc}"
        raise InvalidInput(f"cannot decode reference image: {why}") from exc


def image_to_tensor(img: Image.Image, height: int, width: int) -> torch.Tensor:
    """Resize to cover (height, width) keeping the aspect ratio, center-crop, map to [-1, 1]: [1, 3, H, W]."""
    scale = max(height / img.height, width / img.width)
    rw, rh = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((rw, rh), Image.BICUBIC)
    left, top = (rw - width) // 2, (rh - height) // 2
    img = img.crop((left, top, left + width, top + height))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return (arr.permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0).clamp(-1, 1)


@torch.no_grad()
def prepare_sink(vae, image, text: torch.Tensor, seed: int, stream: StreamConfig, motion_frames: int) -> SinkState:
    """Encode the reference image (and `motion_frames` copies of it) into a SinkState."""
    pixels = image_to_tensor(load_image(image), stream.height, stream.width)
    reference = vae.encode_image(pixels)
    motion = vae.encode_video(pixels.unsqueeze(2).expand(-1, -1, motion_frames, -1, -1).contiguous())
    if text.dim() == 2:
        text = text.unsqueeze(0)
    return SinkState(reference=reference.float(), motion=motion.float(), text=text.float(), seed=int(seed))


def synthetic_sink(in_dim: int, motion_latent_frames: int, text_dim: int, stream: StreamConfig, *,
                   text_tokens: int = 32, seed: int = 0) -> SinkState:
    """A sink of the right shapes with random contents: a stage times its forward on sessions made from it before
    real ones arrive (serving: measured capacity). Never shown to anyone."""
    g = torch.Generator().manual_seed(seed)
    h, w = stream.latent_height, stream.latent_width
    return SinkState(reference=0.5 * torch.randn(1, in_dim, 1, h, w, generator=g),
                     motion=0.5 * torch.randn(1, in_dim, motion_latent_frames, h, w, generator=g),
                     text=0.1 * torch.randn(1, text_tokens, text_dim, generator=g), seed=seed,
                     aas_latent=0.5 * torch.randn(1, in_dim, 1, h, w, generator=g))  # blocks past aas_after_blocks run
