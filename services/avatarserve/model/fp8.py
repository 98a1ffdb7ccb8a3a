"""Optional FP8 (e4m3) linear layers for inference on Hopper/Ada GPUs.

`apply_fp8(model)` swaps `nn.Linear` layers for `FP8Linear` after the base weights are loaded
and the LoRA is merged (as Live Avatar's `--fp8` does). Each weight is quantised once with one
per-tensor scale; activations are quantised per tensor on every call (dynamic scaling) and the
product runs on `torch._scaled_mm` with float32 accumulation, output in the input dtype.

Parameter names do not change (`<layer>.weight`, `<layer>.bias`), so the model's state_dict keys
stay the official ones. `state_dict()` returns the *dequantised* weight in the layer's original
dtype, and `load_state_dict()` re-quantises what it receives, so checkpoints saved from an FP8
model load into a plain model and vice versa.

Without an FP8-capable CUDA device `apply_fp8` raises FP8UnavailableError, unless the caller
passes `allow_fallback=True`, in which case layers run the same quantised arithmetic emulated in
float32 (slow; meant for tests and for checking the numerics of the GPU path).

Inference only: FP8Linear has no backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

E4M3: Optional[torch.dtype] = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_MIN_AMAX = 1e-12  # keeps the scale finite for all-zero tensors
_ALIGN = 16  # _scaled_mm needs both weight dimensions to be multiples of 16

# Upstream Live Avatar leaves these in high precision: embeddings, the timestep projection, the
# output head and the audio encoder's global projection are small but precision-sensitive.
DEFAULT_FP8_SKIP: Tuple[str, ...] = (
    "text_embedding",
    "time_embedding",
    "time_projection",
    "head.head",
    "casual_audio_encoder.encoder.final_linear",
)

BACKENDS = ("scaled_mm", "emulated")


class FP8Error(RuntimeError):
    """FP8 conversion or execution cannot proceed."""


class FP8UnavailableError(FP8Error):
    """This machine/device cannot run FP8 matmuls (CPU only, pre-Ada GPU, or an old torch)."""


def fp8_unavailable_reason(device: torch.device | str) -> Optional[str]:
    """Why FP8 matmuls cannot run on `device`, or None when they can."""
    device = torch.device(device)
    if E4M3 is None:
        return f"torch {torch.__version__} has no float8_e4m3fn dtype"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if device.type != "cuda":
        return f"FP8 matmuls need a CUDA GPU, but the weights are on {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available in this process"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} (sm_{major}{minor}) has no FP8 tensor cores; FP8 needs sm_89 (Ada) or newer"
    return None


def fp8_available(device: torch.device | str = "cuda") -> bool:
    return fp8_unavailable_reason(device) is None


def quantize_per_tensor(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and the float32 scalar scale with x ≈ values.float() * scale."""
    if E4M3 is None:
        raise FP8UnavailableError(f"torch {torch.__version__} has no float8_e4m3fn dtype")
    xf = x.float()
    scale = xf.abs().amax().clamp(min=_MIN_AMAX) / E4M3_MAX
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


class FP8Linear(nn.Module):
    """Linear layer with an e4m3 weight (one scale) and dynamically quantised inputs.

    `weight` is a frozen float8 Parameter and `weight_scale` a non-persistent buffer; the bias
    stays in `orig_dtype`. `backend` is "scaled_mm" (CUDA, sm_89+) or "emulated" (same
    quantisation, float32 matmul, any device).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 orig_dtype: torch.dtype = torch.bfloat16, backend: str = "scaled_mm",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if E4M3 is None:
            raise FP8UnavailableError(f"torch {torch.__version__} has no float8_e4m3fn dtype")
        if backend not in BACKENDS:
            raise FP8Error(f"unknown FP8 backend {backend!r}; expected one of {BACKENDS}")
        if backend == "scaled_mm" and (in_features % _ALIGN or out_features % _ALIGN):
            raise FP8Error(f"scaled_mm needs in/out features divisible by {_ALIGN}, got {in_features}x{out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.orig_dtype = orig_dtype
        self.backend = backend
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=E4M3, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device), persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=orig_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, backend: str = "scaled_mm") -> "FP8Linear":
        w = linear.weight
        if w.is_meta:
            raise FP8Error("cannot quantise a weight on the meta device; load the weights first")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    orig_dtype=w.dtype, backend=backend, device=w.device)
        layer.set_weight(w.detach())
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantise a high-precision [out, in] weight into this layer."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise FP8Error(f"weight shape {list(weight.shape)} does not match "
                           f"[{self.out_features}, {self.in_features}]")
        if not torch.isfinite(weight).all():
            raise FP8Error("weight has non-finite values; refusing to quantise")
        q, scale = quantize_per_tensor(weight.to(self.weight.device))
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = scale

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(dtype or self.orig_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend}")

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Module.to(dtype)/.half()/.float() cast every floating Parameter, float8 included.
        # e4m3 values are exactly representable in fp16/bf16/fp32, so casting back is lossless:
        # the layer stays FP8 and its original dtype follows the cast (bias, state_dict output).
        # The scale must stay float32 (a bf16 scale is off by up to 0.4% and _scaled_mm wants fp32).
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(self.weight_scale.device, torch.float32)
        if self.weight.dtype != E4M3 and self.weight.is_floating_point():
            self.orig_dtype = self.weight.dtype
            self.weight = nn.Parameter(self.weight.detach().to(E4M3), requires_grad=False)
        return self

    # -- state dict: same keys and (dequantised) values as the nn.Linear it replaced ----------

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        # keep_vars=True hands out the live float8 Parameter (no copy); otherwise a dequantised
        # tensor in the original dtype, so the state dict stays loadable into a plain model.
        destination[prefix + "weight"] = self.weight if keep_vars else self.dequantized_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,  # type: ignore[override]
                              missing_keys, unexpected_keys, error_msgs):
        wkey, bkey = prefix + "weight", prefix + "bias"
        if wkey in state_dict:
            w = state_dict[wkey]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {wkey}: copying a param with shape {tuple(w.shape)}, "
                                  f"the shape in current model is {(self.out_features, self.in_features)}.")
            elif w is self.weight:
                pass  # the layer's own keep_vars state dict
            elif w.dtype in (E4M3, getattr(torch, "float8_e5m2", None)):
                error_msgs.append(f"{wkey}: a raw float8 weight carries no scale; load a dequantised state dict")
            else:
                try:
                    self.set_weight(w)
                except FP8Error as exc:
                    error_msgs.append(f"{wkey}: {exc}")
        else:
            missing_keys.append(wkey)
        if self.bias is not None:
            if bkey in state_dict:
                b = state_dict[bkey]
                if tuple(b.shape) != (self.out_features,):
                    error_msgs.append(f"size mismatch for {bkey}: copying a param with shape {tuple(b.shape)}, "
                                      f"the shape in current model is {(self.out_features,)}.")
                elif b is not self.bias:
                    with torch.no_grad():
                        self.bias.copy_(b)
            else:
                missing_keys.append(bkey)
        if strict:
            known = {"weight", "bias"} if self.bias is not None else {"weight"}
            for key in state_dict:
                if key.startswith(prefix):
                    rest = key[len(prefix):]
                    if "." not in rest and rest not in known:
                        unexpected_keys.append(key)

    # -- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != E4M3:
            raise FP8Error(f"FP8Linear weight is {self.weight.dtype}, not float8_e4m3fn; was the model "
                           "cast with .to(dtype) after apply_fp8? Cast before converting.")
        if x.shape[-1] != self.in_features:
            raise FP8Error(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        x2d = x.reshape(-1, self.in_features)
        if self.backend == "scaled_mm":
            y = self._forward_scaled_mm(x2d, x.dtype)
        else:
            y = self._forward_emulated(x2d, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _forward_emulated(self, x2d: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        xq, xs = quantize_per_tensor(x2d)
        bias = self.bias.float() if self.bias is not None else None
        y = F.linear(xq.float() * xs, self.weight.float() * self.weight_scale, bias)
        return y.to(out_dtype)

    def _forward_scaled_mm(self, x2d: torch.Tensor, in_dtype: torch.dtype) -> torch.Tensor:
        if x2d.device.type != "cuda" or self.weight.device != x2d.device:
            raise FP8Error(f"scaled_mm FP8Linear needs input and weight on the same CUDA device "
                           f"(input on {x2d.device}, weight on {self.weight.device})")
        out_dtype = in_dtype if in_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        x2d = x2d.contiguous()  # _scaled_mm wants a row-major left operand
        rows = x2d.shape[0]
        pad = (-rows) % _ALIGN
        if pad:  # zero rows do not change the activation amax
            x2d = torch.cat([x2d, x2d.new_zeros(pad, self.in_features)])
        xq, xs = quantize_per_tensor(x2d)
        fused_bias = (self.bias is not None and out_dtype in (torch.bfloat16, torch.float16)
                      and self.bias.dtype == out_dtype)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale,
                             bias=self.bias if fused_bias else None, out_dtype=out_dtype, use_fast_accum=True)
        if isinstance(y, tuple):  # older torch returned (out, amax)
            y = y[0]
        if pad:
            y = y[:rows]
        if self.bias is not None and not fused_bias:
            y = y + self.bias.to(out_dtype)
        return y


@dataclass(frozen=True)
class FP8Report:
    converted: Tuple[str, ...]
    skipped_by_name: Tuple[str, ...]
    skipped_by_shape: Tuple[str, ...]  # dimensions not multiples of 16 (kept as nn.Linear)
    backend: str


def _skipped(name: str, skip: Sequence[str]) -> bool:
    # Match on whole dotted segments so "head.head" never hits e.g. "blocks.0.xhead.head".
    dotted = f".{name}."
    return any(f".{s}." in dotted for s in skip)


def apply_fp8(module: nn.Module, skip: Sequence[str] = DEFAULT_FP8_SKIP, *,
              allow_fallback: bool = False) -> FP8Report:
    """Replace every eligible nn.Linear in `module` by an FP8Linear, in place.

    A Linear is skipped when its dotted name contains one of `skip` as whole segments, or when
    its in/out features are not multiples of 16. Call it after loading weights and merging the
    LoRA, with the model already on its GPU and in its final dtype. Raises FP8UnavailableError
    if a layer's device cannot run FP8 matmuls, unless `allow_fallback` (then the emulated
    backend is used on such devices). Parameter names, hence state_dict keys, are unchanged.
    """
    candidates = []
    by_name, by_shape = [], []
    for name, child in module.named_modules():
        if not name or not isinstance(child, nn.Linear):
            continue
        if _skipped(name, skip):
            by_name.append(name)
        elif child.in_features % _ALIGN or child.out_features % _ALIGN:
            by_shape.append(name)
        else:
            candidates.append((name, child))
    meta = [n for n, c in candidates if c.weight.is_meta]
    if meta:
        raise FP8Error(f"{len(meta)} Linear layers have meta-device weights (e.g. {meta[0]}); load weights first")
    backends = {}
    for dev in {c.weight.device for _, c in candidates}:
        reason = fp8_unavailable_reason(dev)
        if reason is not None and not allow_fallback:
            raise FP8UnavailableError(f"cannot apply FP8: {reason} (pass allow_fallback=True to emulate FP8 "
                                      "numerics in float32, which is slow)")
        backends[dev] = "scaled_mm" if reason is None else "emulated"
    converted = []
    for name, child in candidates:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, FP8Linear.from_linear(child, backend=backends[child.weight.device]))
        converted.append(name)
    used = sorted(set(backends.values()))
    return FP8Report(tuple(converted), tuple(by_name), tuple(by_shape), "+".join(used) if used else "none")
