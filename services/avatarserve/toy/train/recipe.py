"""The training recipe of the embedded `toy` model: every size, step count, learning rate and seed.

`FULL` is what produced the shipped weights (services/avatarserve/weights/toy); `SMOKE` runs a few optimisation
steps of every stage on a handful of short clips, for CI. A recipe is plain frozen data, saved next to the
weights (`train_recipe.json`), so a checkpoint records exactly how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple


@dataclass(frozen=True)
class DataRecipe:
    num_clips: int = 240  # training people (seeds first_seed .. first_seed + num_clips - 1, all < 10**6)
    clip_seconds: float = 5.76  # 144 frames = 36 latent frames = 12 blocks
    first_seed: int = 0
    size: int = 64
    dit_clips: int = 192  # the DiT trains on the first this-many clips (the VAE on all of them)
    psnr_clips: int = 4  # held-out clips the VAE's reconstruction PSNR is reported on
    psnr_seconds: float = 3.84


@dataclass(frozen=True)
class VaeRecipe:
    """A tiny AutoencoderKLWan (same classes as Wan2.1's VAE: 16 latent channels, strides 4 x 8 x 8)."""

    base_dim: int = 24
    decoder_base_dim: int = 16
    dim_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 1
    # Phase A: single frames (from the per-frame inflated init, see toy/train/vae.py: cheap, learns the spatial
    # code every frame uses). Phase B: steady state of a stream. The causal convs' caches chain many frames of
    # history, so clips of `steady_latents` latents run their first latents under no_grad (burn-in of the
    # encoder and decoder caches) and train on the last `steady_grad_latents` (truncated backprop in time); this
    # learns the temporal taps. Each phase has its own cosine learning-rate decay.
    image_steps: int = 3000
    image_batch: int = 12
    lr: float = 2e-3
    warmup_steps: int = 100
    kl_weight: float = 1e-4  # on the mean latent's magnitude
    steady_steps: int = 200
    steady_batch: int = 4
    steady_latents: int = 6
    steady_grad_latents: int = 2
    steady_lr: float = 5e-4
    # Phases A and B add a low-frequency colour term (L1 of 8x8-pooled frames: background, skin, hair colours).
    # Phase C (after the DiT's latents are encoded): decoder-only refinement on the stream's steady state with
    # the same colour term. The encoder is frozen, so the latent space the DiT learns is unchanged.
    decoder_steps: int = 200
    decoder_batch: int = 4
    decoder_lr: float = 5e-4
    colour_weight: float = 1.0
    seed: int = 1


@dataclass(frozen=True)
class Stage1Recipe:
    """Diffusion forcing: block-causal windowed attention, an independent noise level per block."""

    steps: int = 3200
    batch: int = 8
    blocks: int = 6  # blocks per training window (> window_blocks, so the window limit is exercised)
    lr: float = 4e-4
    warmup: int = 100
    weight_decay: float = 0.0
    ema: float = 0.998
    audio_dropout: float = 0.1  # zeroed audio features: the "no audio" condition for guidance
    sink_swap_prob: float = 0.3  # use a latent of the clip itself as the reference (what AAS feeds at run time)
    prompt_prob: float = 0.5  # a random prompt instead of the empty one (the toy world has no text)
    stream_start_prob: float = 0.25  # window placed at the start of a stream (RoPE frame 0)
    max_first_block: int = 1500  # otherwise a random RoPE position up to this block (~12 min)
    seed: int = 2


@dataclass(frozen=True)
class Stage2Recipe:
    """Few-step distillation into the 4-step timestep-forcing student (see toy/train/dit.py)."""

    # "none": ship the stage-1 model as the 4-step student (what the shipped weights use: on held-out clips it
    # beat both distilled students after the 200 steps affordable here, see the report in dit.py);
    # "dmd": Self-Forcing DMD with a fake score; "tf": regression of the timestep-forcing rollout to the data.
    method: str = "none"
    steps: int = 200
    batch: int = 4
    blocks: int = 6
    lr: float = 1e-4
    lr_fake: float = 2e-4
    fake_updates: int = 2  # fake-score updates per student update (DMD2's two time-scale rule)
    guidance: float = 2.0  # audio guidance of the real score (1 = none)
    dmd_sigma_range: Tuple[float, float] = (0.02, 0.98)
    regression_weight: float = 0.0  # optional data term in DMD
    seed: int = 3


@dataclass(frozen=True)
class TrainRecipe:
    data: DataRecipe = field(default_factory=DataRecipe)
    vae: VaeRecipe = field(default_factory=VaeRecipe)
    stage1: Stage1Recipe = field(default_factory=Stage1Recipe)
    stage2: Stage2Recipe = field(default_factory=Stage2Recipe)
    threads: int = 2
    log_every: int = 25
    checkpoint_every: int = 250

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace_stage2(self, **changes: Any) -> "TrainRecipe":
        return dataclasses.replace(self, stage2=dataclasses.replace(self.stage2, **changes))


FULL = TrainRecipe()

SMOKE = TrainRecipe(
    data=DataRecipe(num_clips=3, clip_seconds=1.92, psnr_clips=1, psnr_seconds=0.48),
    vae=VaeRecipe(base_dim=8, decoder_base_dim=8, image_steps=2, image_batch=2, steady_steps=2, steady_batch=1, steady_latents=3, decoder_steps=2,
                  decoder_batch=1),
    stage1=Stage1Recipe(steps=3, batch=2, blocks=2, warmup=1),
    stage2=Stage2Recipe(method="dmd", steps=2, batch=1, blocks=2, fake_updates=1),
    log_every=1,
    checkpoint_every=2,
)
