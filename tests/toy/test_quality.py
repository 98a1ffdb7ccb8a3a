"""Quality metrics on toy-world ground truth and on deliberately broken videos."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avatarserve import quality as Q
from avatarserve.toy import render

REPO = Path(__file__).resolve().parents[2]


def _shift_video(frames: np.ndarray, k: int) -> np.ndarray:
    """Delay the video by k frames (k < 0: advance), holding the edge frame."""
    if k >= 0:
        return np.concatenate([np.repeat(frames[:1], k, 0), frames[: len(frames) - k]])
    return np.concatenate([frames[-k:], np.repeat(frames[-1:], -k, 0)])


def test_measured_mouth_matches_ground_truth(gt_clip) -> None:
    measured = Q.mouth_opening(gt_clip.frames, gt_clip.reference_image)
    assert np.isfinite(measured).all()
    assert np.corrcoef(measured, gt_clip.mouth_open)[0, 1] > 0.98
    assert abs(float(np.median(measured[gt_clip.mouth_open < 0.02]))) < 0.005  # closed reads ~0


def test_lipsync_of_ground_truth(gt_clip) -> None:
    r = Q.lipsync(gt_clip.frames, gt_clip.audio, reference_image=gt_clip.reference_image)
    assert r["corr"] > 0.9
    assert abs(r["best_offset_frames"]) <= 1
    assert set(r["corr_by_offset"]) == set(range(-5, 6))
    assert r["corr_by_offset"][4] < r["corr"] - 0.3  # the peak is sharp


@pytest.mark.parametrize("shift", [3, -2])
def test_lipsync_finds_a_shift(gt_clip, shift) -> None:
    r = Q.lipsync(_shift_video(gt_clip.frames, shift), gt_clip.audio, reference_image=gt_clip.reference_image)
    assert r["best_offset_frames"] == shift
    assert r["corr_best"] > 0.9 and r["corr"] < 0.8


def test_frozen_mouth_and_wrong_audio_score_near_zero(gt_clip, other_clip) -> None:
    frozen = render(gt_clip.identity, 64, gt_clip.head_pose, gt_clip.eye_open, np.zeros(gt_clip.num_frames))
    r = Q.lipsync(frozen, gt_clip.audio, reference_image=gt_clip.reference_image)
    assert abs(r["corr"]) < 0.35 and r["corr_best"] < 0.5
    wrong = Q.lipsync(gt_clip.frames, other_clip.audio, reference_image=gt_clip.reference_image)
    assert abs(wrong["corr"]) < 0.4


def test_identity_drift(gt_clip) -> None:
    base = Q.identity_drift(gt_clip.frames, gt_clip.reference_image)
    assert base["first"] < 0.04 and base["lost_frames"] == 0
    assert base["per_frame"]["total"].shape == (gt_clip.num_frames,)

    skin = tuple(np.clip(np.asarray(gt_clip.identity.skin) * (0.8, 1.0, 1.25), 0, 1))
    recoloured = render(
        dataclasses.replace(gt_clip.identity, skin=skin), 64, gt_clip.head_pose, gt_clip.eye_open, gt_clip.mouth_open
    )
    r = Q.identity_drift(recoloured, gt_clip.reference_image)
    assert r["colour_first"] > 0.05 and r["first"] > 4 * base["first"]

    bigger = render(
        dataclasses.replace(gt_clip.identity, face_width=gt_clip.identity.face_width * 1.2),
        64, gt_clip.head_pose, gt_clip.eye_open, gt_clip.mouth_open,
    )
    # 20% larger head: |log 1.2| = 0.18 of shape drift, far above natural sway.
    shape = Q.identity_drift(bigger, gt_clip.reference_image)["shape_first"]
    assert 0.15 < shape < 0.25 and shape > 5 * base["shape_first"]

    # Drift that grows over time shows in the last window, not the first.
    mixed = np.concatenate([gt_clip.frames[:125], recoloured[125:]])
    w = Q.identity_drift(mixed, gt_clip.reference_image, window=100)
    assert w["last"] > 4 * w["first"]


def test_flicker(gt_clip) -> None:
    clean = Q.flicker(gt_clip.frames)
    noise = np.random.default_rng(0).normal(0, 6, gt_clip.frames.shape)
    noisy = np.clip(gt_clip.frames + noise, 0, 255).astype(np.uint8)
    assert clean < 0.5
    assert Q.flicker(noisy) > 3 * clean + 1.0


def test_streaming_accumulator_equals_one_shot(gt_clip) -> None:
    one = Q.evaluate_video(gt_clip.frames, gt_clip.audio, gt_clip.reference_image)
    acc = Q.QualityAccumulator(gt_clip.reference_image)
    for start in range(0, gt_clip.num_frames, 37):  # frames and audio in unaligned pieces
        acc.update(gt_clip.frames[start : start + 37])
    for start in range(0, gt_clip.audio.size, 5000):
        acc.update(gt_clip.frames[:0], gt_clip.audio[start : start + 5000])
    chunked = acc.result()
    for key in ("lipsync_corr", "best_offset_frames", "identity_drift_first", "flicker", "frames"):
        assert chunked[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), key
    assert one["identity_drift_first"] == pytest.approx(Q.identity_drift(gt_clip.frames, gt_clip.reference_image)["first"])
    assert one["flicker"] == pytest.approx(Q.flicker(gt_clip.frames), rel=1e-6)


def test_mp4_round_trip_and_bench_cli(gt_clip, tmp_path) -> None:
    from PIL import Image

    n = 100  # 4 s keep the test fast
    video = tmp_path / "clip.mp4"
    Q.write_video(str(video), gt_clip.frames[:n], gt_clip.audio[: n * 640])
    ref = tmp_path / "ref.png"
    Image.fromarray(gt_clip.reference_image).save(ref)
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "quality.py"), "--video", str(video), "--reference", str(ref)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["frames"] == n
    assert out["lipsync_corr"] > 0.85 and abs(out["best_offset_frames"]) <= 1
    assert out["identity_drift_first"] < 0.1 and out["flicker"] < 1.0


def test_bad_inputs_raise_quality_errors(gt_clip) -> None:
    with pytest.raises(Q.QualityError, match="uint8"):
        Q.flicker(gt_clip.frames.astype(np.float32))
    with pytest.raises(Q.QualityError, match="no face"):
        Q.identity_drift(gt_clip.frames, np.full((64, 64, 3), 90, np.uint8))
    with pytest.raises(Q.QualityError, match="NaN"):
        Q.lipsync(gt_clip.frames, np.full(1000, np.nan, np.float32), reference_image=gt_clip.reference_image)
    with pytest.raises(Q.QualityError, match="reference image is 64x64"):
        Q.mouth_opening(np.zeros((2, 32, 32, 3), np.uint8), gt_clip.reference_image)
    with pytest.raises(Q.QualityError, match="max_offset"):
        Q.lipsync(gt_clip.frames, gt_clip.audio, max_offset=-1, reference_image=gt_clip.reference_image)
    with pytest.raises(Q.QualityError, match="cannot open"):
        Q.evaluate_file("/nonexistent/video.mp4", gt_clip.reference_image)
