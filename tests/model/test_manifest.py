"""The liveavatar-14b module tree must equal the official Wan2.2-S2V-14B checkpoint key for key."""

import json
from pathlib import Path

import pytest
import torch

from avatarserve.model.config import LIVEAVATAR_14B
from avatarserve.model.transformer import CausalS2VTransformer

# Key names, shapes and dtypes of the official checkpoint, kept in the repository as test data.
MANIFEST = Path(__file__).resolve().parent.parent / "data" / "wan22-s2v-14b-manifest.json"


@pytest.fixture(scope="module")
def manifest():
    assert MANIFEST.is_file(), f"test data missing: {MANIFEST} (it is part of the repository)"
    return json.loads(MANIFEST.read_text())


@pytest.fixture(scope="module")
def meta_state_dict():
    with torch.device("meta"):
        model = CausalS2VTransformer(LIVEAVATAR_14B.model)
    return model.state_dict()


def test_keys_and_shapes_equal_official_checkpoint(manifest, meta_state_dict):
    expected = manifest["state_dict"]
    assert set(meta_state_dict) == set(expected)
    mismatched = {k: (list(v.shape), expected[k]) for k, v in meta_state_dict.items() if list(v.shape) != expected[k]}
    assert mismatched == {}
    assert len(meta_state_dict) == manifest["num_keys"] == 1260


def test_key_order_matches_official_shards(manifest, meta_state_dict):
    # The official shards were written in state-dict order; the same order lets us shard identically.
    assert list(meta_state_dict) == list(manifest["state_dict"])


def test_parameter_count(manifest, meta_state_dict):
    total = sum(t.numel() for t in meta_state_dict.values())
    assert total == manifest["total_parameters"] == 16_295_755_609
    by_prefix = {}
    for k, t in meta_state_dict.items():
        by_prefix[k.split(".")[0]] = by_prefix.get(k.split(".")[0], 0) + t.numel()
    assert by_prefix == manifest["parameters_by_prefix"]


def test_no_buffers_in_state_dict():
    with torch.device("meta"):
        model = CausalS2VTransformer(LIVEAVATAR_14B.model)
    assert list(model.buffers()) == []
