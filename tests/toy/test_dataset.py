"""Toy datasets on disk: reproducible bytes, exact round trip, seed split, corruption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from avatarserve.toy import DatasetError, ToyWorldError, make_clip
from avatarserve.toy.dataset import HELDOUT_SEED_START, ToyDataset, heldout_seeds, split_of, write_dataset


def test_dataset_is_byte_reproducible_and_round_trips(tmp_path) -> None:
    a = write_dataset(tmp_path / "a", num_clips=2, seconds=1.0, seed=40)
    b = write_dataset(tmp_path / "b", num_clips=2, seconds=1.0, seed=40)
    files = sorted(p.name for p in a.parent.iterdir())
    assert files == ["clip_000000.npz", "clip_000001.npz", "manifest.json"]
    for name in files:
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes(), name

    ds = ToyDataset(tmp_path / "a")
    assert len(ds) == 2 and ds.seeds == [40, 41]
    assert ds.manifest["split"] == "train"
    clip, fresh = ds[1], make_clip(41, 1.0)
    for name in ("frames", "audio", "mouth_open", "eye_open", "head_pose", "reference_image"):
        assert np.array_equal(getattr(clip, name), getattr(fresh, name)), name
    assert clip.audio.dtype == np.float32
    assert clip.identity == fresh.identity and clip.voice == fresh.voice and clip.texts == fresh.texts


def test_seed_split() -> None:
    assert split_of(0) == "train" and split_of(HELDOUT_SEED_START - 1) == "train"
    assert split_of(HELDOUT_SEED_START) == "heldout"
    assert heldout_seeds(3) == [HELDOUT_SEED_START, HELDOUT_SEED_START + 1, HELDOUT_SEED_START + 2]
    with pytest.raises(ToyWorldError):
        heldout_seeds(2, start=5)


def test_writer_rejects_bad_requests(tmp_path) -> None:
    with pytest.raises(ToyWorldError, match="straddle"):
        write_dataset(tmp_path / "x", num_clips=3, seconds=1.0, seed=HELDOUT_SEED_START - 1)
    with pytest.raises(ToyWorldError):
        write_dataset(tmp_path / "y", num_clips=0, seconds=1.0, seed=0)
    with pytest.raises(ToyWorldError):
        write_dataset(tmp_path / "z", num_clips=1, seconds=-2, seed=0)
    write_dataset(tmp_path / "w", num_clips=1, seconds=0.2, seed=0)
    with pytest.raises(DatasetError, match="already"):
        write_dataset(tmp_path / "w", num_clips=1, seconds=0.2, seed=0)


def test_reader_detects_corruption_and_bad_manifests(tmp_path) -> None:
    root = write_dataset(tmp_path / "d", num_clips=1, seconds=0.2, seed=3).parent
    clip_file = root / "clip_000000.npz"
    data = bytearray(clip_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    clip_file.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="corrupted"):
        ToyDataset(root)[0]
    with pytest.raises(DatasetError, match="missing"):
        ToyDataset(tmp_path / "nothing-here")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = 99
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="format"):
        ToyDataset(root)
