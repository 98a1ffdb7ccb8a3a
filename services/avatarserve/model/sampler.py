"""Few-step flow-matching Euler sampler (no CFG), split per denoising step for timestep forcing.

Timesteps and sigmas come from diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift)`,
which is what Live Avatar hard-codes: for 4 steps and shift 3 they are [1000, 857.69, 602.15, 8.93] with
sigmas [1, 0.8577, 0.6022, 0.0089, 0]. (diffusers applies the shift twice, once in __init__ and once in
set_timesteps; we take its numbers rather than re-deriving them, so we match bit for bit.)

Stage k of the pipeline owns step k only: x_{k+1} = x_k + (sigma_{k+1} - sigma_k) * v(x_k, t_k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


@dataclass(frozen=True)
class FlowMatchSchedule:
    timesteps: tuple  # length num_steps
    sigmas: tuple  # length num_steps + 1 (ends at 0)

    @classmethod
    def create(cls, num_steps: int = 4, shift: float = 3.0, num_train_timesteps: int = 1000) -> "FlowMatchSchedule":
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
        sched.set_timesteps(num_steps)
        return cls(timesteps=tuple(float(t) for t in sched.timesteps), sigmas=tuple(float(s) for s in sched.sigmas))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def timestep(self, step: int) -> float:
        self._check(step)
        return self.timesteps[step]

    def step(self, step: int, sample: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """Euler update of denoising step `step`, computed in float32 like diffusers, cast back."""
        self._check(step)
        dt = self.sigmas[step + 1] - self.sigmas[step]
        return (sample.float() + dt * velocity.float()).to(velocity.dtype)

    def to_x0(self, step: int, sample: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """Clean-sample estimate x0 = x - sigma * v (v = noise - x0)."""
        self._check(step)
        return (sample.float() - self.sigmas[step] * velocity.float()).to(velocity.dtype)

    def add_noise(self, step: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noisy sample at step's level: (1 - sigma) x0 + sigma noise (used by training)."""
        self._check(step)
        s = self.sigmas[step]
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def _check(self, step: int) -> None:
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} out of range for a {self.num_steps}-step schedule")

    def as_list(self) -> List[float]:
        return list(self.timesteps)
