"""A tiny random bundle written in the official checkpoint layout loads back and gives identical frames."""

import json

import numpy as np
import pytest
import torch

from avatarserve.engine.bundle import build_bundle
from avatarserve.engine.loading import save_bundle_checkpoint
from avatarserve.engine.pipeline import SequentialPipeline
from avatarserve.model.checkpoint import CheckpointError, save_lora

from .conftest import speech_like


def test_round_trip_identical_outputs(tmp_path, tiny_bundle, face_png):
    ckpt = save_bundle_checkpoint(tiny_bundle, tmp_path / "ckpt", max_shard_bytes=400_000)
    shards = sorted(p.name for p in ckpt.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1  # really sharded, with an index
    index = json.loads((ckpt / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tiny_bundle.transformer.state_dict())
    assert json.loads((ckpt / "config.json").read_text())["_class_name"] == "WanModel_S2V"

    loaded = build_bundle("tiny", checkpoint=str(ckpt))
    for k, v in tiny_bundle.transformer.state_dict().items():
        assert torch.equal(v, loaded.transformer.state_dict()[k]), k
    audio = speech_like(1.0, seed=9)
    a = SequentialPipeline(tiny_bundle).generate(face_png, audio, prompt="hi", seed=4)
    b = SequentialPipeline(loaded).generate(face_png, audio, prompt="hi", seed=4)
    assert len(a) == len(b)
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b))


def test_lora_in_folder_is_merged(tmp_path, tiny_bundle):
    ckpt = save_bundle_checkpoint(tiny_bundle, tmp_path / "ckpt")
    model = tiny_bundle.transformer
    g = torch.Generator().manual_seed(0)
    lora = {}
    r = 4
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (name.split(".")[-1] in ("q", "k", "v", "o") or name.endswith(("ffn.0", "ffn.2"))):
            lora[f"{name}.lora_A.weight"] = torch.randn(r, mod.in_features, generator=g) * 0.1
            lora[f"{name}.lora_B.weight"] = torch.randn(mod.out_features, r, generator=g) * 0.1
    save_lora(ckpt / "liveavatar.safetensors", lora, dtype=torch.float32)
    loaded = build_bundle("tiny", checkpoint=str(ckpt)).transformer
    w0 = model.blocks[0].self_attn.q.weight
    expected = w0 + (64.0 / r) * lora["blocks.0.self_attn.q.lora_B.weight"] @ lora["blocks.0.self_attn.q.lora_A.weight"]
    assert torch.allclose(loaded.blocks[0].self_attn.q.weight, expected, atol=1e-5)


def test_incomplete_folder_lists_every_missing_part(tmp_path):
    (tmp_path / "ck").mkdir()
    with pytest.raises(CheckpointError) as err:
        build_bundle("tiny", checkpoint=str(tmp_path / "ck"))
    msg = str(err.value)
    for part in ("vae", "audio", "text", "transformer"):
        assert f"missing {part}" in msg


def test_a_loaded_text_encoder_truncates_prompts_to_the_dit_text_len():
    """A checkpoint's text encoder tokenizes to the DiT's text_len (upstream's tokenizer length), so a long prompt
    fits the transformer's text slots instead of failing when a session opens. The toy model ships text_len 16."""
    bundle = build_bundle("toy", components=("vae", "text"))
    emb = bundle.encode_prompt("a person talking in front of a plain wall, calm and friendly")
    assert emb.shape[1] == bundle.model_config.text_len == 16
    assert bundle.encode_prompt("hi").shape[1] < 16  # short prompts are not padded here (the DiT pads them)
