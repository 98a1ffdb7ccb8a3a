"""Training of the embedded `toy` model (see scripts/train_toy.py and `recipe.FULL`).

Stages: toy-world clips -> tiny AutoencoderKLWan (`vae`) -> model-space training tensors (`data`) ->
stage 1 diffusion forcing -> stage 2 timestep-forcing distillation (Self-Forcing DMD, or rollout regression)
(`dit`) -> a checkpoint folder in the layout `engine.loading` reads (`run`). `evaluate` scores a bundle.
"""

from .errors import TrainingError
from .recipe import FULL, SMOKE, DataRecipe, Stage1Recipe, Stage2Recipe, TrainRecipe, VaeRecipe
from .run import STAGES, run

__all__ = ["TrainingError", "FULL", "SMOKE", "TrainRecipe", "DataRecipe", "VaeRecipe", "Stage1Recipe",
           "Stage2Recipe", "STAGES", "run"]
