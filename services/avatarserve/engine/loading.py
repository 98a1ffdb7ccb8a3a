"""Load every model of a bundle from a local checkpoint folder.

Accepted layout (the official Wan2.2-S2V-14B folder, optionally with the Live Avatar LoRA beside it):

    DIR/config.json + diffusion_pytorch_model[-0000k-of-0000n].safetensors[.index.json]   the DiT
    DIR/liveavatar.safetensors                         optional LoRA, merged at load (W += alpha/r * B @ A)
    DIR/Wan2.1_VAE.pth  or  DIR/vae/                   VAE (original .pth or diffusers folder)
    DIR/wav2vec2-large-xlsr-53-english/ or DIR/wav2vec2/   wav2vec2 (HF folder)
    DIR/models_t5_umt5-xxl-enc-bf16.pth + DIR/google/umt5-xxl/  or  DIR/text_encoder/   umT5 encoder

Everything missing is reported at once in one CheckpointError.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ..model.checkpoint import (
    CheckpointError,
    load_checkpoint_into_module,
    load_lora,
    merge_lora,
    read_model_config,
)
from ..model.config import Preset
from ..model.transformer import CausalS2VTransformer

# The parts of a model bundle a replica can be built with (a stage replica builds only what it runs).
ALL_COMPONENTS = ("transformer", "vae", "audio", "text")

LORA_FILE = "liveavatar.safetensors"
VAE_CANDIDATES = ("vae", "Wan2.1_VAE.pth")
AUDIO_CANDIDATES = ("wav2vec2-large-xlsr-53-english", "wav2vec2", "audio_encoder", "logmel")
TEXT_CANDIDATES = ("text_encoder", "models_t5_umt5-xxl-enc-bf16.pth")



def _first(root: Path, names: Sequence[str]) -> Optional[Path]:
    for n in names:
        if (root / n).exists():
            return root / n
    return None


def load_transformer(ckpt: Path, *, device: str, dtype: torch.dtype, lora: Optional[Path] = None
                     ) -> CausalS2VTransformer:
    cfg = read_model_config(ckpt)
    with torch.device("meta"):
        model = CausalS2VTransformer(cfg)
    # Allocate real (uninitialised, properly aligned) storage and copy the weights in: tensors read straight from
    # a safetensors buffer can be unaligned, which picks other SIMD kernels and changes results in the last bit.
    model = model.to(dtype=dtype).to_empty(device=device)
    load_checkpoint_into_module(model, ckpt)
    lora_path = lora if lora is not None else (ckpt / LORA_FILE if (ckpt / LORA_FILE).exists() else None)
    if lora_path is not None:
        merge_lora(model, load_lora(lora_path, device=device))
    return model.eval().requires_grad_(False)


def load_bundle_components(preset: Preset, checkpoint: str | os.PathLike, *, device: str = "cpu",
                           dtype: torch.dtype = torch.float32, lora: Optional[str] = None,
                           components: Sequence[str] = ALL_COMPONENTS) -> Tuple:
    """(transformer, vae, audio, text); components not asked for are None."""
    from ..model.audio_features import AudioFeatureExtractor
    from ..model.text_encoder import TextEncoder
    from ..model.vae import StreamingVAE

    root = Path(checkpoint)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist", [f"missing folder: {root}"])
    paths = {"vae": _first(root, VAE_CANDIDATES), "audio": _first(root, AUDIO_CANDIDATES),
             "text": _first(root, TEXT_CANDIDATES)}
    problems: List[str] = []
    wanted = {"vae": VAE_CANDIDATES, "audio": AUDIO_CANDIDATES, "text": TEXT_CANDIDATES}
    for comp, names in wanted.items():
        if comp in components and paths[comp] is None:
            problems.append(f"missing {comp}: none of {', '.join(names)} in {root}")
    if "transformer" in components and not (root / "config.json").exists():
        problems.append(f"missing transformer: no config.json in {root}")
    if problems:
        raise CheckpointError(f"checkpoint folder {root} is incomplete", problems)

    transformer = vae = audio = text = None
    if "transformer" in components:
        transformer = load_transformer(root, device=device, dtype=dtype, lora=Path(lora) if lora else None)
    if "vae" in components:
        vae_path = paths["vae"]
        vae = StreamingVAE.from_pretrained(vae_path if vae_path.is_dir() else root, dtype=torch.float32, device=device)
    if "audio" in components:
        from ..model.logmel import LogMelFrontEnd, is_logmel_folder

        if is_logmel_folder(paths["audio"]):  # fixed log-mel front end (the toy model): a json config only
            audio = LogMelFrontEnd.from_pretrained(paths["audio"])
        else:
            audio = AudioFeatureExtractor.from_pretrained(paths["audio"], device=device, dtype=torch.float32)
    if "text" in components:
        text_path = paths["text"]
        text = TextEncoder.from_pretrained(text_path if text_path.is_dir() else root, dtype=torch.float32,
                                           device=device)
    return transformer, vae, audio, text


def save_bundle_checkpoint(bundle, out_dir: str | os.PathLike, *, max_shard_bytes: int = 10 * 10 ** 9,
                           dtype: torch.dtype = torch.float32) -> Path:
    """Write a bundle in the layout `load_bundle_components` reads (HF/diffusers sub-folders for VAE, wav2vec2
    and umT5). Used to ship the project's own small trained weights and by the round-trip tests."""
    from ..model.checkpoint import save_official_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = bundle.transformer.config
    save_official_checkpoint(bundle.transformer.state_dict(), cfg.to_official_config(), out,
                             max_shard_bytes=max_shard_bytes, dtype=dtype)
    bundle.vae.vae.save_pretrained(out / "vae", safe_serialization=True)
    from ..model.logmel import LogMelFrontEnd

    if isinstance(bundle.audio, LogMelFrontEnd):
        bundle.audio.save_pretrained(out / "logmel")
    else:
        bundle.audio.model.save_pretrained(out / "wav2vec2", safe_serialization=True)
    if bundle.text_encoder is not None:
        bundle.text_encoder.model.save_pretrained(out / "text_encoder", safe_serialization=True)
        bundle.text_encoder.tokenizer.save_pretrained(out / "text_encoder")
    return out
