"""Checkpoint layer: official folder layout, strict loading, LoRA merge, FP8 swap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from safetensors import safe_open
from torch import nn

from avatarserve.model.checkpoint import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    build_lora_target_names,
    check_state_dict,
    infer_lora_rank,
    inspect_checkpoint,
    iter_checkpoint_tensors,
    load_checkpoint_into_module,
    load_into_module,
    load_lora,
    load_state_dict_from_folder,
    merge_lora,
    plan_shards,
    read_model_config,
    read_official_config,
    save_lora,
    save_official_checkpoint,
    shard_file_name,
)
from avatarserve.model.config import TINY
from avatarserve.model.fp8 import (
    E4M3,
    FP8Error,
    FP8Linear,
    FP8UnavailableError,
    apply_fp8,
    fp8_available,
    quantize_per_tensor,
)

# Key names, shapes and dtypes of the official Wan2.2-S2V-14B checkpoint, kept in the repository as test data.
MANIFEST = Path(__file__).resolve().parent.parent / "data" / "wan22-s2v-14b-manifest.json"
D, F, TXT = 16, 32, 16  # multiples of 16 so every Linear is FP8-eligible


# ------------------------------------------------------------------------------------------
# A toy model whose module names follow the official WanModel_S2V ones
# ------------------------------------------------------------------------------------------


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.norm_q = nn.RMSNorm(D)
        self.norm_k = nn.RMSNorm(D)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 6, D))
        self.self_attn = _Attn()
        self.norm3 = nn.LayerNorm(D)
        self.cross_attn = _Attn()
        self.ffn = nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D))


class _AdaLN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, 2 * D)


class _Injector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.injector = nn.ModuleList([_Attn()])
        self.injector_adain_layers = nn.ModuleList([_AdaLN()])


class _AudioEncoderInner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.final_linear = nn.Linear(D, D)


class _AudioEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.randn(1, 3, 1, 1))
        self.encoder = _AudioEncoderInner()


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 2, D))
        self.head = nn.Linear(D, 16)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv3d(4, D, (1, 2, 2), stride=(1, 2, 2))
        self.text_embedding = nn.Sequential(nn.Linear(TXT, D), nn.GELU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList([_Block() for _ in range(2)])
        self.head = _Head()
        self.casual_audio_encoder = _AudioEncoder()
        self.audio_injector = _Injector()
        self.frame_packer_proj = nn.Conv3d(4, D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # exercises every block Linear
        h = self.text_embedding(x)
        for blk in self.blocks:
            for attn in (blk.self_attn, blk.cross_attn):
                h = h + attn.o(attn.q(h) * attn.k(h) + attn.v(h))
            h = h + blk.ffn(h)
        inj = self.audio_injector.injector[0]
        h = h + inj.o(inj.q(h) + inj.k(h) + inj.v(h))
        return self.head.head(h)


TOY_TARGETS = [f"blocks.{i}.{a}.{p}" for i in range(2) for a in ("self_attn", "cross_attn") for p in "qkvo"]
TOY_TARGETS = sorted(TOY_TARGETS + [f"blocks.{i}.ffn.{j}" for i in range(2) for j in (0, 2)]
                     + [f"audio_injector.injector.0.{p}" for p in "qkvo"])


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


def sd_of(m: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def problems_of(exc: pytest.ExceptionInfo) -> List[str]:
    assert isinstance(exc.value, CheckpointError)
    return exc.value.problems


@pytest.fixture
def config() -> dict:
    return TINY.model.to_official_config()


# ------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------


def test_round_trip_fp32_single_file(tmp_path, config):
    src = toy(0)
    files = save_official_checkpoint(src.state_dict(), config, tmp_path, dtype=None)
    assert files == [tmp_path / WEIGHTS_NAME]
    assert not (tmp_path / WEIGHTS_INDEX_NAME).exists()
    loaded = load_state_dict_from_folder(tmp_path)
    assert_same(loaded, sd_of(src))

    dst = toy(1)
    res = load_into_module(dst, loaded)
    assert res.missing_keys == () and res.unexpected_keys == () and not res.assigned
    assert_same(sd_of(dst), sd_of(src))
    assert read_model_config(tmp_path) == TINY.model
    assert read_official_config(tmp_path)["_class_name"] == "WanModel_S2V"


def test_round_trip_bf16_sharded_index_is_right(tmp_path, config):
    src_sd = sd_of(toy(0))
    nbytes = {k: v.numel() * 2 for k, v in src_sd.items()}
    limit = 2 * max(nbytes.values())
    files = save_official_checkpoint(src_sd, config, tmp_path, max_shard_bytes=limit)
    n = len(files)
    assert n >= 3
    assert [f.name for f in files] == [shard_file_name(i, n) for i in range(1, n + 1)]
    assert files[0].name == f"diffusion_pytorch_model-00001-of-{n:05d}.safetensors"

    index = json.loads((tmp_path / WEIGHTS_INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(nbytes.values())
    assert list(index["weight_map"]) == list(src_sd)  # state-dict order
    # Shards are contiguous runs of the state dict, each within the limit, each holding its keys.
    order = [index["weight_map"][k] for k in src_sd]
    assert order == sorted(order)
    for f in files:
        with safe_open(str(f), "pt") as h:
            keys = set(h.keys())
            assert all(h.get_tensor(k).dtype == torch.bfloat16 for k in keys)
        assert keys == {k for k, v in index["weight_map"].items() if v == f.name}
        assert sum(nbytes[k] for k in keys) <= limit

    loaded = load_state_dict_from_folder(tmp_path)
    assert list(loaded) == list(src_sd)
    assert_same(loaded, {k: v.to(torch.bfloat16) for k, v in src_sd.items()})
    assert_same(load_state_dict_from_folder(tmp_path, dtype=torch.float32),
                {k: v.to(torch.bfloat16).float() for k, v in src_sd.items()})

    # Saving again unsharded removes the old shards and index (layouts never mix).
    save_official_checkpoint(src_sd, config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS_NAME]


def test_meta_module_assign_takes_module_dtype(tmp_path, config):
    src_sd = sd_of(toy(0))
    save_official_checkpoint(src_sd, config, tmp_path)  # bf16 on disk
    with torch.device("meta"):
        bf16_model = Toy().to(torch.bfloat16)
        fp32_model = Toy()
    res = load_into_module(bf16_model, load_state_dict_from_folder(tmp_path))
    assert res.assigned
    got = sd_of(bf16_model)
    assert all(not v.is_meta and v.dtype == torch.bfloat16 for v in got.values())
    assert_same(got, {k: v.to(torch.bfloat16) for k, v in src_sd.items()})
    assert all(isinstance(p, nn.Parameter) for p in bf16_model.parameters())

    load_checkpoint_into_module(fp32_model, tmp_path)
    assert_same(sd_of(fp32_model), {k: v.to(torch.bfloat16).float() for k, v in src_sd.items()})


def test_meta_header_read_gives_shapes_without_data(tmp_path, config):
    src_sd = sd_of(toy(0))
    with pytest.raises(CheckpointError):  # validated when called, not at the first next()
        iter_checkpoint_tensors(tmp_path)
    save_official_checkpoint(src_sd, config, tmp_path, max_shard_bytes=4096)
    streamed = dict(iter_checkpoint_tensors(tmp_path, dtype=torch.float32))
    assert_same(streamed, {k: v.to(torch.bfloat16).float() for k, v in src_sd.items()})
    meta = load_state_dict_from_folder(tmp_path, device="meta")
    assert {k: (tuple(v.shape), v.dtype, v.is_meta) for k, v in meta.items()} == \
        {k: (tuple(v.shape), torch.bfloat16, True) for k, v in src_sd.items()}


# ------------------------------------------------------------------------------------------
# Bad checkpoints: one error listing every problem
# ------------------------------------------------------------------------------------------


def _sharded(tmp_path: Path, config: dict) -> List[Path]:
    files = save_official_checkpoint(sd_of(toy(0)), config, tmp_path, max_shard_bytes=4096)
    assert len(files) >= 3
    return files


def test_missing_shard_file(tmp_path, config):
    files = _sharded(tmp_path, config)
    files[1].unlink()
    with pytest.raises(CheckpointError) as exc:
        load_state_dict_from_folder(tmp_path)
    assert len(problems_of(exc)) == 1
    assert problems_of(exc)[0].startswith(f"missing shard file: {files[1].name} (named by the index for ")


def test_corrupt_index(tmp_path, config):
    _sharded(tmp_path, config)
    (tmp_path / WEIGHTS_INDEX_NAME).write_text('{"weight_map": {"a": ')
    with pytest.raises(CheckpointError) as exc:
        inspect_checkpoint(tmp_path)
    assert [p.split(":")[0] for p in problems_of(exc)] == ["unreadable json"]
    assert WEIGHTS_INDEX_NAME in str(exc.value)


def test_index_disagrees_with_shards(tmp_path, config):
    files = _sharded(tmp_path, config)
    index = json.loads((tmp_path / WEIGHTS_INDEX_NAME).read_text())
    wm = index["weight_map"]
    dropped = next(iter(wm))
    del wm[dropped]
    moved = list(wm)[-1]
    wm[moved] = files[0].name
    wm["ghost.weight"] = files[0].name
    (tmp_path / WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    (tmp_path / shard_file_name(9, 9)).write_bytes(b"")
    with pytest.raises(CheckpointError) as exc:
        inspect_checkpoint(tmp_path)
    kinds = sorted(p.split(": ")[0] for p in problems_of(exc))
    assert kinds == ["key in wrong shard", "key missing from shard", "key missing from shard",
                     "key not in index", "stray shard file"]
    msg = str(exc.value)
    assert dropped in msg and "ghost.weight" in msg and moved in msg


def test_no_weights_and_ambiguous_layout(tmp_path, config):
    with pytest.raises(CheckpointError, match="missing folder"):
        inspect_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither"):
        inspect_checkpoint(tmp_path)
    _sharded(tmp_path, config)
    save_official_checkpoint(sd_of(toy(0)), config, tmp_path / "single")
    (tmp_path / "single" / WEIGHTS_NAME).rename(tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="ambiguous layout"):
        inspect_checkpoint(tmp_path)


def test_truncated_shard_is_reported(tmp_path, config):
    files = _sharded(tmp_path, config)
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError) as exc:
        inspect_checkpoint(tmp_path)
    assert problems_of(exc)[0].startswith(f"unreadable weights file: {files[0].name}")


def test_bad_config(tmp_path, config):
    with pytest.raises(CheckpointError, match="missing file"):
        read_official_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable json"):
        read_official_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "_class_name": "WanModel"}))
    with pytest.raises(CheckpointError, match="wrong model class"):
        read_official_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "dim": 50}))
    with pytest.raises(CheckpointError, match="invalid config"):
        read_model_config(tmp_path)


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_single_load_problem(case):
    sd = sd_of(toy(0))
    if case == "missing":
        del sd["blocks.1.ffn.2.bias"]
        want = ["missing key: blocks.1.ffn.2.bias"]
    elif case == "unexpected":
        sd["blocks.1.ffn.3.weight"] = torch.zeros(2)
        want = ["unexpected key: blocks.1.ffn.3.weight"]
    else:
        sd["blocks.0.self_attn.q.weight"] = torch.zeros(D, D + 1)
        want = [f"shape mismatch: blocks.0.self_attn.q.weight: expected [{D}, {D}], got [{D}, {D + 1}]"]
    dst = toy(1)
    before = sd_of(dst)
    with pytest.raises(CheckpointError) as exc:
        load_into_module(dst, sd)
    assert problems_of(exc) == want
    assert_same(sd_of(dst), before)  # nothing touched


def test_several_problems_listed_together_and_nothing_touched():
    sd = sd_of(toy(0))
    del sd["patch_embedding.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["head.head.weight"] = torch.zeros(3, D)
    sd["blocks.0.modulation"] = torch.zeros(1, 6, D, dtype=torch.int64)
    dst = toy(1)
    before = sd_of(dst)
    with pytest.raises(CheckpointError) as exc:
        load_into_module(dst, sd)
    assert sorted(problems_of(exc)) == sorted([
        "unexpected key: extra.weight",
        f"shape mismatch: head.head.weight: expected [16, {D}], got [3, {D}]",
        "dtype mismatch: blocks.0.modulation: module has torch.float32, checkpoint has torch.int64",
        "missing key: patch_embedding.bias",
    ])
    msg = str(exc.value)
    assert msg.startswith("state dict does not fit Toy (4 problems)")
    for part in ("extra.weight", "head.head.weight", "patch_embedding.bias", "expected [16, 16], got [3, 16]"):
        assert part in msg
    assert_same(sd_of(dst), before)

    # Non-strict ignores missing/unexpected keys but never a wrong shape.
    with pytest.raises(CheckpointError) as exc:
        load_into_module(dst, sd, strict=False)
    assert len(problems_of(exc)) == 2


def test_non_strict_load_reports_missing_and_guards_meta():
    sd = sd_of(toy(0))
    del sd["head.head.bias"]
    sd["extra"] = torch.zeros(1)
    dst = toy(1)
    res = load_into_module(dst, sd, strict=False)
    assert res.missing_keys == ("head.head.bias",) and res.unexpected_keys == ("extra",)
    with torch.device("meta"):
        meta = Toy()
    with pytest.raises(CheckpointError, match="meta device and would stay empty"):
        load_into_module(meta, sd, strict=False)


def test_long_problem_lists_are_truncated():
    with torch.device("meta"):
        m = Toy()
    with pytest.raises(CheckpointError) as exc:
        load_into_module(m, {})
    n = len(m.state_dict())
    assert len(problems_of(exc)) == n
    msg = str(exc.value)
    assert f"missing key ({n}):" in msg and f"... and {n - CheckpointError.MAX_PER_KIND} more" in msg
    assert len(msg.splitlines()) == 2


# ------------------------------------------------------------------------------------------
# Sharding plan reproduces the official 4-shard split (manifest shapes, bf16, 10 GB)
# ------------------------------------------------------------------------------------------


def _manifest() -> dict:
    assert MANIFEST.is_file(), f"test data missing: {MANIFEST} (it is part of the repository)"
    return json.loads(MANIFEST.read_text())


def test_shard_plan_matches_official_split():
    man = _manifest()
    sizes = []
    for k, shape in man["state_dict"].items():
        n = 1
        for s in shape:
            n *= s
        sizes.append((k, 2 * n))
    shards = plan_shards(sizes, 10 * 10**9)
    cross = man["official_checkpoint_crosscheck"]
    expected = cross["simulated_shards (state_dict order, bf16, greedy 10 GB max_shard_size)"]
    nb = dict(sizes)
    assert [(len(s), s[0], s[-1], sum(nb[k] for k in s)) for s in shards] == \
        [(e["num_tensors"], e["first_key"], e["last_key"], e["bf16_bytes"]) for e in expected]
    assert plan_shards([("a", 5), ("b", 50), ("c", 5)], 10) == [["a"], ["b"], ["c"]]


# ------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------


def make_lora(model: nn.Module, rank: int, names=None, seed: int = 3) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names if names is not None else build_lora_target_names(model):
        lin = model.get_submodule(name)
        out[f"{name}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g)
        out[f"{name}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g)
    return out


def test_target_matching():
    m = toy()
    assert sorted(build_lora_target_names(m)) == TOY_TARGETS
    assert len(TOY_TARGETS) == 24
    # Exact-or-dotted-suffix rule: "0" hits every Sequential's first child Linear.
    assert sorted(build_lora_target_names(m, ["0"])) == ["blocks.0.ffn.0", "blocks.1.ffn.0", "text_embedding.0"]
    assert build_lora_target_names(m, ["linear"]) == ["audio_injector.injector_adain_layers.0.linear"]
    assert build_lora_target_names(m, ["self_attn"]) == []  # not a Linear
    assert build_lora_target_names(m, ["self_attn.q"]) == ["blocks.0.self_attn.q", "blocks.1.self_attn.q"]
    assert build_lora_target_names(m, ["attn.q"]) == []  # suffixes match on "." boundaries only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_merge_matches_explicit_formula(dtype):
    m = toy(0).to(dtype)
    before = sd_of(m)
    lora = make_lora(m, rank=4)
    assert infer_lora_rank(lora) == 4
    assert merge_lora(m, lora, alpha=8.0) == 24
    after = sd_of(m)
    for k, w in before.items():
        mod, _, leaf = k.rpartition(".")
        if mod in TOY_TARGETS and leaf == "weight":
            a, b = lora[f"{mod}.lora_A.weight"], lora[f"{mod}.lora_B.weight"]
            want = (w.float() + 2.0 * (b @ a)).to(dtype)
            assert after[k].dtype == dtype
            torch.testing.assert_close(after[k], want, rtol=0, atol=1e-5 if dtype == torch.float32 else 0)
            assert not torch.equal(after[k], w)
        else:
            assert torch.equal(after[k], w), k  # biases and non-targets unchanged


def test_lora_key_forms_and_file_round_trip(tmp_path):
    m0 = toy(0)
    lora = make_lora(m0, rank=4)
    path = save_lora(tmp_path / "liveavatar.safetensors", lora, dtype=torch.float32)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 48
    assert all(k.startswith("base_model.model.") and ".default.weight" in k for k in keys)
    assert "base_model.model.blocks.0.self_attn.q.lora_A.default.weight" in keys
    assert_same(load_lora(path), lora)
    assert_same(load_lora(tmp_path), lora)  # folder holding liveavatar.safetensors

    bare = save_lora(tmp_path / "bare.safetensors", lora, prefix=False, adapter=None, dtype=torch.float32)
    with safe_open(str(bare), "pt") as f:
        assert "blocks.0.ffn.2.lora_B.weight" in set(f.keys())
    assert_same(load_lora(bare), lora)

    mixed = {("base_model.model." + k if i % 2 else k).replace(".weight", ".default.weight" if i % 3 else ".weight"): v
             for i, (k, v) in enumerate(lora.items())}
    results = []
    for form in (lora, mixed, load_lora(path)):
        m = toy(0)
        merge_lora(m, form, alpha=8.0)
        results.append(sd_of(m))
    assert_same(results[0], results[1])
    assert_same(results[0], results[2])


def test_wrong_lora_rejected_and_nothing_merged():
    m = toy(0)
    before = sd_of(m)
    lora = make_lora(m, rank=4)
    lora["blocks.0.ffn.2.lora_A.weight"] = torch.zeros(4, D)  # ffn.2 takes F inputs
    lora["blocks.9.self_attn.q.lora_A.weight"] = torch.zeros(4, D)
    lora["blocks.9.self_attn.q.lora_B.weight"] = torch.zeros(D, 4)
    lora["text_embedding.0.lora_A.weight"] = torch.zeros(4, TXT)
    lora["text_embedding.0.lora_B.weight"] = torch.zeros(D, 4)
    lora["blocks.0.self_attn.norm_q.lora_A.weight"] = torch.zeros(4, D)
    lora["blocks.0.self_attn.norm_q.lora_B.weight"] = torch.zeros(D, 4)
    del lora["audio_injector.injector.0.o.lora_A.weight"], lora["audio_injector.injector.0.o.lora_B.weight"]
    with pytest.raises(CheckpointError) as exc:
        merge_lora(m, lora)
    assert sorted(problems_of(exc)) == sorted([
        f"LoRA shape: blocks.0.ffn.2.lora_A: expected [4, {F}], got [4, {D}]",
        "LoRA for unknown module: blocks.9.self_attn.q",
        "LoRA for non-target module: text_embedding.0 (targets ('q', 'k', 'v', 'o', 'ffn.0', 'ffn.2'))",
        "LoRA for non-Linear module: blocks.0.self_attn.norm_q is RMSNorm",
        "no LoRA for target module: audio_injector.injector.0.o",
    ])
    assert_same(sd_of(m), before)
    # Partial LoRAs are allowed when asked; still validated.
    part = make_lora(m, rank=4, names=["blocks.0.ffn.0"])
    assert merge_lora(m, part, require_all_targets=False) == 1
    assert merge_lora(m, part, targets=None) == 1


def test_lora_rank_problems():
    m = toy(0)
    lora = make_lora(m, rank=4)
    lora["blocks.1.ffn.0.lora_A.weight"] = torch.zeros(2, D)
    lora["blocks.1.ffn.0.lora_B.weight"] = torch.zeros(F, 2)
    lora["blocks.1.ffn.2.lora_B.weight"] = torch.zeros(D, 3)
    with pytest.raises(CheckpointError) as exc:
        infer_lora_rank(lora)
    assert sorted(problems_of(exc)) == [
        "inconsistent rank: rank 2 in 1 modules (e.g. blocks.1.ffn.0) while 22 modules have rank 4",
        "rank mismatch: blocks.1.ffn.2: lora_A [4, 32] has rank 4, lora_B [16, 3] has rank 3",
    ]
    del lora["blocks.0.ffn.0.lora_B.weight"]
    with pytest.raises(CheckpointError, match="unpaired LoRA weight"):
        merge_lora(m, lora)
    good = make_lora(m, rank=4)
    with pytest.raises(CheckpointError, match="rank 4, expected 8"):
        merge_lora(m, good, rank=8)
    with pytest.raises(CheckpointError, match="not a LoRA weight"):
        load_lora_like = {"base_model.model.blocks.0.self_attn.q.lora_magnitude_vector": torch.zeros(1)}
        infer_lora_rank(load_lora_like)
    with pytest.raises(CheckpointError, match="unsupported adapter"):
        infer_lora_rank({"blocks.0.self_attn.q.lora_A.other.weight": torch.zeros(1, 1)})


# ------------------------------------------------------------------------------------------
# The real architecture's key list (manifest)
# ------------------------------------------------------------------------------------------


def _meta_tree_from_manifest(state_dict_shapes: Dict[str, List[int]]) -> nn.Module:
    """A throwaway module tree with the manifest's keys: modules holding a 2-D weight (and an
    optional matching bias) become nn.Linear, every other tensor a plain Parameter."""
    params: Dict[str, Dict[str, List[int]]] = {}
    for key, shape in state_dict_shapes.items():
        mod, _, leaf = key.rpartition(".")
        params.setdefault(mod, {})[leaf] = shape
    root = nn.Module()

    def get(path: str) -> nn.Module:
        node = root
        for part in path.split(".") if path else []:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        return node

    with torch.device("meta"):
        for mod, leaves in params.items():
            w, b = leaves.get("weight"), leaves.get("bias")
            if w is not None and len(w) == 2 and set(leaves) <= {"weight", "bias"} and (b is None or b == [w[0]]):
                parent, _, name = mod.rpartition(".")
                get(parent).add_module(name, nn.Linear(w[1], w[0], bias=b is not None))
            else:
                node = get(mod)
                for leaf, shape in leaves.items():
                    node.register_parameter(leaf, nn.Parameter(torch.empty(shape)))
    return root


def test_manifest_lora_targets_and_key_check():
    man = _manifest()
    shapes = man["state_dict"]
    tree = _meta_tree_from_manifest(shapes)
    assert set(tree.state_dict()) == set(shapes) and len(shapes) == man["num_keys"] == 1260
    targets = build_lora_target_names(tree, man["lora"]["target_modules"])
    matched = man["lora"]["matched_modules"]
    assert len(targets) == matched["total"] == 448
    assert sum(".self_attn." in t for t in targets) == matched["blocks.{0..39}.self_attn.{q,k,v,o}"]
    assert sum(".cross_attn." in t for t in targets) == matched["blocks.{0..39}.cross_attn.{q,k,v,o}"]
    assert sum(".ffn." in t for t in targets) == matched["blocks.{0..39}.ffn.{0,2}"]
    assert sum(t.startswith("audio_injector.injector.") for t in targets) == \
        matched["audio_injector.injector.{0..11}.{q,k,v,o}"]
    # A header-only (meta) state dict with the manifest shapes fits; one wrong shape is named.
    meta_sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert [p for p in check_state_dict(tree, meta_sd) if not p.startswith("no data")] == []
    meta_sd["blocks.7.ffn.0.weight"] = torch.empty(5120, 13824, device="meta")
    assert [p for p in check_state_dict(tree, meta_sd) if not p.startswith("no data")] == [
        "shape mismatch: blocks.7.ffn.0.weight: expected [13824, 5120], got [5120, 13824]"]


# ------------------------------------------------------------------------------------------
# FP8
# ------------------------------------------------------------------------------------------

FP8_SKIPPED = {"text_embedding.0", "text_embedding.2", "head.head", "casual_audio_encoder.encoder.final_linear"}


@pytest.mark.skipif(E4M3 is None, reason="torch without float8")
def test_fp8_refuses_cpu_without_explicit_fallback():
    m = toy(0)
    before = sd_of(m)
    with pytest.raises(FP8UnavailableError, match="need a CUDA GPU.*allow_fallback=True"):
        apply_fp8(m)
    assert not any(isinstance(x, FP8Linear) for x in m.modules())
    assert_same(sd_of(m), before)
    # A hand-built scaled_mm layer on CPU fails with a typed error too, not inside _scaled_mm.
    layer = FP8Linear.from_linear(nn.Linear(32, 16), backend="scaled_mm")
    with pytest.raises(FP8Error, match="same CUDA device"):
        layer(torch.randn(2, 32))
    with pytest.raises(FP8Error, match="divisible by 16"):
        FP8Linear(10, 16, backend="scaled_mm")
    odd = nn.Sequential(nn.Linear(10, 16), nn.Linear(16, 16))
    report = apply_fp8(odd, allow_fallback=True)
    assert report.converted == ("1",) and report.skipped_by_shape == ("0",)


@pytest.mark.skipif(E4M3 is None, reason="torch without float8")
def test_fp8_swap_keeps_state_dict_keys(tmp_path, config):
    m = toy(0).to(torch.bfloat16)
    before = sd_of(m)
    x = torch.randn(3, 5, TXT, dtype=torch.bfloat16)
    ref = m(x).float()
    report = apply_fp8(m, allow_fallback=True)
    assert report.backend == "emulated"
    assert set(report.skipped_by_name) == FP8_SKIPPED and report.skipped_by_shape == ()
    assert sorted(report.converted) == sorted(TOY_TARGETS + ["audio_injector.injector_adain_layers.0.linear"])
    for name in report.converted:
        layer = m.get_submodule(name)
        assert isinstance(layer, FP8Linear) and layer.weight.dtype == E4M3
        assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    for name in FP8_SKIPPED:
        assert type(m.get_submodule(name)) is nn.Linear

    after = m.state_dict()
    assert list(after) == list(before)  # same keys, same order
    for k, v in after.items():
        assert v.shape == before[k].shape and v.dtype == torch.bfloat16, k
        torch.testing.assert_close(v.float(), before[k].float(), rtol=0.07, atol=1e-3)
    out = m(x).float()
    assert (out - ref).norm() / ref.norm() < 0.1

    # The FP8 model's state dict saves/loads like a plain model's, and reloading re-quantises.
    save_official_checkpoint(after, config, tmp_path)
    plain = toy(1).to(torch.bfloat16)
    load_into_module(plain, load_state_dict_from_folder(tmp_path))
    assert_same(sd_of(plain), {k: v.clone() for k, v in after.items()})
    load_into_module(m, before)
    q_layer = m.get_submodule("blocks.0.ffn.0")
    q, s = quantize_per_tensor(before["blocks.0.ffn.0.weight"])
    assert torch.equal(q_layer.weight.float(), q.float()) and torch.equal(q_layer.weight_scale, s)


@pytest.mark.skipif(E4M3 is None, reason="torch without float8")
def test_fp8_layer_survives_dtype_casts():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16).to(torch.bfloat16)
    layer = FP8Linear.from_linear(lin, backend="emulated")
    w8, scale = layer.weight.detach().clone(), layer.weight_scale.clone()
    x = torch.randn(4, 32)
    y = layer(x)
    layer.float()  # would otherwise turn the e4m3 weight and its scale into fp32/bf16
    assert layer.weight.dtype == E4M3 and torch.equal(layer.weight.float(), w8.float())
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert layer.orig_dtype == torch.float32 and layer.state_dict()["weight"].dtype == torch.float32
    assert torch.equal(layer(x), y)  # bf16 bias -> fp32 is exact, weights untouched
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == E4M3 and torch.equal(layer.weight_scale, scale)


def test_checkpoint_error_pickles_with_problems():
    import pickle
    err = CheckpointError("bad", ["missing key: a", "missing key: b", "shape mismatch: c: expected [1], got [2]"])
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == err.problems and str(back) == str(err)
    assert str(err) == ("bad (3 problems)\n  - missing key (2): a; b\n"
                        "  - shape mismatch: c: expected [1], got [2]")


@pytest.mark.skipif(E4M3 is None, reason="torch without float8")
def test_fp8_emulated_numerics():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    layer = FP8Linear.from_linear(lin, backend="emulated")
    x = torch.randn(4, 32)
    xq, xs = quantize_per_tensor(x)
    wq, ws = quantize_per_tensor(lin.weight)
    want = (xq.float() * xs) @ (wq.float() * ws).t() + lin.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    assert (xq.float() * xs - x).abs().max() <= x.abs().max() / 8  # e4m3: 3 mantissa bits


@pytest.mark.skipif(not fp8_available("cuda"), reason="needs an FP8-capable CUDA GPU (sm_89+)")
def test_fp8_scaled_mm_matches_emulation_on_gpu():
    torch.manual_seed(0)
    m = toy(0).to("cuda", torch.bfloat16)
    x = torch.randn(2, 37, TXT, device="cuda", dtype=torch.bfloat16)  # 74 rows: padded to 80
    ref = m(x).float()
    report = apply_fp8(m)
    assert report.backend == "scaled_mm"
    lin = m.get_submodule("blocks.0.ffn.0")
    emu = FP8Linear(lin.in_features, lin.out_features, orig_dtype=torch.bfloat16, backend="emulated", device="cuda")
    emu.load_state_dict(lin.state_dict())
    h = torch.randn(74, D, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(lin(h).float(), emu(h).float(), rtol=2e-2, atol=2e-2)
    out = m(x).float()
    assert (out - ref).norm() / ref.norm() < 0.1
