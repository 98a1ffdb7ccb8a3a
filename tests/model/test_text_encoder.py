"""TextEncoder: umT5 prompt encoding from local folders, original-checkpoint conversion, cleaning."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

from avatarserve.model.text_encoder import (
    ORIGINAL_T5_FILENAME,
    ORIGINAL_TOKENIZER_SUBDIR,
    PromptError,
    TextCheckpointError,
    TextEncoder,
    clean_prompt,
    convert_original_umt5_state_dict,
    tiny_umt5_config,
)

WORDS = "a the person man woman is talking smiling to camera in front of room and with hair & red blue".split()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Offline WordLevel tokenizer that, like umT5's, appends </s> to every sequence."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("umt5")
    torch.manual_seed(0)
    model = UMT5EncoderModel(tiny_umt5_config(vocab_size=len(WORDS) + 3))
    model.save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def enc(hf_dir: Path) -> TextEncoder:
    return TextEncoder.from_pretrained(hf_dir, dtype=torch.float32)


def test_encode_returns_real_tokens_only(enc: TextEncoder) -> None:
    out = enc.encode("A man is talking to camera")
    assert out.shape == (7, 32)  # 6 words + </s>
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert enc.text_dim == 32
    assert enc.encode("").shape == (1, 32)  # just </s>, as upstream does for an empty negative prompt


def test_unpadded_equals_upstream_padded_and_masked(enc: TextEncoder) -> None:
    """Upstream pads to text_len with a mask and keeps the first L rows; we skip the padding."""
    ids = enc.tokenize("the woman with red hair is smiling")
    n = ids.shape[1]
    padded = torch.zeros(1, 40, dtype=torch.long)
    padded[:, :n] = ids
    mask = torch.zeros(1, 40, dtype=torch.long)
    mask[:, :n] = 1
    with torch.no_grad():
        ref = enc.model(input_ids=padded, attention_mask=mask).last_hidden_state[0, :n]
    assert torch.allclose(enc.encode("the woman with red hair is smiling"), ref, atol=1e-5)


def test_truncates_to_max_length(hf_dir: Path) -> None:
    short = TextEncoder.from_pretrained(hf_dir, dtype=torch.float32, max_length=16)
    assert short.encode(" ".join(["talking"] * 100)).shape == (16, 32)
    long = TextEncoder.from_pretrained(hf_dir, dtype=torch.float32)
    assert long.max_length == 512
    assert long.tokenize(" ".join(["a"] * 600)).shape == (1, 512)


def test_prompt_cleaning_matches_upstream_whitespace_mode(enc: TextEncoder) -> None:
    assert clean_prompt("  a   man\n\ttalking &amp;amp; smiling  ") == "a man talking & smiling"
    assert clean_prompt("\u201cred\u201d hair") == '"red" hair'  # ftfy uncurls quotes
    assert torch.equal(enc.tokenize("  a   man\n talking &amp;amp; smiling "),
                       enc.tokenize("a man talking & smiling"))
    with pytest.raises(PromptError, match="str"):
        enc.encode(None)  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="str"):
        enc.encode(b"bytes")  # type: ignore[arg-type]


def test_hf_folder_dtype_and_errors(hf_dir: Path, tmp_path: Path) -> None:
    bf16 = TextEncoder.from_pretrained(hf_dir, dtype=torch.bfloat16)
    assert bf16.encode("a person").dtype == torch.bfloat16
    with pytest.raises(TextCheckpointError, match="does not exist"):
        TextEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(TextCheckpointError, match="neither"):
        TextEncoder.from_pretrained(tmp_path)
    with pytest.raises(TextCheckpointError, match="tokenizer"):
        TextEncoder.from_pretrained(hf_dir, tokenizer_path=tmp_path / "no_tokenizer")
    with pytest.raises(TextCheckpointError, match="only"):
        TextEncoder(UMT5EncoderModel(tiny_umt5_config(vocab_size=5)), make_tokenizer())


# ---- original checkpoint ---------------------------------------------------------------------------


def original_state_dict(vocab: int, dim: int, heads: int, ffn: int, layers: int, seed: int = 0,
                        buckets: int = 32) -> Dict[str, torch.Tensor]:
    """Random weights under Wan's original umT5 encoder names (per-block relative position tables)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"token_embedding.weight": torch.randn(vocab, dim, generator=g),
          "norm.weight": 1 + 0.1 * torch.randn(dim, generator=g)}
    for i in range(layers):
        p = f"blocks.{i}."
        for n in ("q", "k", "v"):
            sd[p + f"attn.{n}.weight"] = torch.randn(dim, dim, generator=g) * dim ** -0.5
        sd[p + "attn.o.weight"] = torch.randn(dim, dim, generator=g) * dim ** -0.5
        sd[p + "norm1.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        sd[p + "norm2.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        sd[p + "ffn.gate.0.weight"] = torch.randn(ffn, dim, generator=g) * dim ** -0.5
        sd[p + "ffn.fc1.weight"] = torch.randn(ffn, dim, generator=g) * dim ** -0.5
        sd[p + "ffn.fc2.weight"] = torch.randn(dim, ffn, generator=g) * ffn ** -0.5
        sd[p + "pos_embedding.embedding.weight"] = torch.randn(buckets, heads, generator=g)
    return sd


def _bucket(rel: torch.Tensor, num_buckets: int = 32, max_dist: int = 128) -> torch.Tensor:
    half = num_buckets // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_dist / exact)
                     * (half - exact)).long()
    return out + torch.where(rel < exact, rel, large.clamp(max=half - 1))


def reference_forward(sd: Dict[str, torch.Tensor], ids: torch.Tensor, heads: int, layers: int) -> torch.Tensor:
    """Wan umT5 encoder math written out: RMS norms, unscaled attention + per-layer bucketed relative
    bias, gated tanh-GELU FFN, pre-norm residuals, final norm."""
    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    x = sd["token_embedding.weight"][ids]  # [L, d]
    n = x.shape[0]
    pos = torch.arange(n)
    buckets = _bucket(pos[None, :] - pos[:, None])  # key - query
    for i in range(layers):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (h @ sd[p + f"attn.{t}.weight"].T for t in ("q", "k", "v"))
        q, k, v = (t.view(n, heads, -1).transpose(0, 1) for t in (q, k, v))
        bias = sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)
        attn = torch.softmax(q @ k.transpose(1, 2) + bias, dim=-1)
        x = x + (attn @ v).transpose(0, 1).reshape(n, -1) @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        gate = torch.nn.functional.gelu(h @ sd[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + ((h @ sd[p + "ffn.fc1.weight"].T) * gate) @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def test_official_layout_pth_matches_reference_math(tmp_path: Path) -> None:
    vocab, dim, heads, layers = len(WORDS) + 3, 32, 4, 2
    sd = original_state_dict(vocab, dim, heads, ffn=48, layers=layers)
    torch.save(sd, tmp_path / ORIGINAL_T5_FILENAME)
    make_tokenizer().save_pretrained(tmp_path / ORIGINAL_TOKENIZER_SUBDIR)
    enc = TextEncoder.from_pretrained(tmp_path, dtype=torch.float32)  # official Wan2.2-S2V folder layout
    cfg = enc.model.config
    assert (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers) == (32, 4, 8, 48, 2)
    prompt = "a woman is talking in front of the camera with red hair"
    ids = enc.tokenize(prompt)[0]
    assert torch.allclose(enc.encode(prompt), reference_forward(sd, ids, heads, layers), atol=1e-4)
    # positions past max_distance use the logarithmic buckets; check those too
    long_ids = torch.randint(3, vocab, (300,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = enc.model(input_ids=long_ids[None]).last_hidden_state[0]
    assert torch.allclose(ours, reference_forward(sd, long_ids, heads, layers), atol=1e-4)
    assert enc.model.shared.weight is enc.model.encoder.embed_tokens.weight


def test_original_pth_errors(tmp_path: Path) -> None:
    sd = original_state_dict(vocab=30, dim=16, heads=2, ffn=24, layers=2)
    f = tmp_path / "t5.pth"
    torch.save(sd, f)
    with pytest.raises(TextCheckpointError, match="tokenizer_path"):
        TextEncoder.from_pretrained(f)
    bad: Dict[str, torch.Tensor] = dict(sd)
    bad["blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(TextCheckpointError, match="unrecognised"):
        convert_original_umt5_state_dict(bad)
    shared_pos = dict(sd)
    shared_pos["pos_embedding.embedding.weight"] = torch.zeros(32, 2)
    with pytest.raises(TextCheckpointError, match="not a umT5"):
        convert_original_umt5_state_dict(shared_pos)
    gap: Dict[str, torch.Tensor] = {k: v for k, v in sd.items() if not k.startswith("blocks.0.")}
    with pytest.raises(TextCheckpointError, match="missing"):
        convert_original_umt5_state_dict(gap)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(TextCheckpointError, match="cannot read"):
        TextEncoder.from_pretrained(tmp_path / "junk.pth", tokenizer_path=tmp_path)
    keys: List[str] = sorted(convert_original_umt5_state_dict(sd)[0])
    assert "encoder.block.1.layer.1.DenseReluDense.wi_0.weight" in keys and "shared.weight" in keys


# ---- tiny preset encoder ----------------------------------------------------------------------------


def test_tiny_text_encoder_is_deterministic_and_fits_tiny_text_len() -> None:
    from avatarserve.model.config import TINY
    from avatarserve.model.text_encoder import byte_level_tokenizer, tiny_text_encoder

    enc = tiny_text_encoder(seed=0, d_model=TINY.model.text_dim)
    assert enc.max_length == TINY.model.text_len
    a = enc.encode("a person talking")
    assert a.shape == (TINY.model.text_len, TINY.model.text_dim)  # 16 bytes -> 15 + </s>
    assert torch.equal(a, tiny_text_encoder(seed=0, d_model=TINY.model.text_dim).encode("a person talking"))
    assert not torch.equal(a, tiny_text_encoder(seed=1, d_model=TINY.model.text_dim).encode("a person talking"))
    assert not torch.allclose(enc.encode("hi"), enc.encode("ho"))
    tok = byte_level_tokenizer()
    ids = tok("héllo").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and len(ids) == len("héllo".encode()) + 1
    assert tok.decode(ids, skip_special_tokens=True) == "héllo"
