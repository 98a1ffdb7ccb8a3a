"""The set of models one process needs, built from a preset (random tiny weights) or a local checkpoint folder.

Every process that builds the same preset with the same seed gets bit-identical weights, which is what lets the
distributed pipeline reproduce the sequential one exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..model.config import ModelConfig, Preset, StreamConfig, get_preset
from ..model.sampler import FlowMatchSchedule
from ..model.transformer import CausalS2VTransformer


@dataclass
class ModelBundle:
    preset: Preset
    stream: StreamConfig
    transformer: CausalS2VTransformer
    vae: object  # model.vae.StreamingVAE
    audio: object  # model.audio_features.AudioFeatureExtractor
    text_encoder: Optional[object]  # model.text_encoder.TextEncoder
    schedule: FlowMatchSchedule

    @property
    def model_config(self) -> ModelConfig:
        return self.transformer.config

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt -> [1, L, text_dim] embeddings (real tokens)."""
        if self.text_encoder is None:
            raise RuntimeError("this bundle has no text encoder; pass precomputed text embeddings")
        emb = self.text_encoder.encode(prompt or "")
        return emb.unsqueeze(0).float() if emb.dim() == 2 else emb.float()


def build_bundle(
    config: str = "tiny",
    *,
    checkpoint: Optional[str] = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    stream_overrides: Optional[dict] = None,
) -> ModelBundle:
    preset = get_preset(config)
    stream = preset.stream.replace(**(stream_overrides or {}))
    schedule = FlowMatchSchedule.create(stream.num_steps, stream.shift, stream.num_train_timesteps)
    if checkpoint is not None:
        from .loading import load_bundle_components

        transformer, vae, audio, text = load_bundle_components(preset, checkpoint, device=device, dtype=dtype)
    else:
        if preset.name == "liveavatar-14b":
            raise ValueError("liveavatar-14b needs --checkpoint DIR (a local Wan2.2-S2V-14B folder)")
        transformer, vae, audio, text = _random_components(preset, seed, device, dtype)
    transformer.eval()
    return ModelBundle(preset=preset, stream=stream, transformer=transformer, vae=vae, audio=audio,
                       text_encoder=text, schedule=schedule)


def _random_components(preset: Preset, seed: int, device: str, dtype: torch.dtype):
    from ..model.audio_features import AudioFeatureExtractor
    from ..model.text_encoder import tiny_text_encoder
    from ..model.vae import tiny_vae

    cfg = preset.model
    transformer = CausalS2VTransformer(cfg).randomize_for_tests(seed).to(device=device, dtype=dtype)
    vae = tiny_vae(seed)
    audio = AudioFeatureExtractor.tiny(seed, hidden_size=cfg.audio_dim, num_hidden_layers=cfg.audio_num_layers - 1)
    text = tiny_text_encoder(seed, d_model=cfg.text_dim, max_length=cfg.text_len)
    return transformer, vae, audio, text
