"""Checkpoint I/O for the causal Wan2.2-S2V transformer.

Reads and writes the official Wan2.2-S2V folder layout::

    config.json                                        (_class_name "WanModel_S2V")
    diffusion_pytorch_model-0000{1..N}-of-0000N.safetensors
    diffusion_pytorch_model.safetensors.index.json     ({"metadata": {"total_size"}, "weight_map"})
  or
    diffusion_pytorch_model.safetensors                (one unsharded file)

and the Live Avatar LoRA (`liveavatar.safetensors`, PEFT keys
`[base_model.model.]<module>.lora_{A,B}[.default].weight`), which is merged into the base weights
as W += (alpha / r) * B @ A before inference.

Every validator collects *all* problems it finds and raises one `CheckpointError` listing them,
so a bad download or a mismatched model is diagnosed in one go. Validation always happens before
any weight of a module is modified. Nothing here depends on the transformer class: the functions
take any `torch.nn.Module` whose `state_dict()` uses the official key names.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from avatarserve.model.config import ConfigError, ModelConfig

PathLike = Union[str, "os.PathLike[str]"]
DeviceLike = Union[str, torch.device]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
LORA_WEIGHTS_NAME = "liveavatar.safetensors"
PEFT_ADAPTER_NAME = "adapter_model.safetensors"
OFFICIAL_CLASS_NAMES = ("WanModel_S2V", "CausalWanModel_S2V")
DEFAULT_MAX_SHARD_BYTES = 10 * 10**9  # diffusers' "10GB": reproduces the official 4-shard split
DEFAULT_LORA_TARGETS: Tuple[str, ...] = ("q", "k", "v", "o", "ffn.0", "ffn.2")
DEFAULT_LORA_RANK = 128
DEFAULT_LORA_ALPHA = 64.0
PEFT_PREFIX = "base_model.model."
PEFT_DEFAULT_ADAPTER = "default"

_SHARD_RE = re.compile(r"^diffusion_pytorch_model-(\d{5})-of-(\d{5})\.safetensors$")
_LORA_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
_FLOAT8_DTYPES = tuple(getattr(torch, a) for a in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                     "float8_e5m2fnuz") if hasattr(torch, a))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class CheckpointError(Exception):
    """A checkpoint or LoRA file cannot be used; `problems` lists every reason found.

    Each problem is a string "<kind>: <detail>" (e.g. "missing key: blocks.0.ffn.0.weight").
    The message groups problems by kind and truncates long groups with a count, so that a
    wrong model (1260 missing keys) still gives a short, readable message.
    """

    MAX_PER_KIND = 8

    def __init__(self, summary: str, problems: Iterable[str] = ()) -> None:
        self.summary = summary
        self.problems: List[str] = list(problems)
        super().__init__(self._format())

    def __reduce__(self):  # keep `problems` when the error crosses a process boundary
        return (type(self), (self.summary, self.problems))

    def _format(self) -> str:
        if not self.problems:
            return self.summary
        groups: "OrderedDict[str, List[str]]" = OrderedDict()
        for p in self.problems:
            kind, sep, detail = p.partition(": ")
            if not sep:
                kind, detail = p, ""
            groups.setdefault(kind, []).append(detail)
        n = len(self.problems)
        lines = [f"{self.summary} ({n} problem{'s' if n != 1 else ''})"]
        for kind, details in groups.items():
            details = [d for d in details if d]
            if not details:
                lines.append(f"  - {kind}")
                continue
            shown = details[: self.MAX_PER_KIND]
            more = len(details) - len(shown)
            head = f"  - {kind}" + (f" ({len(details)})" if len(details) > 1 else "") + ": "
            lines.append(head + "; ".join(shown) + (f"; ... and {more} more" if more else ""))
        return "\n".join(lines)


class _Problems:
    """Collects problems so a validator can report all of them at once."""

    def __init__(self) -> None:
        self.items: List[str] = []

    def add(self, kind: str, detail: str = "") -> None:
        self.items.append(f"{kind}: {detail}" if detail else kind)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, summary: str) -> None:
        if self.items:
            raise CheckpointError(summary, self.items)


def _shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def read_official_config(ckpt_dir: PathLike) -> Dict[str, Any]:
    """Return the parsed `config.json` of a checkpoint folder (or of a config.json path).

    Raises CheckpointError when the file is missing, is not a JSON object, or names a class
    other than WanModel_S2V / CausalWanModel_S2V (a missing `_class_name` is accepted).
    """
    path = Path(ckpt_dir)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError("cannot read checkpoint config", [f"missing file: {path}"])
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError("cannot read checkpoint config", [f"unreadable json: {path}: {exc}"]) from exc
    if not isinstance(data, dict):
        raise CheckpointError("cannot read checkpoint config",
                              [f"invalid config: {path} holds a {type(data).__name__}, not a JSON object"])
    cls_name = data.get("_class_name")
    if cls_name is not None and cls_name not in OFFICIAL_CLASS_NAMES:
        raise CheckpointError("cannot read checkpoint config", [
            f"wrong model class: {path} has _class_name {cls_name!r}, expected one of {OFFICIAL_CLASS_NAMES}"])
    return data


def read_model_config(ckpt_dir: PathLike) -> ModelConfig:
    """`ModelConfig` of a checkpoint folder; invalid values are reported as CheckpointError."""
    data = read_official_config(ckpt_dir)
    try:
        return ModelConfig.from_official_config(data)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError("checkpoint config does not describe a supported model",
                              [f"invalid config: {exc}"]) from exc


# --------------------------------------------------------------------------------------------
# Reading weights
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointLayout:
    """A validated weight layout: which file holds each key."""

    directory: Path
    files: Tuple[Path, ...]  # weight files, in shard order
    key_to_file: Mapping[str, Path]  # in index order (sharded) or file order (single file)
    index_path: Optional[Path]

    @property
    def sharded(self) -> bool:
        return self.index_path is not None

    @property
    def keys(self) -> List[str]:
        return list(self.key_to_file)


def _read_safetensors_keys(path: Path, problems: _Problems) -> Optional[List[str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        problems.add("unreadable weights file", f"{path.name}: {exc}")
        return None


def inspect_checkpoint(ckpt_dir: PathLike) -> CheckpointLayout:
    """Validate the weight files of a checkpoint folder without reading tensor data.

    Sharded folders: the index must parse, every shard it names must exist and be readable, each
    shard must hold exactly the keys the index assigns to it, no key may appear twice, and no
    stray `diffusion_pytorch_model-*-of-*.safetensors` may sit beside it. Folders with both an
    index and an unsharded file are rejected as ambiguous.
    """
    directory = Path(ckpt_dir)
    summary = f"invalid checkpoint folder {directory}"
    if not directory.is_dir():
        raise CheckpointError(summary, [f"missing folder: {directory} does not exist or is not a directory"])
    problems = _Problems()
    index_path = directory / WEIGHTS_INDEX_NAME
    single_path = directory / WEIGHTS_NAME
    shard_files_present = sorted(p.name for p in directory.iterdir() if _SHARD_RE.match(p.name))

    if index_path.is_file() and single_path.is_file():
        problems.add("ambiguous layout", f"both {WEIGHTS_INDEX_NAME} and {WEIGHTS_NAME} are present; remove one")
        problems.raise_if_any(summary)

    if single_path.is_file():
        if shard_files_present:
            problems.add("stray shard file", f"{', '.join(shard_files_present)} beside unsharded {WEIGHTS_NAME}")
        keys = _read_safetensors_keys(single_path, problems)
        problems.raise_if_any(summary)
        assert keys is not None
        if not keys:
            raise CheckpointError(summary, [f"empty weights file: {WEIGHTS_NAME} holds no tensors"])
        return CheckpointLayout(directory, (single_path,), OrderedDict((k, single_path) for k in keys), None)

    if not index_path.is_file():
        if shard_files_present:
            problems.add("missing file", f"{WEIGHTS_INDEX_NAME} (found shard files {', '.join(shard_files_present)} "
                                         "but no index; the save was probably interrupted)")
        else:
            problems.add("missing file", f"neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} in {directory}")
        problems.raise_if_any(summary)

    weight_map = _read_index(index_path, problems)
    problems.raise_if_any(summary)
    assert weight_map is not None

    by_file: "OrderedDict[str, List[str]]" = OrderedDict()
    for key, fname in weight_map.items():
        by_file.setdefault(fname, []).append(key)
    for fname in by_file:
        if Path(fname).name != fname:
            problems.add("invalid index", f"weight_map names {fname!r}, which is not a plain file name")
    problems.raise_if_any(summary)

    seen: Dict[str, str] = {}
    files: List[Path] = []
    for fname, index_keys in by_file.items():
        path = directory / fname
        if not path.is_file():
            problems.add("missing shard file", f"{fname} (named by the index for {len(index_keys)} keys)")
            continue
        files.append(path)
        file_keys = _read_safetensors_keys(path, problems)
        if file_keys is None:
            continue
        file_key_set = set(file_keys)
        for key in index_keys:
            if key not in file_key_set:
                problems.add("key missing from shard", f"{key} (index says {fname})")
        for key in file_keys:
            if key in seen:
                problems.add("duplicate key", f"{key} in both {seen[key]} and {fname}")
                continue
            seen[key] = fname
            mapped = weight_map.get(key)
            if mapped is None:
                problems.add("key not in index", f"{key} (found in {fname})")
            elif mapped != fname:
                problems.add("key in wrong shard", f"{key} is in {fname} but the index says {mapped}")
    stray = [n for n in shard_files_present if n not in by_file]
    if stray:
        problems.add("stray shard file", f"{', '.join(stray)} (not named by the index)")
    problems.raise_if_any(summary)
    return CheckpointLayout(directory, tuple(files), OrderedDict((k, directory / f) for k, f in weight_map.items()),
                            index_path)


def _read_index(index_path: Path, problems: _Problems) -> Optional[Dict[str, str]]:
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.add("unreadable json", f"{index_path.name}: {exc}")
        return None
    if not isinstance(data, dict):
        problems.add("invalid index", f"{index_path.name} holds a {type(data).__name__}, not a JSON object")
        return None
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        problems.add("invalid index", f"{index_path.name} has no non-empty 'weight_map' object")
        return None
    bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
    for key in bad:
        problems.add("invalid index", f"weight_map[{key!r}] is not a file name")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        problems.add("invalid index", f"{index_path.name} 'metadata' is not an object")
    return None if bad else weight_map


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    # Only floating tensors change dtype: integer/bool tensors keep their meaning.
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t


def _device_str(device: DeviceLike) -> str:
    return str(torch.device(device))


def _iter_layout(layout: CheckpointLayout, dtype: Optional[torch.dtype], device: str
                 ) -> Iterator[Tuple[str, torch.Tensor]]:
    meta = device == "meta"
    for path in layout.files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu" if meta else device)
        except Exception as exc:  # file replaced or device invalid after validation
            raise CheckpointError(f"cannot read {path}", [f"unreadable weights file: {path.name}: {exc}"]) from exc
        with handle as f:
            for key in f.keys():
                if meta:
                    sl = f.get_slice(key)
                    src_dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if src_dtype is None:
                        raise CheckpointError(f"cannot read {path}", [f"unsupported dtype: {key} is {sl.get_dtype()}"])
                    t = torch.empty(sl.get_shape(), dtype=src_dtype, device="meta")
                else:
                    try:
                        t = f.get_tensor(key)
                    except Exception as exc:
                        raise CheckpointError(f"cannot read {path}", [f"unreadable tensor: {key}: {exc}"]) from exc
                yield key, _cast(t, dtype)


def iter_checkpoint_tensors(ckpt_dir: PathLike, dtype: Optional[torch.dtype] = None,
                            device: DeviceLike = "cpu") -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (key, tensor) for every weight, one file at a time (peak memory: one tensor).

    The layout is validated eagerly (this call raises CheckpointError before returning the
    iterator). `dtype` converts floating tensors only. `device="meta"` reads headers only and
    yields empty meta tensors with the stored shapes and dtypes (cheap validation of a 32 GB
    checkpoint against a model).
    """
    layout = inspect_checkpoint(ckpt_dir)
    return _iter_layout(layout, dtype, _device_str(device))


def load_state_dict_from_folder(ckpt_dir: PathLike, dtype: Optional[torch.dtype] = None,
                                device: DeviceLike = "cpu") -> Dict[str, torch.Tensor]:
    """All weights of a checkpoint folder as a dict, in index order (sharded) or file order."""
    layout = inspect_checkpoint(ckpt_dir)
    loaded = dict(_iter_layout(layout, dtype, _device_str(device)))
    return {k: loaded[k] for k in layout.key_to_file}


# --------------------------------------------------------------------------------------------
# Loading into a module
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    missing_keys: Tuple[str, ...]
    unexpected_keys: Tuple[str, ...]
    assigned: bool  # True when the module had meta tensors and took the state dict's tensors


def _castable(src: torch.dtype, dst: torch.dtype) -> bool:
    return (src.is_floating_point == dst.is_floating_point) or src == dst


def check_state_dict(module: nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True) -> List[str]:
    """Problems that would stop `state_dict` from loading into `module` (empty list: it fits).

    Reports non-tensor values, missing and unexpected keys (strict), shape mismatches and
    floating/non-floating dtype clashes (always), and missing keys whose module tensor is still
    on the meta device (always: the module would be left without data).
    """
    expected = module.state_dict(keep_vars=True)
    problems = _Problems()
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            problems.add("invalid entry", f"{key!r} -> {type(value).__name__} (expected str -> Tensor)")
            continue
        target = expected.get(key)
        if target is None:
            if strict:
                problems.add("unexpected key", key)
            continue
        if tuple(value.shape) != tuple(target.shape):
            problems.add("shape mismatch", f"{key}: expected {_shape(target.shape)}, got {_shape(value.shape)}")
        elif not (target.dtype in _FLOAT8_DTYPES or _castable(value.dtype, target.dtype)):
            problems.add("dtype mismatch", f"{key}: module has {target.dtype}, checkpoint has {value.dtype}")
        elif value.is_meta:
            problems.add("no data", f"{key} is a meta tensor (shape only)")
    for key, target in expected.items():
        if key in state_dict:
            continue
        if target.is_meta:
            problems.add("missing key", f"{key} (module tensor is on the meta device and would stay empty)")
        elif strict:
            problems.add("missing key", key)
    return problems.items


def load_into_module(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                     strict: bool = True) -> LoadResult:
    """Load `state_dict` into `module` after checking keys, shapes and dtypes.

    All problems are raised together as one CheckpointError before any weight is touched.

    Dtypes: the module decides. Every floating tensor ends up in the dtype of the module tensor
    it replaces (build the module in bfloat16 to keep the official bf16 weights as bf16).

    Devices: a materialised module keeps its tensors' devices (values are copied in). A module
    built on the meta device (e.g. `with torch.device("meta"): m = Model(cfg).to(torch.bfloat16)`)
    instead takes the state dict's tensors with `assign=True` (cast first if dtypes differ), so
    loading a 32 GB checkpoint never allocates a second copy; the module then lives on the
    device the state dict was loaded to and shares storage with it. In a partly-meta module the
    materialised tensors are moved to their current device first, so nothing moves.
    """
    problems = check_state_dict(module, state_dict, strict=strict)
    if problems:
        raise CheckpointError(f"state dict does not fit {type(module).__name__}", problems)
    expected = module.state_dict(keep_vars=True)
    assign = any(t.is_meta for t in expected.values())
    prepared: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        target = expected.get(key)
        if target is None:
            continue
        if target.dtype in _FLOAT8_DTYPES:
            # FP8 layers quantise in their own load hook; a plain cast would drop the scale.
            prepared[key] = value
            continue
        if assign:
            device = value.device if target.is_meta else target.device
            value = value.to(device=device, dtype=target.dtype if value.is_floating_point() else value.dtype)
        prepared[key] = value
    try:
        result = module.load_state_dict(prepared, strict=strict, assign=assign)
    except RuntimeError as exc:  # only reachable through custom module load hooks
        raise CheckpointError(f"state dict does not fit {type(module).__name__}", [f"load failed: {exc}"]) from exc
    unexpected = tuple(k for k in state_dict if k not in expected)
    return LoadResult(tuple(result.missing_keys), unexpected, assign)


def load_checkpoint_into_module(module: nn.Module, ckpt_dir: PathLike, *, strict: bool = True,
                                device: Optional[DeviceLike] = None) -> LoadResult:
    """Validate headers against `module` (no tensor data read), then load the folder into it.

    `device` defaults to the module's device, or CPU for a meta module.
    """
    headers = load_state_dict_from_folder(ckpt_dir, device="meta")
    expected = module.state_dict(keep_vars=True)
    problems = [p for p in check_state_dict(module, headers, strict=strict) if not p.startswith("no data:")]
    if problems:
        raise CheckpointError(f"checkpoint {ckpt_dir} does not fit {type(module).__name__}", problems)
    if device is None:
        devices = {t.device for t in expected.values() if not t.is_meta}
        device = devices.pop() if len(devices) == 1 else "cpu"
    return load_into_module(module, load_state_dict_from_folder(ckpt_dir, device=device), strict=strict)


# --------------------------------------------------------------------------------------------
# Writing the official layout
# --------------------------------------------------------------------------------------------


def shard_file_name(index: int, count: int) -> str:
    """File name of shard `index` (1-based) of `count`, as in the official folder."""
    return f"diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"


def plan_shards(sizes: Sequence[Tuple[str, int]], max_shard_bytes: int) -> List[List[str]]:
    """Greedy split of (key, nbytes) pairs, in order, into shards of at most `max_shard_bytes`.

    A tensor larger than the limit gets a shard of its own. Key order is preserved across
    shards, which is how the official checkpoint was cut (its four shards follow the model's
    state-dict order).
    """
    if max_shard_bytes <= 0:
        raise CheckpointError("cannot plan shards", [f"invalid max_shard_bytes: {max_shard_bytes}"])
    shards: List[List[str]] = []
    current: List[str] = []
    current_bytes = 0
    for key, nbytes in sizes:
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def _remove_weight_files(out_dir: Path) -> None:
    for p in out_dir.iterdir():
        if p.is_file() and (p.name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) or _SHARD_RE.match(p.name)):
            p.unlink()


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _prepare_for_save(tensors: Iterable[Tuple[str, torch.Tensor]], dtype: Optional[torch.dtype],
                      seen_storage: set) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for key, t in tensors:
        t = _cast(t.detach(), dtype).to("cpu").contiguous()  # cast first: smaller device->host copy
        ptr = _storage_ptr(t)
        if ptr in seen_storage and t.numel():
            t = t.clone()  # safetensors refuses tensors that share memory (tied weights, views)
            ptr = _storage_ptr(t)
        seen_storage.add(ptr)
        out[key] = t
    return out


def _atomic_save(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def save_official_checkpoint(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                             out_dir: PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                             dtype: Optional[torch.dtype] = torch.bfloat16) -> List[Path]:
    """Write `state_dict` + `config` as an official Wan2.2-S2V folder; returns the weight files.

    Floating tensors are stored as `dtype` (None keeps each tensor's dtype). Shards are cut
    greedily in state-dict order; a single shard is written as the unsharded
    `diffusion_pytorch_model.safetensors` without index, as diffusers does. Weight files left in
    `out_dir` by an earlier save are removed first so that layouts never mix; the index is written
    last, so an interrupted save is detected on load.
    """
    problems = _Problems()
    if not isinstance(config, Mapping):
        raise CheckpointError("cannot save checkpoint", [f"invalid config: {type(config).__name__}, expected a dict"])
    config = dict(config)
    config.setdefault("_class_name", OFFICIAL_CLASS_NAMES[0])
    if config["_class_name"] not in OFFICIAL_CLASS_NAMES:
        problems.add("invalid config", f"_class_name {config['_class_name']!r} is not one of {OFFICIAL_CLASS_NAMES}")
    try:
        config_text = json.dumps(config, indent=2)
    except (TypeError, ValueError) as exc:
        problems.add("invalid config", f"not JSON-serialisable: {exc}")
        config_text = ""
    if not state_dict:
        problems.add("empty state dict", "nothing to save")
    if max_shard_bytes <= 0:
        problems.add("invalid max_shard_bytes", str(max_shard_bytes))
    sizes: List[Tuple[str, int]] = []
    target_itemsize = torch.empty(0, dtype=dtype).element_size() if dtype is not None else 0
    for key, t in state_dict.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            problems.add("invalid entry", f"{key!r} -> {type(t).__name__} (expected str -> Tensor)")
            continue
        if t.is_meta:
            problems.add("no data", f"{key} is a meta tensor")
            continue
        itemsize = target_itemsize if dtype is not None and t.is_floating_point() else t.element_size()
        sizes.append((key, t.numel() * itemsize))
    problems.raise_if_any(f"cannot save checkpoint to {out_dir}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_weight_files(out)
    (out / CONFIG_NAME).write_text(config_text + "\n", encoding="utf-8")

    shards = plan_shards(sizes, max_shard_bytes)
    seen_storage: set = set()
    if len(shards) == 1:
        path = out / WEIGHTS_NAME
        _atomic_save(_prepare_for_save(((k, state_dict[k]) for k in shards[0]), dtype, seen_storage), path)
        return [path]
    files: List[Path] = []
    weight_map: Dict[str, str] = {}
    for i, keys in enumerate(shards, start=1):
        name = shard_file_name(i, len(shards))
        _atomic_save(_prepare_for_save(((k, state_dict[k]) for k in keys), dtype, seen_storage), out / name)
        files.append(out / name)
        weight_map.update((k, name) for k in keys)
    index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
    tmp = out / (WEIGHTS_INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / WEIGHTS_INDEX_NAME)
    return files


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


def _lora_key(module_name: str, ab: str) -> str:
    return f"{module_name}.lora_{ab}.weight"


def normalize_lora_state_dict(lora_state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Map PEFT LoRA keys to `<module>.lora_A.weight` / `<module>.lora_B.weight`.

    Accepts keys with or without the `base_model.model.` prefix and with or without the
    `.default` adapter segment. Already-normalised input passes through unchanged.
    """
    problems = _Problems()
    out: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for raw_key, value in lora_state_dict.items():
        if not isinstance(raw_key, str) or not isinstance(value, torch.Tensor):
            problems.add("invalid entry", f"{raw_key!r} -> {type(value).__name__} (expected str -> Tensor)")
            continue
        key = raw_key[len(PEFT_PREFIX):] if raw_key.startswith(PEFT_PREFIX) else raw_key
        m = _LORA_KEY_RE.match(key)
        if m is None:
            problems.add("not a LoRA weight", f"{raw_key} (expected <module>.lora_A|lora_B[.default].weight)")
            continue
        adapter = m.group("adapter")
        if adapter is not None and adapter != PEFT_DEFAULT_ADAPTER:
            problems.add("unsupported adapter", f"{raw_key} (only the {PEFT_DEFAULT_ADAPTER!r} adapter is supported)")
            continue
        norm = _lora_key(m.group("module"), m.group("ab"))
        if norm in out:
            problems.add("duplicate LoRA key", f"{raw_key} and {origin[norm]} both map to {norm}")
            continue
        out[norm] = value
        origin[norm] = raw_key
    problems.raise_if_any("invalid LoRA state dict")
    return out


def _lora_pairs(normalized: Mapping[str, torch.Tensor], problems: _Problems
                ) -> "OrderedDict[str, Tuple[torch.Tensor, torch.Tensor]]":
    halves: "OrderedDict[str, Dict[str, torch.Tensor]]" = OrderedDict()
    for key, value in normalized.items():
        m = _LORA_KEY_RE.match(key)
        assert m is not None
        halves.setdefault(m.group("module"), {})[m.group("ab")] = value
    pairs: "OrderedDict[str, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
    for name, ab in halves.items():
        if "A" not in ab or "B" not in ab:
            problems.add("unpaired LoRA weight", f"{name} has lora_{'A' if 'A' in ab else 'B'} but no "
                                                 f"lora_{'B' if 'A' in ab else 'A'}")
            continue
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2:
            problems.add("LoRA shape", f"{name}: lora_A {_shape(a.shape)} and lora_B {_shape(b.shape)} must be 2-D")
            continue
        if a.shape[0] != b.shape[1]:
            problems.add("rank mismatch", f"{name}: lora_A {_shape(a.shape)} has rank {a.shape[0]}, "
                                          f"lora_B {_shape(b.shape)} has rank {b.shape[1]}")
            continue
        pairs[name] = (a, b)
    return pairs


def _common_rank(pairs: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], problems: _Problems) -> Optional[int]:
    by_rank: "OrderedDict[int, List[str]]" = OrderedDict()
    for name, (a, _) in pairs.items():
        by_rank.setdefault(int(a.shape[0]), []).append(name)
    if len(by_rank) > 1:
        main = max(by_rank, key=lambda r: len(by_rank[r]))
        for r, names in by_rank.items():
            if r != main:
                problems.add("inconsistent rank", f"rank {r} in {len(names)} modules (e.g. {names[0]}) while "
                                                  f"{len(by_rank[main])} modules have rank {main}")
        return None
    return next(iter(by_rank), None)


def infer_lora_rank(lora_state_dict: Mapping[str, Any]) -> int:
    """The rank shared by every A/B pair; raises CheckpointError if pairs disagree or are broken."""
    normalized = normalize_lora_state_dict(lora_state_dict)
    problems = _Problems()
    pairs = _lora_pairs(normalized, problems)
    rank = _common_rank(pairs, problems)
    if not normalized:
        problems.add("empty LoRA", "no lora_A/lora_B weights")
    problems.raise_if_any("cannot infer LoRA rank")
    assert rank is not None
    return rank


def load_lora(path: PathLike, *, device: DeviceLike = "cpu", dtype: Optional[torch.dtype] = None
              ) -> Dict[str, torch.Tensor]:
    """Read a LoRA safetensors file (or a folder holding liveavatar.safetensors or
    adapter_model.safetensors) and return it with normalised keys (see normalize_lora_state_dict)."""
    p = Path(path)
    if p.is_dir():
        candidates = [p / LORA_WEIGHTS_NAME, p / PEFT_ADAPTER_NAME]
        found = [c for c in candidates if c.is_file()]
        if not found:
            names = ", ".join(c.name for c in candidates)
            raise CheckpointError("cannot load LoRA", [f"missing file: none of {names} in {p}"])
        p = found[0]
    if not p.is_file():
        raise CheckpointError("cannot load LoRA", [f"missing file: {p}"])
    raw: Dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(p), framework="pt", device=str(torch.device(device))) as f:
            for key in f.keys():
                raw[key] = _cast(f.get_tensor(key), dtype)
    except Exception as exc:
        raise CheckpointError("cannot load LoRA", [f"unreadable weights file: {p}: {exc}"]) from exc
    if not raw:
        raise CheckpointError("cannot load LoRA", [f"empty LoRA: {p} holds no tensors"])
    return normalize_lora_state_dict(raw)


def save_lora(path: PathLike, lora_state_dict: Mapping[str, Any], *, prefix: bool = True,
              adapter: Optional[str] = PEFT_DEFAULT_ADAPTER, dtype: Optional[torch.dtype] = torch.bfloat16) -> Path:
    """Write a LoRA as PEFT keys `[base_model.model.]<module>.lora_{A,B}[.<adapter>].weight`."""
    normalized = normalize_lora_state_dict(lora_state_dict)
    problems = _Problems()
    pairs = _lora_pairs(normalized, problems)
    _common_rank(pairs, problems)
    if not normalized:
        problems.add("empty LoRA", "nothing to save")
    problems.raise_if_any(f"cannot save LoRA to {path}")
    head = PEFT_PREFIX if prefix else ""
    mid = f".{adapter}" if adapter else ""
    tensors: Dict[str, torch.Tensor] = {}
    seen: set = set()
    for name, (a, b) in pairs.items():
        for ab, t in (("A", a), ("B", b)):
            tensors.update(_prepare_for_save([(f"{head}{name}.lora_{ab}{mid}.weight", t)], dtype, seen))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(tensors, out)
    return out


def _matches_target(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def build_lora_target_names(module: nn.Module, targets: Sequence[str] = DEFAULT_LORA_TARGETS) -> List[str]:
    """Names of the nn.Linear modules PEFT would wrap for `target_modules=targets`: a module
    matches when its full name equals a target or ends with "." + target."""
    return [name for name, m in module.named_modules()
            if name and isinstance(m, nn.Linear) and _matches_target(name, targets)]


def merge_lora(module: nn.Module, lora_state_dict: Mapping[str, Any], alpha: float = DEFAULT_LORA_ALPHA,
               rank: Optional[int] = None, *, targets: Optional[Sequence[str]] = DEFAULT_LORA_TARGETS,
               require_all_targets: bool = True) -> int:
    """Merge a LoRA into `module`'s Linear weights in place: W += (alpha / rank) * B @ A.

    Every pair is validated first (paired A/B, 2-D, one common rank equal to `rank` if given,
    A is [rank, in_features], B is [out_features, rank], the module is an nn.Linear with real
    data and, when `targets` is given, is one of `build_lora_target_names(module, targets)`;
    with `require_all_targets` every such target must have a pair). All problems are raised
    together before any weight changes. The sum is computed in float32 on the weight's device
    and cast back to the weight's dtype; biases are unchanged. Returns the number of merged
    modules (448 for Live Avatar on the 14B model).
    """
    normalized = normalize_lora_state_dict(lora_state_dict)
    problems = _Problems()
    if not normalized:
        problems.add("empty LoRA", "no lora_A/lora_B weights")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        problems.add("invalid alpha", repr(alpha))
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        problems.add("invalid rank", repr(rank))
        rank = None
    pairs = _lora_pairs(normalized, problems)
    if rank is None:
        rank = _common_rank(pairs, problems)
    modules = dict(module.named_modules())
    target_set = set(build_lora_target_names(module, targets)) if targets is not None else None
    for name, (a, b) in pairs.items():
        m = modules.get(name)
        if m is None:
            problems.add("LoRA for unknown module", name)
            continue
        if not isinstance(m, nn.Linear):
            hint = " (merge LoRA before apply_fp8)" if type(m).__name__ == "FP8Linear" else ""
            problems.add("LoRA for non-Linear module", f"{name} is {type(m).__name__}{hint}")
            continue
        if target_set is not None and name not in target_set:
            problems.add("LoRA for non-target module", f"{name} (targets {tuple(targets or ())})")
            continue
        if m.weight.is_meta:
            problems.add("no data", f"{name}.weight is on the meta device; load base weights first")
            continue
        if rank is not None and a.shape[0] != rank:
            problems.add("rank mismatch", f"{name}: lora_A {_shape(a.shape)} has rank {a.shape[0]}, expected {rank}")
            continue
        r = a.shape[0]
        if tuple(a.shape) != (r, m.in_features):
            problems.add("LoRA shape", f"{name}.lora_A: expected {_shape((r, m.in_features))}, got {_shape(a.shape)}")
        if tuple(b.shape) != (m.out_features, r):
            problems.add("LoRA shape", f"{name}.lora_B: expected {_shape((m.out_features, r))}, got {_shape(b.shape)}")
        if not (a.is_floating_point() and b.is_floating_point()):
            problems.add("LoRA dtype", f"{name}: lora_A {a.dtype} / lora_B {b.dtype} must be floating point")
        elif a.is_meta or b.is_meta:
            problems.add("no data", f"{name}: LoRA tensors are on the meta device")
    if target_set is not None and require_all_targets:
        order = {n: i for i, n in enumerate(modules)}
        for name in sorted(target_set - set(pairs), key=order.__getitem__):
            problems.add("no LoRA for target module", name)
    problems.raise_if_any(f"cannot merge LoRA into {type(module).__name__}")
    assert rank is not None
    scale = float(alpha) / float(rank)
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            weight = modules[name].weight
            delta = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
            merged = weight.detach().to(torch.float32).add_(delta, alpha=scale)
            weight.copy_(merged)
    return len(pairs)
