"""Stages 1 and 2 of the toy model: diffusion forcing, then few-step distillation into the 4-step student.

Both stages train `CausalS2VTransformer.forward_masked`: many blocks in one forward with the block-causal,
windowed (4-block) mask, the sink (reference latent + FramePack motion latents of the repeated reference)
appended, per-frame timesteps, audio features injected per block. That forward equals the cached streaming
path (`forward_block` with a KV cache), so what is trained is what `SequentialPipeline` runs.

Stage 1 (diffusion forcing). Flow matching with v-prediction (v = noise - x0): every block of a window gets
its own noise level sigma (shifted-uniform like the sampler's shift 3, plus the 4 sampler levels themselves),
x_sigma = (1 - sigma) x0 + sigma noise, loss |v - (noise - x0)|^2. Conditioning: the reference latent (or,
with some probability, a latent of the clip itself, which is what the Adaptive Attention Sink feeds after the
first clip), the motion latents, the log-mel features (dropped with some probability, the "no audio" input
that audio guidance contrasts against), and a prompt embedding that is empty or random (the world has no text,
so the model learns to ignore it). The RoPE placement is random: windows at the stream start or up to ~12
minutes in, with the sink placed by rolling RoPE (a random distance d in [4, 30] ahead).

Stage 2 (timestep forcing). At run time stage k of the pipeline caches K/V of *its own noisy input* at
timestep t_k for the previous blocks ("history corrupt"). Hence, within one denoising step, a block depends
only on the blocks before it at the *same* step, and a whole window's 4-step rollout is exactly 4 masked
forwards with every frame at t_k: x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v(x_k, t_k). The student's sample
is its x0 estimate at a random exit step (Self-Forcing: grad through the exit step only).

- method "dmd": Self-Forcing DMD. A fake score (initialised from the teacher) is trained by flow matching on
  the student's samples; the student follows (x0_fake - x0_real) at a random noise level, normalised as in
  DMD; the real score is the stage-1 teacher with audio guidance. No data is used by the student loss.
- method "tf": the same rollouts regressed to the training clip's latents (the student trained directly at
  the 4 timesteps it uses, with noisy caches at its own step). Deterministic targets, no fake score.
- method "none": the stage-1 model itself is the 4-step student. Stage 1 puts a quarter of its blocks exactly
  on the sampler's 4 noise levels, so it already runs as a timestep-forcing sampler.

Measured on 8 held-out 10 s clips (seeds 10**6..10**6+7, 1 CPU thread) with a 2000-step stage-1 teacher (the
shipped recipe now runs 3200), none / dmd (200 steps) / tf (200 steps): lip-sync corr 0.703 / 0.719 / 0.571 (ground truth 0.960), identity drift 0.20 / 0.47 /
0.31, flicker 0.57 / 1.27 / 0.79. DMD's fake-real gap was still falling (0.24 -> 0.13) when its budget ended: at
this scale and budget it had not converged; it lip-syncs slightly better but doubles flicker and identity drift,
so the stage-1 model is what ships (`Stage2Recipe.method`).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ...model.config import ModelConfig, StreamConfig
from ...model.sampler import FlowMatchSchedule
from ...model.transformer import CausalS2VTransformer, SinkInputs
from .data import Batch, DitData, sample_batch
from .errors import TrainingError
from .recipe import Stage1Recipe, Stage2Recipe

Log = Callable[[str], None]


def build_transformer(cfg: ModelConfig, seed: int) -> CausalS2VTransformer:
    torch.manual_seed(seed)
    return CausalS2VTransformer(cfg)  # upstream init: zero head / audio outputs / cond paths


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1.0 + (shift - 1.0) * u)


def masked_forward(model: CausalS2VTransformer, x: torch.Tensor, sigma_frames: torch.Tensor, b: Batch,
                   stream: StreamConfig, audio: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Velocity for latents x [B,16,N*F,h,w] at per-frame noise levels sigma_frames [B, N*F]."""
    return model.forward_masked(
        x, sigma_frames * stream.num_train_timesteps, b.audio if audio is None else audio, b.text,
        SinkInputs(reference=b.reference, motion=b.motion), stream.latent_frames_per_block,
        window_blocks=stream.window_blocks, first_block_index=b.first_block, sink_index=b.sink_index)


def diffusion_forcing_loss(model: CausalS2VTransformer, b: Batch, g: torch.Generator, stream: StreamConfig,
                           schedule: FlowMatchSchedule, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
    x0 = b.x0 if x0 is None else x0
    bsz, _, nf, _, _ = x0.shape
    f = stream.latent_frames_per_block
    nb = nf // f
    sigma = shifted_sigmas(torch.rand(bsz, nb, generator=g), stream.shift)
    # A quarter of the blocks sit exactly on the student's sampler levels.
    on_grid = torch.rand(bsz, nb, generator=g) < 0.25
    grid = torch.tensor(schedule.sigmas[:-1])[torch.randint(schedule.num_steps, (bsz, nb), generator=g)]
    sigma = torch.where(on_grid, grid, sigma)
    s = sigma.repeat_interleave(f, dim=1)  # [B, N*F]
    noise = torch.randn(x0.shape, generator=g)
    sv = s[:, None, :, None, None]
    xt = (1 - sv) * x0 + sv * noise
    v = masked_forward(model, xt, s, b, stream)
    return F.mse_loss(v.float(), (noise - x0).float())


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm start
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)


def _lr(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _save(path: Path, obj: Dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train_stage1(model: CausalS2VTransformer, data: DitData, recipe: Stage1Recipe, stream: StreamConfig,
                 ckpt_path: Path, log: Log, log_every: int, checkpoint_every: int) -> CausalS2VTransformer:
    """Diffusion forcing; resumable from `ckpt_path`. Returns the EMA model (the teacher)."""
    schedule = FlowMatchSchedule.create(stream.num_steps, stream.shift, stream.num_train_timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.99))
    ema = EMA(model, recipe.ema)
    start = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ema.shadow = state["ema"]
        start = int(state["step"])
        log(f"stage1: resumed at step {start}")
    model.train()
    t0, run = time.time(), []
    for step in range(start, recipe.steps):
        g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)  # per-step: resumes reproduce
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.lr, recipe.warmup, recipe.steps)
        b = sample_batch(data, g, recipe.batch, recipe.blocks, stream.latent_frames_per_block,
                         recipe.sink_swap_prob, recipe.prompt_prob, recipe.stream_start_prob,
                         recipe.max_first_block, recipe.audio_dropout, stream.sink_base_index,
                         stream.sink_distance_range)
        loss = diffusion_forcing_loss(model, b, g, stream, schedule)
        if not torch.isfinite(loss):
            raise TrainingError(f"stage 1 loss diverged at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        run.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            log(f"stage1 step {step + 1}/{recipe.steps} loss {np.mean(run):.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {(time.time() - t0) / len(run):.2f}s/step")
            t0, run = time.time(), []
        if (step + 1) % checkpoint_every == 0 or step + 1 == recipe.steps:
            _save(ckpt_path, {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.shadow,
                              "step": step + 1})
    teacher = copy.deepcopy(model)
    ema.copy_to(teacher)
    return teacher.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------------
# stage 2
# ------------------------------------------------------------------------------------------------------------
def rollout(model: CausalS2VTransformer, b: Batch, stream: StreamConfig, schedule: FlowMatchSchedule,
            noise: torch.Tensor, exit_step: int, grad: bool) -> torch.Tensor:
    """Timestep-forcing rollout of a whole window (== the streaming pipeline with per-step noisy caches):
    x0 estimate at `exit_step`, with a graph through that last forward only when `grad`."""
    x = noise
    nf = x.shape[2]
    for k in range(exit_step + 1):
        s = torch.full((x.shape[0], nf), schedule.sigmas[k])
        if k < exit_step:
            with torch.no_grad():
                v = masked_forward(model, x, s, b, stream)
            x = x + (schedule.sigmas[k + 1] - schedule.sigmas[k]) * v
        else:
            with torch.set_grad_enabled(grad):
                v = masked_forward(model, x, s, b, stream)
            return x - schedule.sigmas[k] * v
    raise AssertionError("unreachable")


def dmd_direction(real: CausalS2VTransformer, fake: CausalS2VTransformer, x0: torch.Tensor, b: Batch,
                  g: torch.Generator, stream: StreamConfig, recipe: Stage2Recipe) -> Tuple[torch.Tensor, float]:
    """DMD gradient direction for samples x0 (no graph): normalised (x0_fake - x0_real) at a random level."""
    lo, hi = recipe.dmd_sigma_range
    bsz, nf = x0.shape[0], x0.shape[2]
    sigma = lo + (hi - lo) * torch.rand(bsz, generator=g)
    s = sigma[:, None].expand(bsz, nf).contiguous()
    noise = torch.randn(x0.shape, generator=g)
    sv = s[:, None, :, None, None]
    xt = (1 - sv) * x0 + sv * noise
    with torch.no_grad():
        v_real = masked_forward(real, xt, s, b, stream)
        if recipe.guidance != 1.0:
            v_unc = masked_forward(real, xt, s, b, stream, audio=torch.zeros_like(b.audio))
            v_real = v_unc + recipe.guidance * (v_real - v_unc)
        v_fake = masked_forward(fake, xt, s, b, stream)
    x0_real = xt - sv * v_real
    x0_fake = xt - sv * v_fake
    norm = (x0 - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-4)
    direction = (x0_fake - x0_real) / norm
    return direction, float((x0_fake - x0_real).abs().mean())


def train_stage2(teacher: CausalS2VTransformer, data: DitData, recipe: Stage2Recipe, stream: StreamConfig,
                 ckpt_path: Path, log: Log, log_every: int, checkpoint_every: int) -> CausalS2VTransformer:
    """Few-step distillation (see module doc); resumable. Returns the student."""
    if recipe.method not in ("none", "dmd", "tf"):
        raise TrainingError(f"unknown stage 2 method {recipe.method!r} (expected 'none', 'dmd' or 'tf')")
    if recipe.method == "none":
        return copy.deepcopy(teacher).eval().requires_grad_(False)
    schedule = FlowMatchSchedule.create(stream.num_steps, stream.shift, stream.num_train_timesteps)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=0.0, betas=(0.0, 0.99))
    fake = fake_opt = None
    if recipe.method == "dmd":
        fake = copy.deepcopy(teacher).train().requires_grad_(True)
        fake_opt = torch.optim.AdamW(fake.parameters(), lr=recipe.lr_fake, weight_decay=0.0, betas=(0.0, 0.99))
    start = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["opt"])
        if fake is not None:
            fake.load_state_dict(state["fake"])
            fake_opt.load_state_dict(state["fake_opt"])
        start = int(state["step"])
        log(f"stage2[{recipe.method}]: resumed at step {start}")
    f = stream.latent_frames_per_block
    t0, run = time.time(), {}
    for step in range(start, recipe.steps):
        g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        b = sample_batch(data, g, recipe.batch, recipe.blocks, f, sink_swap_prob=0.3, prompt_prob=0.5,
                         stream_start_prob=0.25, max_first_block=1500, audio_dropout=0.0,
                         sink_base=stream.sink_base_index, sink_distance=stream.sink_distance_range)
        noise = torch.randn(b.x0.shape, generator=g)
        exit_step = int(torch.randint(schedule.num_steps, (1,), generator=g))
        stats: Dict[str, float] = {}
        if fake is not None:
            # Fake score first (on fresh student samples), then the student against the updated fake.
            with torch.no_grad():
                samples = rollout(student, b, stream, schedule, noise, exit_step, grad=False)
            for _ in range(recipe.fake_updates):
                fl = diffusion_forcing_loss(fake, b, g, stream, schedule, x0=samples)
                fake_opt.zero_grad(set_to_none=True)
                fl.backward()
                torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
                fake_opt.step()
            stats["fake"] = float(fl.detach())
        x0 = rollout(student, b, stream, schedule, noise, exit_step, grad=True)
        if recipe.method == "dmd":
            direction, gap = dmd_direction(teacher, fake, x0.detach(), b, g, stream, recipe)
            loss = 0.5 * F.mse_loss(x0, (x0 - direction).detach())
            if recipe.regression_weight:
                loss = loss + recipe.regression_weight * F.mse_loss(x0, b.x0)
            stats["gap"] = gap
        else:
            loss = F.mse_loss(x0, b.x0)
        stats["loss"] = float(loss.detach())
        stats["mse_data"] = float(F.mse_loss(x0.detach(), b.x0))
        if not torch.isfinite(loss):
            raise TrainingError(f"stage 2 loss diverged at step {step}")
        for group in opt.param_groups:
            group["lr"] = recipe.lr * min(1.0, (step + 1) / 20)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        for k, v in stats.items():
            run.setdefault(k, []).append(v)
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            n = len(next(iter(run.values())))
            desc = " ".join(f"{k} {np.mean(v):.4f}" for k, v in run.items())
            log(f"stage2[{recipe.method}] step {step + 1}/{recipe.steps} {desc} {(time.time() - t0) / n:.2f}s/step")
            t0, run = time.time(), {}
        if (step + 1) % checkpoint_every == 0 or step + 1 == recipe.steps:
            state = {"student": student.state_dict(), "opt": opt.state_dict(), "step": step + 1}
            if fake is not None:
                state.update(fake=fake.state_dict(), fake_opt=fake_opt.state_dict())
            _save(ckpt_path, state)
    return student.eval().requires_grad_(False)
