"""The toy world: determinism, chunking, ground-truth mouth, blinks, sway, identities, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avatarserve.toy import (
    HAIR_STYLES,
    EspeakNotFoundError,
    ToyWorldError,
    make_clip,
    make_stream,
    render,
    sample_identity,
)
from avatarserve.toy.faces import BlinkSchedule, HeadMotion, MouthFollower, frame_rms
from avatarserve.toy.speech import resample


def test_same_seed_gives_identical_bytes_and_other_seeds_differ() -> None:
    a, b, c = make_clip(123, 2.0), make_clip(123, 2.0), make_clip(124, 2.0)
    assert a.frames.tobytes() == b.frames.tobytes()
    assert a.audio.tobytes() == b.audio.tobytes()
    assert a.mouth_open.tobytes() == b.mouth_open.tobytes()
    assert a.texts == b.texts and a.identity == b.identity
    assert a.frames.tobytes() != c.frames.tobytes()
    assert a.audio.tobytes() != c.audio.tobytes()


def test_clip_layout() -> None:
    clip = make_clip(7, 2.0, size=48)
    assert clip.frames.shape == (50, 48, 48, 3) and clip.frames.dtype == np.uint8
    assert clip.audio.shape == (50 * 640,) and clip.audio.dtype == np.float32
    assert clip.mouth_open.shape == clip.eye_open.shape == (50,)
    assert clip.head_pose.shape == (50, 3)
    assert clip.reference_image.shape == (48, 48, 3) and clip.reference_image.dtype == np.uint8
    assert 0.0 <= clip.mouth_open.min() and clip.mouth_open.max() <= 1.0
    # Audio lies on the int16 grid, so 16-bit PCM storage is lossless.
    pcm = clip.audio.astype(np.float64) * 32767.0
    assert np.allclose(pcm, np.round(pcm), atol=1e-3)
    assert np.abs(clip.audio).max() <= 1.0


def test_reference_is_rest_pose_with_open_eyes_and_closed_mouth() -> None:
    clip = make_clip(11, 1.0)
    expected = render(clip.identity, 64, np.zeros((1, 3)), np.ones(1), np.zeros(1))[0]
    assert np.array_equal(clip.reference_image, expected)
    opened = render(clip.identity, 64, np.zeros((1, 3)), np.ones(1), np.ones(1))[0]
    assert np.abs(opened.astype(int) - expected).sum() > 1000  # the mouth is visible


def test_stream_chunks_concatenate_to_the_clip() -> None:
    clip = make_clip(5, 3.1)
    chunks = list(make_stream(5, 3.1, chunk_seconds=0.44))
    assert [c.start_frame for c in chunks] == list(range(0, 78, 11))
    for name in ("frames", "audio", "mouth_open", "eye_open", "head_pose"):
        joined = np.concatenate([getattr(c, name) for c in chunks])
        assert joined.tobytes() == getattr(clip, name).tobytes(), name


def _frame_db(audio: np.ndarray) -> np.ndarray:
    return 20 * np.log10(np.maximum(frame_rms(audio, 640), 1e-7))


def test_mouth_follows_the_speech_envelope(gt_clip) -> None:
    db = _frame_db(gt_clip.audio)
    assert np.corrcoef(gt_clip.mouth_open, db)[0, 1] > 0.9
    quiet = db < gt_clip.voice.noise_dbfs + 8  # silence gaps: only the noise floor
    loud = db > gt_clip.voice.peak_dbfs - 20
    assert quiet.sum() > 10 and loud.sum() > 10
    assert gt_clip.mouth_open[quiet].mean() < 0.05
    assert gt_clip.mouth_open[loud].mean() > 0.5


def test_mouth_attacks_faster_than_it_releases() -> None:
    follower = MouthFollower(peak_dbfs=-3.0)
    loud, silent = 10 ** (-13 / 20), 1e-5
    track = follower(np.asarray([silent] * 3 + [loud] * 4 + [silent] * 4))
    assert track[2] == 0.0
    assert track[3] > 0.75  # one frame after onset: almost fully open
    assert 0.3 < track[7] < 0.75  # one frame after offset: still closing
    assert 0.0 < track[10] < 0.1  # ~2-frame release time constant: 0.55 ** 4 left
    # State carries over calls: streaming equals one call.
    again = MouthFollower(peak_dbfs=-3.0)
    split = np.concatenate([again(np.asarray([silent] * 3 + [loud] * 2)), again(np.asarray([loud] * 2 + [silent] * 4))])
    assert np.array_equal(split, track)


def test_blinks_happen_at_natural_intervals() -> None:
    eyes = BlinkSchedule(3).eye_open(0, 60 * 25)
    closed = eyes < 0.5
    onsets = np.nonzero(closed[1:] & ~closed[:-1])[0] + 1
    assert 8 <= onsets.size <= 35  # one every ~2-6 s, sometimes doubled
    assert eyes.min() == 0.0 and eyes.max() == 1.0
    assert (eyes == 1.0).mean() > 0.9
    # Chunked evaluation equals one call.
    sched = BlinkSchedule(3)
    assert np.array_equal(np.concatenate([sched.eye_open(s, 100) for s in range(0, 1500, 100)]), eyes)


def test_head_motion_is_small_and_smooth() -> None:
    pose = HeadMotion(9).pose(0, 25 * 60)
    assert np.all(np.abs(pose) <= np.asarray(HeadMotion.AMPLITUDE) + 1e-12)
    assert np.abs(pose[:, 2]).max() > math.radians(0.3)  # it does move
    step = np.abs(np.diff(pose, axis=0)).max(axis=0)
    assert np.all(step < np.asarray(HeadMotion.AMPLITUDE) * 0.1)


def test_identities_vary_and_stay_separable() -> None:
    people = [sample_identity(s) for s in range(60)]
    assert {p.hair_style for p in people} == set(HAIR_STYLES)
    assert len({p.skin for p in people}) == 60
    assert np.std([p.face_aspect for p in people]) > 0.03
    for p in people:
        for bg in (p.background_a, p.background_b):
            assert np.linalg.norm(np.subtract(bg, p.skin)) >= 0.35
        assert np.linalg.norm(np.subtract(p.lips, p.skin)) >= 0.18


def test_resample_preserves_a_tone() -> None:
    t = np.arange(22050) / 22050
    out = resample(np.sin(2 * np.pi * 440 * t), 22050, 16000)
    assert out.size == 16000
    ref = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(out[1000:-1000] - ref[1000:-1000]).max() < 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seed": -1, "seconds": 1.0},
        {"seed": 1.5, "seconds": 1.0},
        {"seed": 1, "seconds": 0.0},
        {"seed": 1, "seconds": float("nan")},
        {"seed": 1, "seconds": 0.01},
        {"seed": 1, "seconds": 1.0, "size": 8},
        {"seed": 1, "seconds": 1.0, "size": 64.0},
    ],
)
def test_bad_arguments_raise_typed_errors(kwargs) -> None:
    with pytest.raises(ToyWorldError):
        make_clip(**kwargs)


def test_missing_espeak_raises_a_clear_typed_error(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("AVATARSERVE_ESPEAK", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EspeakNotFoundError, match="espeak-ng"):
        make_clip(1, 1.0)
    monkeypatch.setenv("AVATARSERVE_ESPEAK", str(tmp_path / "nope"))
    with pytest.raises(EspeakNotFoundError, match="AVATARSERVE_ESPEAK"):
        make_clip(1, 1.0)
