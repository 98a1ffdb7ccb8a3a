"""The set of models one process needs, built from a preset (random tiny weights) or a local checkpoint folder.

Every process that builds the same preset with the same seed gets bit-identical weights, which is what lets the
distributed pipeline reproduce the sequential one exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..model.config import ModelConfig, Preset, StreamConfig, get_preset, stream_config
from ..model.sampler import FlowMatchSchedule
from ..model.transformer import CausalS2VTransformer
from .loading import ALL_COMPONENTS, load_bundle_components



@dataclass
class ModelBundle:
    preset: Preset
    stream: StreamConfig
    transformer: Optional[CausalS2VTransformer]
    vae: Optional[object]  # model.vae.StreamingVAE
    audio: Optional[object]  # model.audio_features.AudioFeatureExtractor
    text_encoder: Optional[object]  # model.text_encoder.TextEncoder
    schedule: FlowMatchSchedule
    model_config: ModelConfig

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
    components: Sequence[str] = ALL_COMPONENTS,
) -> ModelBundle:
    """Build the models named in `components` (transformer, vae, audio, text); the others are None, so a
    replica of one pipeline stage only holds what it runs."""
    unknown = set(components) - set(ALL_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; known: {ALL_COMPONENTS}")
    preset = get_preset(config)
    stream = stream_config(config, stream_overrides)
    schedule = FlowMatchSchedule.create(stream.num_steps, stream.shift, stream.num_train_timesteps)
    if checkpoint is None and preset.extras.get("default_checkpoint"):
        # Weights that ship inside the package (the `toy` model), relative to the avatarserve package.
        checkpoint = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  preset.extras["default_checkpoint"])
    if checkpoint is not None:

        from ..model.checkpoint import read_model_config

        # load_bundle_components validates the whole folder first and lists every missing part at once.
        transformer, vae, audio, text = load_bundle_components(preset, checkpoint, device=device, dtype=dtype,
                                                               components=components)
        model_config = transformer.config if transformer is not None else read_model_config(checkpoint)
        if text is not None:
            # Like upstream, prompts are tokenized to at most the DiT's text_len tokens (EOS included), so any
            # prompt fits the text slots of the transformer that reads its embeddings.
            text.max_length = min(text.max_length, model_config.text_len)
    else:
        if preset.name == "liveavatar-14b":
            raise ValueError("liveavatar-14b needs --checkpoint DIR (a local Wan2.2-S2V-14B folder)")
        model_config = preset.model
        transformer, vae, audio, text = _random_components(preset, seed, device, dtype, components)
    if transformer is not None:
        transformer.eval()
    return ModelBundle(preset=preset, stream=stream, transformer=transformer, vae=vae, audio=audio,
                       text_encoder=text, schedule=schedule, model_config=model_config)


def _random_components(preset: Preset, seed: int, device: str, dtype: torch.dtype, components: Sequence[str]):
    from ..model.audio_features import AudioFeatureExtractor
    from ..model.text_encoder import tiny_text_encoder
    from ..model.vae import tiny_vae

    cfg = preset.model
    transformer = vae = audio = text = None
    if "transformer" in components:
        transformer = CausalS2VTransformer(cfg).randomize_for_tests(seed).to(device=device, dtype=dtype)
    if "vae" in components:
        vae = tiny_vae(seed)
    if "audio" in components:
        if preset.extras.get("audio_frontend") == "logmel":
            from ..model.logmel import LogMelFrontEnd

            audio = LogMelFrontEnd()
        else:
            audio = AudioFeatureExtractor.tiny(seed, hidden_size=cfg.audio_dim,
                                               num_hidden_layers=cfg.audio_num_layers - 1)
    if "text" in components:
        text = tiny_text_encoder(seed, d_model=cfg.text_dim, max_length=cfg.text_len)
    return transformer, vae, audio, text
