"""Stage 0: a tiny `AutoencoderKLWan` trained on the toy world's frames.

Same diffusers class and causal layout as Wan2.1's VAE (16 latent channels, temporal stride 4, spatial stride
8, causal first frame), at a width that decodes a 64x64 block in a small fraction of its 0.48 s on a CPU.
Initialised as a per-frame image autoencoder (`inflate_init`), trained on single frames, then on the steady
state of long clips (`VaeRecipe`), with mirrored and RGB-permuted inputs. Loss: L1 + MSE on pixels through
the posterior mean, L1 on 8x8-pooled colours, and a small penalty on the latents' magnitude (the mean term of
the KL). After training, the per-channel mean / std of the posterior means over the training clips become the config's
`latents_mean` / `latents_std`, so model-space latents (what the DiT sees) have unit scale per channel.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

from ...model.vae import StreamingVAE
from ..dataset import ToyDataset
from .data import encode_clips, frames_to_pixels
from .errors import TrainingError
from .recipe import VaeRecipe

Z_DIM = 16


def build_vae(recipe: VaeRecipe) -> AutoencoderKLWan:
    torch.manual_seed(recipe.seed)
    vae = AutoencoderKLWan(
        base_dim=recipe.base_dim, decoder_base_dim=recipe.decoder_base_dim, z_dim=Z_DIM,
        dim_mult=list(recipe.dim_mult), num_res_blocks=recipe.num_res_blocks, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM)
    inflate_init(vae)
    return vae


@torch.no_grad()
def inflate_init(vae: AutoencoderKLWan) -> None:
    """Start as a per-frame image autoencoder (I3D-style inflation): every causal 3x3x3 conv sees only the
    current frame (its two past taps are zero), the encoder's temporal downsampling keeps the newest frame and
    the decoder's temporal upsampling repeats each frame. Training on single frames first then trains exactly
    the path every frame uses, instead of leaving random past taps that only long clips ever exercise (which
    wrecks the steady state of a stream); the later phases then learn the temporal taps from zero."""
    for module in vae.modules():
        if isinstance(module, WanResample) and getattr(module, "time_conv", None) is not None:
            w = module.time_conv.weight  # [out, in, 3, 1, 1]
            w.zero_()
            module.time_conv.bias.zero_()
            c = w.shape[1]
            eye = torch.eye(c, dtype=w.dtype)
            for half in range(w.shape[0] // c):
                w[half * c:(half + 1) * c, :, -1, 0, 0] = eye
        elif isinstance(module, WanCausalConv3d) and module.kernel_size[0] > 1 and module.kernel_size[1] > 1:
            module.weight[:, :, :-1] = 0.0


@contextlib.contextmanager
def single_frame_convs() -> Iterator[None]:
    """Run causal 3x3x3 convs on a lone, uncached frame as the 2-D conv they reduce to.

    A lone first frame is padded with two zero frames in time, so only the newest temporal tap ever sees data:
    conv2d with that tap gives the same output and gradients (the zero taps get zero gradient either way) in a
    third of the work. Used for the single-frame phase of VAE training only; anything with a cache or more than
    one frame takes the normal path.
    """
    original = WanCausalConv3d.forward

    def forward(self: WanCausalConv3d, x: torch.Tensor, cache_x: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (x.shape[2] == 1 and cache_x is None and self.stride == (1, 1, 1)
                and self._padding[4] == self.kernel_size[0] - 1):
            return F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias,
                            padding=(self._padding[2], self._padding[0])).unsqueeze(2)
        return original(self, x, cache_x)

    WanCausalConv3d.forward = forward
    try:
        yield
    finally:
        WanCausalConv3d.forward = original


def load_frames(ds: ToyDataset) -> np.ndarray:
    """All training frames, uint8 [N, T, H, W, 3]."""
    return np.stack([clip.frames for clip in ds])


def _crop_batch(frames: np.ndarray, g: torch.Generator, batch: int, length: int) -> torch.Tensor:
    """Random clips of `length` frames, randomly mirrored and with their RGB channels randomly permuted.

    The permutation multiplies the colour combinations the VAE sees by six: with a few hundred people, an
    unaugmented VAE learns the palettes it saw and turns a held-out person's magenta background navy.
    """
    n, t = frames.shape[:2]
    clips = torch.randint(n, (batch,), generator=g).tolist()
    starts = torch.randint(t - length + 1, (batch,), generator=g).tolist()
    flips = (torch.rand(batch, generator=g) < 0.5).tolist()
    perms = [torch.randperm(3, generator=g).tolist() for _ in range(batch)]
    out = []
    for c, s, flip, perm in zip(clips, starts, flips, perms):
        x = frames[c, s:s + length][..., perm]
        out.append(frames_to_pixels(x[:, :, ::-1] if flip else x)[0])
    return torch.stack(out)


def train_vae(vae: AutoencoderKLWan, frames: np.ndarray, recipe: VaeRecipe, log: Callable[[str], None],
              checkpoint: Callable[[int, torch.optim.Optimizer], None], checkpoint_every: int, log_every: int, start_step: int = 0,
              optimizer_state: Optional[Dict] = None) -> torch.optim.Optimizer:
    if 4 * recipe.steady_latents - 3 > frames.shape[1] or recipe.steady_latents <= recipe.steady_grad_latents:
        raise TrainingError(f"steady-state clips of {recipe.steady_latents} latents ({recipe.steady_grad_latents} "
                            f"trained) do not fit clips of {frames.shape[1]} frames")
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.99))
    if optimizer_state:
        opt.load_state_dict(optimizer_state)
    total = recipe.image_steps + recipe.steady_steps
    t0 = time.time()
    run = []
    for step in range(start_step, total):
        g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)  # per step: resumes reproduce
        if step < recipe.image_steps:
            p = step / max(1, recipe.image_steps)
            # Warm-up: without it the wider VAEs stall on a flat grey output for hundreds of steps.
            warm = min(1.0, (step + 1) / max(1, recipe.warmup_steps))
            lr = recipe.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))
        else:
            p = (step - recipe.image_steps) / max(1, recipe.steady_steps)
            lr = recipe.steady_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        for group in opt.param_groups:
            group["lr"] = lr
        if step < recipe.image_steps:
            x = _crop_batch(frames, g, recipe.image_batch, 1)
            # Deterministic: the posterior mean is what StreamingVAE encodes with. (Sampling with the freshly
            # initialised unit variance drowns the latent in noise and stalls training at this size.)
            with single_frame_convs():
                z = vae.encode(x).latent_dist.mean
                y = vae.decode(z).sample
        else:
            x = _crop_batch(frames, g, recipe.steady_batch, 1 + 4 * (recipe.steady_latents - 1))
            z, y, x = _steady_state_forward(vae, x, recipe.steady_grad_latents)
        rec = (y - x).abs().mean() + (y - x).pow(2).mean()
        kl = z.pow(2).mean()  # keeps the latent scale in check (the mean part of the KL)
        loss = rec + recipe.kl_weight * kl + recipe.colour_weight * _colour_loss(y, x)
        if not torch.isfinite(loss):
            raise TrainingError(f"VAE loss diverged at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        run.append(float(rec.detach()))
        if (step + 1) % log_every == 0 or step + 1 == total:
            log(f"vae step {step + 1}/{total} [{x.shape[2]} frames] rec {np.mean(run):.4f} kl {float(kl.detach()):.2f} lr {lr:.2e} "
                f"{(time.time() - t0) / len(run):.2f}s/step")
            run = []
            t0 = time.time()
        if (step + 1) % checkpoint_every == 0 and step + 1 < total:
            checkpoint(step + 1, opt)
    vae.eval()
    return opt


def _steady_state_forward(vae: AutoencoderKLWan, x: torch.Tensor, grad_latents: int, encoder_grad: bool = True):
    """Encode + decode a clip chunk by chunk with explicit causal caches (as StreamingVAE does); only the last
    `grad_latents` latents are computed with a graph (through the decoder only unless `encoder_grad`).
    Returns (their latents, their frames, their targets)."""
    enc_cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.encoder.modules())
    dec_cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    n = 1 + (x.shape[2] - 1) // 4
    first_grad = n - grad_latents
    if first_grad < 1:
        raise TrainingError(f"steady-state clips need more than {grad_latents} latents, got {n}")
    zs, ys = [], []
    for i in range(n):
        chunk = x[:, :, :1] if i == 0 else x[:, :, 1 + 4 * (i - 1): 1 + 4 * i]
        with torch.set_grad_enabled(i >= first_grad and encoder_grad):
            h = vae.quant_conv(vae.encoder(chunk, feat_cache=enc_cache, feat_idx=[0]))
            z = h[:, : vae.config.z_dim]
        with torch.set_grad_enabled(i >= first_grad):
            y = vae.decoder(vae.post_quant_conv(z), feat_cache=dec_cache, feat_idx=[0], first_chunk=(i == 0))
        if i >= first_grad:
            zs.append(z)
            ys.append(y)
    target = x[:, :, 1 + 4 * (first_grad - 1):]
    return torch.cat(zs, 2), torch.cat(ys, 2), target


def _colour_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between 8x8-pooled frames: global colours (background, skin, hair) that the metrics key on."""
    pool = lambda v: torch.nn.functional.avg_pool2d(v.transpose(1, 2).flatten(0, 1), 8)
    return (pool(y) - pool(x)).abs().mean()


def refine_decoder(vae: AutoencoderKLWan, frames: np.ndarray, recipe: VaeRecipe, log: Callable[[str], None],
                   log_every: int) -> None:
    """Phase C: decoder-only refinement on the steady state (the encoder, and so the latent space, is frozen)."""
    vae.train().requires_grad_(True)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.decoder_lr, weight_decay=0.0, betas=(0.9, 0.99))
    t0, run = time.time(), []
    for step in range(recipe.decoder_steps):
        g = torch.Generator().manual_seed(recipe.seed * 2_000_003 + step)
        lr = recipe.decoder_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / max(1, recipe.decoder_steps))))
        for group in opt.param_groups:
            group["lr"] = lr
        x = _crop_batch(frames, g, recipe.decoder_batch, 1 + 4 * (recipe.steady_latents - 1))
        _, y, x = _steady_state_forward(vae, x, recipe.steady_grad_latents, encoder_grad=False)
        rec = (y - x).abs().mean() + (y - x).pow(2).mean()
        loss = rec + recipe.colour_weight * _colour_loss(y, x)
        if not torch.isfinite(loss):
            raise TrainingError(f"decoder refinement diverged at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.append(float(rec.detach()))
        if (step + 1) % log_every == 0 or step + 1 == recipe.decoder_steps:
            log(f"vae decoder step {step + 1}/{recipe.decoder_steps} rec {np.mean(run):.4f} lr {lr:.2e} "
                f"{(time.time() - t0) / len(run):.2f}s/step")
            t0, run = time.time(), []
    vae.requires_grad_(True)
    vae.eval()


@torch.no_grad()
def set_latent_stats(vae: AutoencoderKLWan, ds: ToyDataset, max_clips: int = 48, batch: int = 8) -> Dict[str, List[float]]:
    """Per-channel mean / std of the posterior means over (up to) `max_clips` training clips -> vae.config."""
    raw = StreamingVAE(vae)  # config still has mean 0 / std 1: these latents are raw
    zs = []
    n = min(max_clips, len(ds))
    for i in range(0, n, batch):
        clips = [ds[j] for j in range(i, min(i + batch, n))]
        _, _, z = encode_clips(raw, np.stack([c.frames for c in clips]), np.stack([c.reference_image for c in clips]))
        zs.append(z.double())
    z = torch.cat(zs)
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    stats = {"latents_mean": [round(float(v), 5) for v in mean], "latents_std": [round(float(v), 5) for v in std]}
    vae.register_to_config(**stats)
    return stats


@torch.no_grad()
def reconstruction_psnr(vae: StreamingVAE, clips: List, max_frames: int = 96) -> Dict[str, float]:
    """PSNR (dB, on uint8 frames) of encode -> streaming decode, with the decoder warmed up on the first 7
    motion latents exactly like `DecoderRunner`."""
    from ...engine.runners import to_uint8_frames

    n = min(c.num_frames for c in clips)
    n = min(n, max_frames) // 4 * 4
    frames = np.stack([c.frames[:n] for c in clips])
    _, motion, lat = encode_clips(vae, frames, np.stack([c.reference_image for c in clips]))
    state = vae.new_decode_state()
    vae.decode_stream(state, motion[:, :, :7])
    decoded = vae.decode_stream(state, lat)
    psnrs = []
    for i in range(len(clips)):
        out = to_uint8_frames(decoded[i:i + 1])
        mse = np.mean((out.astype(np.float64) - frames[i].astype(np.float64)) ** 2)
        psnrs.append(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))
    return {"psnr_db": float(np.mean(psnrs)), "psnr_db_min": float(np.min(psnrs)), "clips": len(psnrs)}
