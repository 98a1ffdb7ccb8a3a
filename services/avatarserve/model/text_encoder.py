"""umT5 text encoder (transformers `UMT5EncoderModel`), run once per session for the prompt.

Matches upstream Wan's T5 path: the prompt is cleaned (ftfy + HTML unescape + whitespace collapse,
upstream's `clean='whitespace'`), tokenized with the umT5 tokenizer (EOS appended, truncated to 512
tokens), encoded, and only the real tokens are returned: a [L, text_dim] tensor (L <= 512). The DiT
pads to its text_len later. Running the encoder on the unpadded ids gives the same states for the real
tokens as upstream's padded + masked run, because padding is masked out of every attention row.

Checkpoints: an HF folder (config.json + weights + tokenizer files), or the official Wan layout with
the original-format `models_t5_umt5-xxl-enc-bf16.pth` and the tokenizer in `google/umt5-xxl/`. The
original keys are converted by `convert_original_umt5_state_dict` (architecture inferred from shapes).
"""

from __future__ import annotations

import html
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

DEFAULT_MAX_LENGTH = 512
ORIGINAL_T5_FILENAME = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER_SUBDIR = os.path.join("google", "umt5-xxl")

PathLike = Union[str, "os.PathLike[str]"]


class TextEncoderError(ValueError):
    """Base class for text encoder errors."""


class PromptError(TextEncoderError):
    """The prompt is not a string or cannot be encoded."""


class TextCheckpointError(TextEncoderError):
    """A checkpoint or tokenizer path cannot be loaded as a umT5 encoder."""


_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Upstream Wan prompt cleaning ('whitespace' mode): fix mojibake and typographic quirks with ftfy,
    unescape HTML twice, collapse whitespace."""
    try:
        import ftfy
    except ImportError as exc:  # a different cleaning would change the embeddings silently
        raise TextEncoderError("the text encoder needs the 'ftfy' package (pip install ftfy)") from exc
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class TextEncoder:
    """Prompt -> umT5 encoder states of the real tokens, [L, d_model]."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase,
                 max_length: int = DEFAULT_MAX_LENGTH, clean: bool = True) -> None:
        if not isinstance(model, UMT5EncoderModel):
            raise TextCheckpointError(f"expected a transformers UMT5EncoderModel, got {type(model).__name__}")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TextCheckpointError(f"expected a transformers tokenizer, got {type(tokenizer).__name__}")
        if not isinstance(max_length, int) or max_length < 1:
            raise TextEncoderError(f"max_length must be a positive int, got {max_length!r}")
        if len(tokenizer) > model.config.vocab_size:
            raise TextCheckpointError(
                f"tokenizer has {len(tokenizer)} tokens but the model embeds only {model.config.vocab_size}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.clean = clean

    @property
    def text_dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokenize(self, prompt: str) -> torch.Tensor:
        """Token ids [1, L] of the cleaned prompt, EOS included, truncated to max_length."""
        if not isinstance(prompt, str):
            raise PromptError(f"prompt must be a str, got {type(prompt).__name__}")
        text = clean_prompt(prompt) if self.clean else prompt
        ids = self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt").input_ids
        if ids.numel() == 0:
            raise PromptError("the tokenizer produced no tokens (does it append EOS?)")
        return ids

    def encode(self, prompt: str) -> torch.Tensor:
        """[L, text_dim] encoder states of the prompt's real tokens (no padding)."""
        ids = self.tokenize(prompt).to(self.device)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return out[0]

    def encode_batch(self, prompts: Sequence[str]) -> List[torch.Tensor]:
        return [self.encode(p) for p in prompts]

    # ---- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: PathLike,
        dtype: torch.dtype = torch.bfloat16,
        device: Union[str, torch.device] = "cpu",
        tokenizer_path: Optional[PathLike] = None,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> "TextEncoder":
        """Load from an HF folder (UMT5EncoderModel weights + tokenizer), the official Wan folder
        (`models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/`), or an original `.pth` file with
        `tokenizer_path`."""
        root = os.fspath(path)
        if os.path.isdir(root):
            original = os.path.join(root, ORIGINAL_T5_FILENAME)
            if os.path.isfile(os.path.join(root, "config.json")):
                model = UMT5EncoderModel.from_pretrained(root, dtype=dtype)
                tok_dir = os.fspath(tokenizer_path) if tokenizer_path is not None else root
            elif os.path.isfile(original):
                model = load_original_umt5(original, dtype=dtype)
                tok_dir = (os.fspath(tokenizer_path) if tokenizer_path is not None
                           else os.path.join(root, ORIGINAL_TOKENIZER_SUBDIR))
            else:
                raise TextCheckpointError(f"{root} has neither an HF config.json nor {ORIGINAL_T5_FILENAME}")
        elif os.path.isfile(root):
            if tokenizer_path is None:
                raise TextCheckpointError(f"{root} is a bare checkpoint file; pass tokenizer_path too")
            model = load_original_umt5(root, dtype=dtype)
            tok_dir = os.fspath(tokenizer_path)
        else:
            raise TextCheckpointError(f"text encoder path {root} does not exist")
        if not os.path.isdir(tok_dir):
            raise TextCheckpointError(f"tokenizer folder {tok_dir} does not exist")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        except (OSError, ValueError) as exc:
            raise TextCheckpointError(f"cannot load a tokenizer from {tok_dir}: {exc}") from exc
        return cls(model.to(device), tokenizer, max_length=max_length)


# --------------------------------------------------------------------------------------------------
# Original (Wan) umT5 checkpoint conversion
# --------------------------------------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_RENAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # upstream FFN: fc2(fc1(x) * gelu(gate(x))); HF: wo(gelu(wi_0(x)) * wi_1(x))
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def convert_original_umt5_state_dict(
    state_dict: Dict[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], UMT5Config]:
    """Rename Wan's original umT5 encoder state dict (token_embedding, blocks.{i}.{norm1,attn,norm2,ffn,
    pos_embedding}, norm) to `UMT5EncoderModel` names; infer the UMT5Config from the shapes."""
    sd = dict(state_dict)
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TextCheckpointError("checkpoint is not a flat tensor state dict")
    if "pos_embedding.embedding.weight" in sd:
        raise TextCheckpointError("shared relative position embedding: this is a T5, not a umT5, encoder")
    for required in ("token_embedding.weight", "norm.weight", "blocks.0.attn.q.weight",
                     "blocks.0.pos_embedding.embedding.weight", "blocks.0.ffn.fc1.weight"):
        if required not in sd:
            raise TextCheckpointError(f"not an original umT5 encoder state dict: {required!r} is missing")
    out: Dict[str, torch.Tensor] = {}
    layers = set()
    for key, value in sd.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
            continue
        if key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
            continue
        m = _BLOCK_KEY.match(key)
        if not m or m.group(2) not in _BLOCK_RENAMES:
            raise TextCheckpointError(f"unrecognised original umT5 key {key!r}")
        layers.add(int(m.group(1)))
        out[f"encoder.block.{m.group(1)}.{_BLOCK_RENAMES[m.group(2)]}"] = value
    num_layers = len(layers)
    if sorted(layers) != list(range(num_layers)):
        raise TextCheckpointError(f"encoder blocks are not contiguous: {sorted(layers)}")
    vocab, d_model = sd["token_embedding.weight"].shape
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    inner = sd["blocks.0.attn.q.weight"].shape[0]
    if inner % heads:
        raise TextCheckpointError(f"attention width {inner} is not divisible by {heads} heads")
    config = UMT5Config(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(inner // heads),
        d_ff=int(sd["blocks.0.ffn.fc1.weight"].shape[0]),
        num_layers=num_layers,
        num_heads=int(heads),
        relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=128,  # upstream T5RelativeEmbedding default
        feed_forward_proj="gated-gelu",  # upstream GELU is the tanh approximation = gelu_new
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return out, config


def load_original_umt5(file: PathLike, dtype: torch.dtype = torch.bfloat16) -> UMT5EncoderModel:
    """Build a UMT5EncoderModel from an original Wan umT5 `.pth` (e.g. models_t5_umt5-xxl-enc-bf16.pth)."""
    path = os.fspath(file)
    if not os.path.isfile(path):
        raise TextCheckpointError(f"text encoder checkpoint {path} does not exist")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TextCheckpointError(f"cannot read text encoder checkpoint {path}: {exc}") from exc
    if not isinstance(sd, dict):
        raise TextCheckpointError(f"{path} does not hold a state dict")
    converted, config = convert_original_umt5_state_dict(sd)
    converted = {k: v.to(dtype) for k, v in converted.items() if k != "encoder.embed_tokens.weight"}
    converted["encoder.embed_tokens.weight"] = converted["shared.weight"]  # tied: one copy in memory
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    try:
        result = model.load_state_dict(converted, strict=False, assign=True)
    except RuntimeError as exc:
        raise TextCheckpointError(f"{path}: tensor shapes do not fit the inferred umT5 config: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise TextCheckpointError(
            f"{path}: converted keys do not match UMT5EncoderModel: missing {sorted(result.missing_keys)[:8]}, "
            f"unexpected {sorted(result.unexpected_keys)[:8]}")
    model.tie_weights()
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Tiny model for tests
# --------------------------------------------------------------------------------------------------


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A real, offline tokenizer for tests and the `tiny` preset: one token per UTF-8 byte, ids
    0/1/2 = <pad>/</s>/<unk> like umT5, and </s> appended to every sequence like umT5's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(seed: int = 0, d_model: int = 32, max_length: int = 16) -> TextEncoder:
    """Random tiny umT5 encoder + byte-level tokenizer. `max_length` defaults to the tiny preset's
    text_len (16) so its output always fits the DiT's text slots."""
    tokenizer = byte_level_tokenizer()
    config = tiny_umt5_config(vocab_size=len(tokenizer), d_model=d_model)
    rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    finally:
        torch.random.set_rng_state(rng)
    return TextEncoder(model, tokenizer, max_length=max_length)


def tiny_umt5_config(vocab_size: int, d_model: int = 32, **overrides: Any) -> UMT5Config:
    kwargs: Dict[str, Any] = dict(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False,
    )
    kwargs.update(overrides)
    return UMT5Config(**kwargs)
