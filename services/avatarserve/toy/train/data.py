"""Training data of the toy model: toy-world clips on disk, then model-space tensors for the DiT.

`ensure_clips` writes (once) a `toy.dataset` of training seeds. `encode_dataset` turns it into `DitData`:
per clip the VAE latents of its frames, the log-mel features of its audio, the reference latent and the
FramePack motion latents, all computed exactly the way the inference pipeline computes them:

- the clip's frames are encoded as the continuation of the 73 reference copies whose latents are the sink's
  motion latents (as `engine.sink.prepare_sink` computes them); the streaming decoder is warmed on the first 7
  of them (`DecoderRunner`) before block 0, so latent l of a clip decodes to frames 4l .. 4l + 3, as a
  generated block's latents do;
- audio features come from the same `LogMelFrontEnd` (whole file == streaming, bit for bit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ...model.logmel import LogMelFrontEnd
from ...model.rope import sink_temporal_index
from ...model.vae import StreamingVAE
from ..dataset import MANIFEST, ToyDataset, write_dataset
from .errors import TrainingError
from .recipe import DataRecipe

TEXT_PROMPTS = (
    "a cartoon person talking", "a friendly face speaking to the camera", "someone explains something",
    "a talking head", "portrait, speaking, plain background", "a smiling person telling a story",
    "news presenter", "close-up of a face", "animated character says hello", "calm voice, small nods",
    "an avatar answering a question", "a person reading aloud", "talking, blinking", "video call",
    "cartoon", "speaker",
)


def ensure_clips(root: Path, recipe: DataRecipe, workers: int = 1) -> ToyDataset:
    """The training clips under `root` (written if absent; an existing dataset must match the recipe)."""
    if (root / MANIFEST).exists():
        ds = ToyDataset(root, verify=False)
        m = ds.manifest
        if (m["num_clips"], m["first_seed"], float(m["seconds"]), m["size"]) != (
                recipe.num_clips, recipe.first_seed, float(recipe.clip_seconds), recipe.size):
            raise TrainingError(f"{root} holds a different dataset than the recipe asks for; use another --work-dir")
        return ds
    write_dataset(root, recipe.num_clips, recipe.clip_seconds, recipe.first_seed, size=recipe.size, workers=workers)
    return ToyDataset(root, verify=False)


def frames_to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [1, 3, T, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1.0)
    return x.permute(3, 0, 1, 2).unsqueeze(0)


@dataclass
class DitData:
    """Model-space tensors of all training clips (float32, CPU)."""

    latents: torch.Tensor  # [N, 16, T_lat, h, w]
    audio: torch.Tensor  # [N, 1, C_a, 4 * T_lat]
    reference: torch.Tensor  # [N, 16, 1, h, w]
    motion: torch.Tensor  # [N, 16, 19, h, w]
    texts: torch.Tensor  # [P, text_len, text_dim] zero-padded prompt embeddings; row 0 = the empty prompt

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save({k: getattr(self, k) for k in ("latents", "audio", "reference", "motion", "texts")}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "DitData":
        return cls(**torch.load(path, map_location="cpu", weights_only=True))

    @property
    def num_clips(self) -> int:
        return int(self.latents.shape[0])

    @property
    def latent_frames(self) -> int:
        return int(self.latents.shape[2])


@torch.no_grad()
def encode_clips(vae: StreamingVAE, frames: np.ndarray, reference_images: np.ndarray,
                 motion_frames: int = 73) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clips uint8 [B, T, H, W, 3] (T % 4 == 0) with their references [B, H, W, 3] ->
    (reference latents [B,16,1,h,w], motion latents [B,16,(motion_frames+3)//4,h,w], clip latents [B,16,T/4,h,w]).

    One causal encode of `motion_frames` copies of the reference followed by the clip: its first latents are
    exactly `prepare_sink`'s (latent 0 = the reference image alone = `encode_image`; latents 0..18 = the 73
    copies), and the clip's latents follow as a continuation of the reference (see the module doc). Batched,
    because PyTorch's CPU conv3d is several times faster per sample with a batch than without.
    """
    b, t = frames.shape[:2]
    if t % 4 or (motion_frames - 1) % 4:
        raise TrainingError(f"need clip frames % 4 == 0 and motion_frames = 1 + 4k, got {t}, {motion_frames}")
    ref = np.repeat(reference_images[:, None], motion_frames, axis=1)
    video = torch.cat([frames_to_pixels(v) for v in np.concatenate([ref, frames], axis=1)])
    lat = vae.encode_video(video)
    m = 1 + (motion_frames - 1) // 4
    return lat[:, :, :1], lat[:, :, :m], lat[:, :, m:]


@torch.no_grad()
def prompt_bank(text_encoder, text_len: int, text_dim: int) -> torch.Tensor:
    rows = []
    for prompt in ("",) + TEXT_PROMPTS:
        emb = text_encoder.encode(prompt).float()[:text_len]
        rows.append(torch.cat([emb, emb.new_zeros(text_len - emb.shape[0], text_dim)]))
    return torch.stack(rows)


@torch.no_grad()
def encode_dataset(ds: ToyDataset, vae: StreamingVAE, frontend: LogMelFrontEnd, text_encoder,
                   motion_frames: int, text_len: int, text_dim: int, batch: int = 8, limit: Optional[int] = None,
                   log=print) -> DitData:
    lats: List[torch.Tensor] = []
    auds: List[torch.Tensor] = []
    refs: List[torch.Tensor] = []
    mots: List[torch.Tensor] = []
    n = len(ds) if limit is None else min(limit, len(ds))
    for i in range(0, n, batch):
        clips = [ds[j] for j in range(i, min(i + batch, n))]
        ref, mot, lat = encode_clips(vae, np.stack([c.frames for c in clips]),
                                     np.stack([c.reference_image for c in clips]), motion_frames)
        refs.append(ref)
        mots.append(mot)
        lats.append(lat)
        auds.extend(frontend.whole_file(c.audio, c.num_frames) for c in clips)
        log(f"encoded {i + len(clips)}/{n} clips")
    return DitData(latents=torch.cat(lats), audio=torch.stack(auds), reference=torch.cat(refs),
                   motion=torch.cat(mots), texts=prompt_bank(text_encoder, text_len, text_dim))


@dataclass
class Batch:
    x0: torch.Tensor  # [B, 16, N*F, h, w] clean latents of N consecutive blocks
    audio: torch.Tensor  # [B, 1, C_a, N*4F]
    reference: torch.Tensor  # [B, 16, 1, h, w]
    motion: torch.Tensor  # [B, 16, 19, h, w]
    text: torch.Tensor  # [B, text_len, text_dim]
    first_block: int  # RoPE block index of the window's first block
    sink_index: int  # RoPE temporal index of the reference (rolling RoPE, as at run time)


def sample_batch(data: DitData, g: torch.Generator, batch: int, blocks: int, frames_per_block: int,
                 sink_swap_prob: float, prompt_prob: float, stream_start_prob: float, max_first_block: int,
                 audio_dropout: float = 0.0, sink_base: int = 30, sink_distance=(4, 30)) -> Batch:
    """A random batch of block windows. The RoPE placement (first block, sink index) is shared by the batch
    because `forward_masked` takes one; it is drawn like the streaming path draws it (rolling RoPE with a
    random distance d, relative to the window's last block)."""
    f = frames_per_block
    n_lat = blocks * f
    if data.latent_frames < n_lat:
        raise TrainingError(f"clips have {data.latent_frames} latent frames; a window needs {n_lat}")
    clip = torch.randint(data.num_clips, (batch,), generator=g)
    max_start_block = data.latent_frames // f - blocks
    start = torch.randint(max_start_block + 1, (batch,), generator=g) * f
    x0 = torch.stack([data.latents[c, :, s:s + n_lat] for c, s in zip(clip.tolist(), start.tolist())])
    audio = torch.stack([data.audio[c, :, :, 4 * s:4 * (s + n_lat)] for c, s in zip(clip.tolist(), start.tolist())])
    if audio_dropout > 0:
        keep = (torch.rand(batch, generator=g) >= audio_dropout).float().view(-1, 1, 1, 1)
        audio = audio * keep
    reference = data.reference[clip].clone()
    swap = torch.rand(batch, generator=g) < sink_swap_prob
    for i in torch.nonzero(swap).flatten().tolist():
        t = int(torch.randint(data.latent_frames, (1,), generator=g))
        reference[i] = data.latents[clip[i], :, t:t + 1]
    motion = data.motion[clip]
    use_prompt = torch.rand(batch, generator=g) < prompt_prob
    pick = torch.where(use_prompt, torch.randint(1, data.texts.shape[0], (batch,), generator=g), torch.zeros(batch, dtype=torch.long))
    text = data.texts[pick]
    if float(torch.rand(1, generator=g)) < stream_start_prob:
        first = 0
    else:
        first = int(torch.randint(max_first_block + 1, (1,), generator=g))
    d = int(torch.randint(sink_distance[0], sink_distance[1] + 1, (1,), generator=g))
    sink_index = sink_temporal_index(sink_base, (first + blocks - 1) * f, d)  # relative to the last block
    return Batch(x0=x0, audio=audio, reference=reference, motion=motion, text=text, first_block=first,
                 sink_index=sink_index)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
