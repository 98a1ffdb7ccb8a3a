"""Video quality metrics for talking-head streams: lip sync, identity drift, flicker.

They work on any video given its frames (uint8 [T, H, W, 3]), its audio (mono float) and the
reference image the avatar was made from (uint8 [H, W, 3]). They were designed for the toy
"talking cartoon face" world (`avatarserve.toy`) and for flat-shaded faces on a smooth background
in general; on photographs they are a rough guide only. Everything is numpy.

How the face is found (`FaceReference`, from the reference image only):
  1. Background: a plane (a + b x + c y per channel) fitted robustly to a 2-pixel image border,
     so flat and linear-gradient backgrounds are modelled exactly. Foreground = pixels whose colour
     is more than `BG_TOL` (RGB distance in [0, 1] units) from the background model.
  2. Head geometry: centroid of the foreground, scale = sqrt(foreground area), aspect = std(y)/std(x).
  3. Skin colour: the median colour of a central patch, refined as the mean of all foreground
     pixels within `SKIN_TOL` of it. Hair colour: the median of the non-skin foreground left after
     erosion (eyes, brows and lips are thinner than the erosion and disappear).
  4. Mouth: in the lower part of the face, the row with the widest run of darker-than-skin pixels
     through the face's central column (the lip line, or the opening; the nose is narrower); the
     run gives the mouth width.
  5. Mouth ROI: from slightly above the lip line down to about a quarter of the face height below
     it (the jaw drops), 1.2 mouth-widths wide. Stored relative to the head centroid, in head-scale
     units, so it follows the head in each frame.

Per frame: the foreground centroid and scale place the ROI (this tracks head translation and
zoom; the ROI's margins absorb small rotations). Mouth opening = area-weighted sum over the ROI
(sub-pixel exact, via a summed-area table) of "darkness" d = clip((L_skin - L) / (0.75 L_skin),
0, 1) on foreground pixels, where L is luma and L_skin the luma of this frame's skin; minus the same sum on the
reference (closed mouth), divided by the mouth width: i.e. the mean height of the dark opening,
in units of head scale.

Audio envelope: RMS of the audio samples of each video frame in dB, floored 35 dB below the loud
(99th percentile) frames. `lipsync` is the Pearson correlation of the measured mouth opening with
that envelope, scanned over +-max_offset frames like SyncNet's offset search; offset k pairs
mouth[t + k] with audio[t], so a positive best offset means the video lags the audio.

Identity drift per frame = colour drift + shape drift, where colour drift is the RGB distance
([0, 1] units) of the mean skin and hair colours, sampled at the reference's (eroded) skin and hair
pixel positions carried along with the head, from the reference's; shape drift is
|log(scale ratio)| + |log(aspect ratio)| of the head silhouette. Head position is natural motion,
not identity, and is reported separately (`position`: centroid distance in head-scale units).
Frames where no face is found count as drift 1.0.

Flicker: mean absolute temporal second difference |p[t] - (p[t-1] + p[t+1]) / 2| of spatially
low-passed frames (box-averaged to <= 32 px), in 0..255 intensity units. Smooth motion has a
small second difference; frame-to-frame noise and popping have a large one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

FPS = 25
SAMPLE_RATE = 16000
BG_TOL = 0.12
SKIN_TOL = 0.12
ENVELOPE_RANGE_DB = 35.0
LOST_FACE_DRIFT = 1.0
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


class QualityError(ValueError):
    """Bad input to a quality metric (wrong shape/dtype, no face in the reference, bad audio...)."""


# --------------------------------------------------------------------------------------------------
# Input checks


def _check_frames(frames: Any, name: str = "frames") -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise QualityError(f"{name} must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] < 16 or frames.shape[2] < 16:
        raise QualityError(f"{name} must be at least 16x16 pixels, got {frames.shape[1]}x{frames.shape[2]}")
    return frames


def _check_image(image: Any, name: str = "reference_image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise QualityError(f"{name} must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if image.shape[0] < 16 or image.shape[1] < 16:
        raise QualityError(f"{name} must be at least 16x16 pixels, got {image.shape[0]}x{image.shape[1]}")
    return image


def _check_audio(audio: Any) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
        raise QualityError(f"audio must be mono float [N], got {audio.dtype} {audio.shape}")
    if not np.all(np.isfinite(audio)):
        raise QualityError("audio contains NaN or infinite samples")
    return audio.astype(np.float64, copy=False)


def _check_rates(fps: float, sample_rate: int) -> None:
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and 1 <= fps <= 240):
        raise QualityError(f"fps must be a number in [1, 240], got {fps!r}")
    if not (isinstance(sample_rate, (int, np.integer)) and 1000 <= sample_rate <= 192000):
        raise QualityError(f"sample_rate must be an integer in [1000, 192000], got {sample_rate!r}")


# --------------------------------------------------------------------------------------------------
# Image helpers


def _luma(x: np.ndarray) -> np.ndarray:
    return x @ _LUMA


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion with a (2r+1)^2 square; outside the image counts as False."""
    if radius <= 0:
        return mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, radius, constant_values=False)
    out = np.ones_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out &= padded[dy : dy + h, dx : dx + w]
    return out


def _fit_background(image: np.ndarray) -> np.ndarray:
    """Robust plane fit (per channel) to the image border -> background model [H, W, 3]."""
    h, w, _ = image.shape
    yy, xx = np.mgrid[0:h, 0:w]
    border = np.zeros((h, w), dtype=bool)
    border[:2] = border[-2:] = True
    border[:, :2] = border[:, -2:] = True
    design_all = np.stack([np.ones(h * w), xx.ravel() / w, yy.ravel() / h], axis=1)
    design = design_all[border.ravel()]
    values = image[border]
    keep = np.ones(values.shape[0], dtype=bool)
    for _ in range(3):  # refit without the border pixels that belong to the subject
        coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
        resid = np.linalg.norm(design @ coef - values, axis=1)
        new_keep = resid < max(0.04, 3.0 * float(np.median(resid[keep])))
        if new_keep.sum() < 0.5 * keep.size:
            break
        keep = new_keep
    return (design_all @ coef).reshape(h, w, 3).astype(np.float32)


@dataclass(frozen=True)
class FaceReference:
    """What the metrics need to know about the face in the reference image (see module doc)."""

    height: int
    width: int
    background: np.ndarray  # float32 [H, W, 3] in [0, 1]
    centre: Tuple[float, float]  # (y, x) foreground centroid, pixel units (pixel i spans [i, i+1))
    scale: float  # sqrt(foreground area), pixels
    aspect: float  # std(y) / std(x) of the foreground
    skin: np.ndarray  # [3] in [0, 1]
    hair: Optional[np.ndarray]  # [3] or None when the head has no distinct hair
    skin_offsets: np.ndarray  # [K, 2] (dy, dx) / scale of eroded skin pixels (mouth area excluded)
    hair_offsets: np.ndarray  # [M, 2]
    roi: Tuple[float, float, float, float]  # (top, bottom, left, right) relative to centre / scale
    mouth_width: float  # pixels
    baseline: float  # darkness sum inside the ROI of the reference (closed mouth), pixels^2

    @classmethod
    def from_image(cls, image: Any) -> "FaceReference":
        image = _check_image(image)
        img = image.astype(np.float32) / 255.0
        h, w, _ = img.shape
        background = _fit_background(img)
        fg = np.linalg.norm(img - background, axis=-1) > BG_TOL
        area = int(fg.sum())
        if area < 0.02 * h * w or area > 0.85 * h * w:
            raise QualityError(
                f"no face found in the reference image: the foreground covers {area / (h * w):.1%} of it "
                "(expected a head on a flat or smoothly graded background)"
            )
        ys, xs = np.nonzero(fg)
        cy, cx = float(ys.mean() + 0.5), float(xs.mean() + 0.5)
        scale = math.sqrt(area)
        if scale < 20.0:
            raise QualityError(
                f"the head in the reference image is too small to measure ({area} pixels; needs >= 400, "
                "e.g. a 48x48 or larger toy-world frame)"
            )
        aspect = float(ys.std() / max(xs.std(), 1e-6))

        # Skin: median of a central patch just below the centroid, then refined over the foreground.
        r0, r1 = int(cy - 0.05 * scale), int(cy + 0.2 * scale) + 1
        c0, c1 = int(cx - 0.12 * scale), int(cx + 0.12 * scale) + 1
        patch = img[max(r0, 0) : r1, max(c0, 0) : c1][fg[max(r0, 0) : r1, max(c0, 0) : c1]]
        if patch.shape[0] < 4:
            raise QualityError("no face found in the reference image: its centre is not foreground")
        skin0 = np.median(patch, axis=0)
        skin_mask = fg & (np.linalg.norm(img - skin0, axis=-1) < SKIN_TOL)
        if skin_mask.sum() < 0.15 * area:
            raise QualityError(
                "no face found in the reference image: no uniform skin region around its centre "
                f"({skin_mask.sum()} of {area} foreground pixels near the centre colour)"
            )
        skin = img[skin_mask].mean(axis=0)
        skin_luma = float(_luma(skin))
        if skin_luma < 0.12:
            raise QualityError(f"the face in the reference image is too dark (skin luma {skin_luma:.2f})")

        # Mouth: the row of the lower face with the widest run of darker-than-skin pixels through the
        # face's central column (the lip line, or the opening). The nose is darker too but narrower;
        # blush and eyes do not cross the central column.
        sy, sx = np.nonzero(skin_mask)
        top, bottom = np.percentile(sy, 1), np.percentile(sy, 99) + 1
        left, right = np.percentile(sx, 1), np.percentile(sx, 99) + 1
        face_h, face_w = bottom - top, right - left
        luma = _luma(img)
        candidate = fg & (luma < 0.95 * skin_luma)
        centre_col = min(max(int(cx), 0), w - 1)
        best: Optional[Tuple[int, float, int, int]] = None
        for row in range(max(int(cy), int(top + 0.4 * face_h)), min(int(math.ceil(bottom - 0.04 * face_h)), h)):
            line = candidate[row]
            if not line[centre_col]:
                continue
            lo = hi = centre_col
            while lo - 1 >= 0 and line[lo - 1]:
                lo -= 1
            while hi + 1 < w and line[hi + 1]:
                hi += 1
            strength = float(np.clip(skin_luma - luma[row, lo : hi + 1], 0, None).sum())
            if best is None or (hi - lo, strength) > (best[3] - best[2], best[1]):
                best = (row, strength, lo, hi)
        if best is None or best[3] - best[2] + 1 < max(2, 0.1 * face_w):
            raise QualityError(
                "could not locate the mouth in the reference image (no dark lip line across the lower face)"
            )
        mouth_row, _, lo, hi = best
        mouth_w = float(hi - lo + 1)
        mouth_x = (lo + hi + 1) / 2.0
        mouth_y = mouth_row + 0.5
        half_w = 0.6 * mouth_w + 1.0
        roi_px = (mouth_y - 0.06 * face_h - 1.0, mouth_y + 0.24 * face_h + 1.0, mouth_x - half_w, mouth_x + half_w)
        roi = (
            (roi_px[0] - cy) / scale,
            (roi_px[1] - cy) / scale,
            (roi_px[2] - cx) / scale,
            (roi_px[3] - cx) / scale,
        )

        # Colour templates: eroded regions, minus the area the mouth can sweep.
        erosion = max(1, int(0.035 * scale))
        yy, xx = np.mgrid[0:h, 0:w]
        mouth_zone = (
            (yy + 1 > roi_px[0] - erosion) & (yy < roi_px[1] + erosion)
            & (xx + 1 > roi_px[2] - erosion) & (xx < roi_px[3] + erosion)
        )
        skin_tmpl = _erode(skin_mask, erosion) & ~mouth_zone
        if skin_tmpl.sum() < 8:
            raise QualityError("the face in the reference image is too small to measure (fewer than 8 skin pixels)")
        other = _erode(fg & ~skin_mask, erosion) & ~mouth_zone
        hair = None
        hair_tmpl = np.zeros_like(other)
        if other.sum() >= 8:
            hair0 = np.median(img[other], axis=0)
            hair_tmpl = other & (np.linalg.norm(img - hair0, axis=-1) < SKIN_TOL)
            if hair_tmpl.sum() >= 8:
                hair = img[hair_tmpl].mean(axis=0)
            else:
                hair_tmpl = np.zeros_like(other)

        def offsets(mask: np.ndarray) -> np.ndarray:
            my, mx = np.nonzero(mask)
            return np.stack([(my + 0.5 - cy) / scale, (mx + 0.5 - cx) / scale], axis=1).astype(np.float32)

        ref = cls(
            height=h, width=w, background=background, centre=(cy, cx), scale=scale, aspect=aspect,
            skin=skin.astype(np.float32), hair=None if hair is None else hair.astype(np.float32),
            skin_offsets=offsets(skin_tmpl), hair_offsets=offsets(hair_tmpl),
            roi=roi, mouth_width=mouth_w, baseline=0.0,
        )
        measured = _measure(ref, image[None])
        baseline = float(measured["roi_darkness"][0])
        return cls(**{**ref.__dict__, "baseline": baseline})


# --------------------------------------------------------------------------------------------------
# Per-frame measurements


def _rect_sums(sat: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """Exact area-weighted sums over fractional rectangles via bilinear lookups in a summed-area table."""
    T, hp, wp = sat.shape

    def at(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        y = np.clip(y, 0, hp - 1)
        x = np.clip(x, 0, wp - 1)
        iy = np.minimum(np.floor(y).astype(np.int64), hp - 2)
        ix = np.minimum(np.floor(x).astype(np.int64), wp - 2)
        fy, fx = y - iy, x - ix
        t = np.arange(T)
        s00, s01 = sat[t, iy, ix], sat[t, iy, ix + 1]
        s10, s11 = sat[t, iy + 1, ix], sat[t, iy + 1, ix + 1]
        return (s00 * (1 - fy) * (1 - fx) + s01 * (1 - fy) * fx + s10 * fy * (1 - fx) + s11 * fy * fx)

    return at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)


def _measure(ref: FaceReference, frames: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-frame geometry, colours and mouth darkness for a chunk of frames."""
    if frames.shape[1:3] != (ref.height, ref.width):
        raise QualityError(
            f"frames are {frames.shape[1]}x{frames.shape[2]} but the reference image is {ref.height}x{ref.width}"
        )
    T, h, w, _ = frames.shape
    img = frames.astype(np.float32) / 255.0
    fg = np.linalg.norm(img - ref.background[None], axis=-1) > BG_TOL
    area = fg.sum(axis=(1, 2)).astype(np.float64)
    lost = area < 0.1 * ref.scale**2
    safe_area = np.maximum(area, 1.0)
    cy = (fg.sum(axis=2) @ (np.arange(h) + 0.5)) / safe_area
    cx = (fg.sum(axis=1) @ (np.arange(w) + 0.5)) / safe_area
    vy = (fg.sum(axis=2) @ (np.arange(h) + 0.5) ** 2) / safe_area - cy**2
    vx = (fg.sum(axis=1) @ (np.arange(w) + 0.5) ** 2) / safe_area - cx**2
    aspect = np.sqrt(np.maximum(vy, 1e-9) / np.maximum(vx, 1e-9))
    scale = np.sqrt(safe_area)
    cy = np.where(lost, ref.centre[0], cy)
    cx = np.where(lost, ref.centre[1], cx)
    scale = np.where(lost, ref.scale, scale)

    def sample(offsets: np.ndarray) -> np.ndarray:
        if offsets.shape[0] == 0:
            return np.full((T, 3), np.nan, dtype=np.float32)
        py = np.clip(np.floor(cy[:, None] + offsets[None, :, 0] * scale[:, None]), 0, h - 1).astype(np.int64)
        px = np.clip(np.floor(cx[:, None] + offsets[None, :, 1] * scale[:, None]), 0, w - 1).astype(np.int64)
        return img[np.arange(T)[:, None], py, px].mean(axis=1)

    skin = sample(ref.skin_offsets)
    hair = sample(ref.hair_offsets)

    skin_luma = np.maximum(_luma(skin), 0.05)
    luma = _luma(img)
    # Background is never mouth: the ROI's lower corners can reach past a narrow chin.
    dark = np.clip((skin_luma[:, None, None] - luma) / (0.75 * skin_luma[:, None, None]), 0.0, 1.0) * fg
    sat = np.zeros((T, h + 1, w + 1), dtype=np.float64)
    sat[:, 1:, 1:] = dark.cumsum(axis=1).cumsum(axis=2)
    top, bottom, left, right = ref.roi
    sums = _rect_sums(sat, cy + top * scale, cy + bottom * scale, cx + left * scale, cx + right * scale)
    rel = scale / ref.scale
    roi_darkness = sums / rel**2  # back to reference pixel units
    return {
        "lost": lost,
        "centre_y": cy,
        "centre_x": cx,
        "scale": scale,
        "aspect": aspect,
        "skin": skin,
        "hair": hair,
        "roi_darkness": roi_darkness,
    }


def _opening(ref: FaceReference, measured: Dict[str, np.ndarray]) -> np.ndarray:
    opening = (measured["roi_darkness"] - ref.baseline) / max(ref.mouth_width, 1.0) / ref.scale
    return np.where(measured["lost"], np.nan, opening)


def _drift_parts(ref: FaceReference, m: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    colour = np.linalg.norm(m["skin"] - ref.skin[None], axis=1)
    if ref.hair is not None:
        colour = 0.5 * (colour + np.linalg.norm(m["hair"] - ref.hair[None], axis=1))
    shape = np.abs(np.log(m["scale"] / ref.scale)) + np.abs(np.log(m["aspect"] / ref.aspect))
    position = np.hypot(m["centre_y"] - ref.centre[0], m["centre_x"] - ref.centre[1]) / ref.scale
    lost = m["lost"]
    return {
        "colour": np.where(lost, LOST_FACE_DRIFT, colour),
        "shape": np.where(lost, LOST_FACE_DRIFT, shape),
        "position": np.where(lost, LOST_FACE_DRIFT, position),
        "total": np.where(lost, LOST_FACE_DRIFT, colour + shape),
    }


def _pool(frames: np.ndarray) -> np.ndarray:
    """Box low-pass: average k x k blocks so the result is at most ~32 px on its short side."""
    T, h, w, _ = frames.shape
    k = max(1, min(h, w) // 32)
    hh, ww = (h // k) * k, (w // k) * k
    x = frames[:, :hh, :ww].astype(np.float32)
    return x.reshape(T, hh // k, k, ww // k, k, 3).mean(axis=(2, 4))


# --------------------------------------------------------------------------------------------------
# Audio envelope and correlation


def audio_envelope(audio: Any, num_frames: int, fps: float = FPS, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Per-video-frame loudness in dB (RMS of the frame's samples), floored 35 dB under the loud frames.

    Frame t owns samples [round(t sr / fps), round((t + 1) sr / fps)); frames past the end of the
    audio count as silence.
    """
    audio = _check_audio(audio)
    _check_rates(fps, sample_rate)
    bounds = np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(np.int64)
    power = np.concatenate([[0.0], np.cumsum(audio * audio)])
    b = np.minimum(bounds, audio.size)
    energy = power[b[1:]] - power[b[:-1]]
    count = np.maximum(bounds[1:] - bounds[:-1], 1)
    db = 10.0 * np.log10(np.maximum(energy / count, 1e-14))
    if num_frames == 0:
        return db
    top = float(np.percentile(db, 99))
    return np.maximum(db, top - ENVELOPE_RANGE_DB)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3:
        return 0.0
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    # A constant signal (frozen mouth, silent audio) carries no sync information: report 0.
    if denom < 1e-12 or np.std(a) < 1e-6 or np.std(b) < 1e-6:
        return 0.0
    return float(a @ b / denom)


def lipsync_from_signals(mouth: np.ndarray, envelope: np.ndarray, max_offset: int = 5) -> Dict[str, Any]:
    """Offset-scanned Pearson correlation of a mouth-opening track with an audio envelope."""
    if isinstance(max_offset, bool) or not isinstance(max_offset, (int, np.integer)) or max_offset < 0:
        raise QualityError(f"max_offset must be a non-negative integer, got {max_offset!r}")
    n = min(len(mouth), len(envelope))
    mouth = np.asarray(mouth, dtype=np.float64)[:n]
    envelope = np.asarray(envelope, dtype=np.float64)[:n]
    by_offset: Dict[int, float] = {}
    for k in range(-int(max_offset), int(max_offset) + 1):
        if k >= 0:
            by_offset[k] = _pearson(mouth[k:], envelope[: n - k])
        else:
            by_offset[k] = _pearson(mouth[: n + k], envelope[-k:])
    best = max(by_offset, key=lambda k: (by_offset[k], -abs(k)))
    return {
        "corr": by_offset[0],
        "corr_best": by_offset[best],
        "best_offset_frames": int(best),
        "corr_by_offset": by_offset,
        "frames": int(n),
    }


# --------------------------------------------------------------------------------------------------
# Public metrics


def mouth_opening(frames: Any, reference_image: Any) -> np.ndarray:
    """Measured mouth opening per frame ([T], head-scale units; NaN where no face is found)."""
    frames = _check_frames(frames)
    ref = FaceReference.from_image(reference_image)
    return _opening(ref, _measure(ref, frames))


def lipsync(
    frames: Any,
    audio: Any,
    fps: float = FPS,
    sr: int = SAMPLE_RATE,
    max_offset: int = 5,
    reference_image: Any = None,
) -> Dict[str, Any]:
    """Lip-sync score: {corr (offset 0), corr_best, best_offset_frames, corr_by_offset, frames}.

    Without `reference_image` the first frame is the reference (only its geometry matters here).
    """
    frames = _check_frames(frames)
    ref_img = frames[0] if reference_image is None else reference_image
    opening = mouth_opening(frames, ref_img)
    envelope = audio_envelope(audio, frames.shape[0], fps, sr)
    return lipsync_from_signals(opening, envelope, max_offset)


def _window_stats(parts: Dict[str, np.ndarray], window: int) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for key, values in parts.items():
        out[f"{key}_first"] = float(np.mean(values[:window])) if values.size else float("nan")
        out[f"{key}_last"] = float(np.mean(values[-window:])) if values.size else float("nan")
    out["first"] = out.pop("total_first")
    out["last"] = out.pop("total_last")
    return out


def identity_drift(frames: Any, reference_image: Any, window: int = 10 * FPS) -> Dict[str, Any]:
    """Identity drift: mean over the first and the last `window` frames (default 10 s at 25 fps).

    Returns {first, last, colour_first, colour_last, shape_first, shape_last, position_first,
    position_last, lost_frames, per_frame: {total, colour, shape, position}}.
    """
    frames = _check_frames(frames)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise QualityError(f"window must be a positive number of frames, got {window!r}")
    ref = FaceReference.from_image(reference_image)
    measured = _measure(ref, frames)
    parts = _drift_parts(ref, measured)
    result: Dict[str, Any] = _window_stats(parts, int(window))
    result["lost_frames"] = int(measured["lost"].sum())
    result["per_frame"] = parts
    return result


def flicker(frames: Any) -> float:
    """Temporal flicker: mean |p[t] - (p[t-1] + p[t+1]) / 2| of low-passed frames, 0..255 units."""
    frames = _check_frames(frames)
    if frames.shape[0] < 3:
        raise QualityError(f"flicker needs at least 3 frames, got {frames.shape[0]}")
    p = _pool(frames)
    return float(np.mean(np.abs(p[1:-1] - 0.5 * (p[:-2] + p[2:]))))


class QualityAccumulator:
    """Streaming evaluation: feed (frames, audio) chunk by chunk, then `result()`.

    Only per-frame scalars (and the last two low-passed frames) are kept, so a 10-minute stream is
    evaluated in constant memory. Audio chunks need not line up with frame chunks.
    """

    def __init__(self, reference_image: Any, fps: float = FPS, sample_rate: int = SAMPLE_RATE) -> None:
        _check_rates(fps, sample_rate)
        self.reference = FaceReference.from_image(reference_image)
        self.fps = float(fps)
        self.sample_rate = int(sample_rate)
        self._measured: List[Dict[str, np.ndarray]] = []
        self._audio_parts: List[np.ndarray] = []
        self._tail: Optional[np.ndarray] = None  # last two pooled frames
        self._flicker_sum = 0.0
        self._flicker_count = 0
        self.num_frames = 0

    def update(self, frames: Any, audio: Any = None) -> None:
        frames = _check_frames(frames)
        if audio is not None:
            self._audio_parts.append(_check_audio(audio).astype(np.float32))
        if frames.shape[0] == 0:
            return
        m = _measure(self.reference, frames)
        self._measured.append(
            {"opening": _opening(self.reference, m), **{k: v for k, v in _drift_parts(self.reference, m).items()}}
        )
        pooled = _pool(frames)
        seq = pooled if self._tail is None else np.concatenate([self._tail, pooled])
        if seq.shape[0] >= 3:
            diff = np.abs(seq[1:-1] - 0.5 * (seq[:-2] + seq[2:]))
            self._flicker_sum += float(diff.sum(dtype=np.float64))
            self._flicker_count += diff.size
        self._tail = seq[-2:]
        self.num_frames += frames.shape[0]

    def result(self, window_seconds: float = 10.0, max_offset: int = 5) -> Dict[str, Any]:
        if self.num_frames == 0:
            raise QualityError("no frames were evaluated")
        per = {k: np.concatenate([m[k] for m in self._measured]) for k in self._measured[0]}
        audio = np.concatenate(self._audio_parts) if self._audio_parts else np.zeros(0)
        # Only frames fully covered by audio take part in the lip-sync score.
        audio_frames = int(min(self.num_frames, math.floor(audio.size * self.fps / self.sample_rate + 1e-9)))
        envelope = audio_envelope(audio, audio_frames, self.fps, self.sample_rate)
        sync = lipsync_from_signals(per["opening"][:audio_frames], envelope, max_offset)
        window = max(1, int(round(window_seconds * self.fps)))
        drift = _window_stats({k: per[k] for k in ("total", "colour", "shape", "position")}, window)
        return {
            "frames": self.num_frames,
            "seconds": self.num_frames / self.fps,
            "lipsync_corr": sync["corr"],
            "lipsync_corr_best": sync["corr_best"],
            "best_offset_frames": sync["best_offset_frames"],
            "corr_by_offset": {str(k): v for k, v in sync["corr_by_offset"].items()},
            "identity_drift_first": drift["first"],
            "identity_drift_last": drift["last"],
            "identity_drift_parts": {k: v for k, v in drift.items() if k not in ("first", "last")},
            "drift_window_seconds": window / self.fps,
            "flicker": self._flicker_sum / self._flicker_count if self._flicker_count else float("nan"),
            "face_lost_frames": int(np.isnan(per["opening"]).sum()),
        }


def evaluate_video(
    frames: Any,
    audio: Any,
    reference_image: Any,
    fps: float = FPS,
    sample_rate: int = SAMPLE_RATE,
    window_seconds: float = 10.0,
    max_offset: int = 5,
) -> Dict[str, Any]:
    """All metrics for one video (see `QualityAccumulator.result` for the keys)."""
    acc = QualityAccumulator(reference_image, fps, sample_rate)
    acc.update(frames, audio)
    return acc.result(window_seconds=window_seconds, max_offset=max_offset)


# --------------------------------------------------------------------------------------------------
# Files


def read_audio(path: str, sample_rate: int = SAMPLE_RATE) -> Tuple[np.ndarray, float]:
    """Decode a file's first audio stream to mono float32 at `sample_rate`; returns (audio, start_s)."""
    import av  # local: only file evaluation needs PyAV

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as exc:
        raise QualityError(f"cannot open {path!r}: {exc}") from exc
    with container:
        if not container.streams.audio:
            raise QualityError(f"{path!r} has no audio stream")
        stream = container.streams.audio[0]
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        parts: List[np.ndarray] = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            parts.append(out.to_ndarray().reshape(-1))
    audio = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, dtype=np.float32)
    return audio, start


def iter_video_frames(path: str, chunk_frames: int = 250):
    """Yield (fps, uint8 [t, H, W, 3] chunk) pairs from a file's first video stream."""
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as exc:
        raise QualityError(f"cannot open {path!r}: {exc}") from exc
    with container:
        if not container.streams.video:
            raise QualityError(f"{path!r} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise QualityError(f"{path!r}: cannot determine the video frame rate")
        fps = float(rate)
        buf: List[np.ndarray] = []
        for frame in container.decode(stream):
            buf.append(frame.to_ndarray(format="rgb24"))
            if len(buf) == chunk_frames:
                yield fps, np.stack(buf)
                buf = []
        if buf:
            yield fps, np.stack(buf)


def _video_start(path: str) -> float:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise QualityError(f"{path!r} has no video stream")
        s = container.streams.video[0]
        return float(s.start_time * s.time_base) if s.start_time is not None else 0.0


def evaluate_file(
    path: str,
    reference_image: Any,
    sample_rate: int = SAMPLE_RATE,
    window_seconds: float = 10.0,
    max_offset: int = 5,
) -> Dict[str, Any]:
    """Evaluate a video file with audio (e.g. mp4) in constant memory for its frames."""
    audio, audio_start = read_audio(path, sample_rate)
    offset = int(round((audio_start - _video_start(path)) * sample_rate))
    # Line the audio up with the first video frame (streams may start at different times).
    if offset > 0:
        audio = np.concatenate([np.zeros(offset, dtype=np.float32), audio])
    elif offset < 0:
        audio = audio[-offset:]
    acc: Optional[QualityAccumulator] = None
    for fps, chunk in iter_video_frames(path):
        if acc is None:
            acc = QualityAccumulator(reference_image, fps, sample_rate)
            acc.update(chunk[:0], audio)
        acc.update(chunk)
    if acc is None:
        raise QualityError(f"{path!r} has no decodable video frames")
    return acc.result(window_seconds=window_seconds, max_offset=max_offset)


def write_video(
    path: str,
    frames: Any,
    audio: Any,
    fps: int = FPS,
    sample_rate: int = SAMPLE_RATE,
    crf: int = 18,
) -> None:
    """Write frames (H.264, yuv420p) and mono audio (AAC) to an mp4, e.g. to look at or re-evaluate."""
    import av
    from fractions import Fraction

    frames = _check_frames(frames)
    audio = _check_audio(audio).astype(np.float32)
    _check_rates(fps, sample_rate)
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise QualityError(f"H.264 needs even frame sizes, got {frames.shape[2]}x{frames.shape[1]}")
    with av.open(path, "w") as container:
        vstream = container.add_stream("libx264", rate=Fraction(int(fps)))
        vstream.width, vstream.height = frames.shape[2], frames.shape[1]
        vstream.pix_fmt = "yuv420p"
        vstream.options = {"crf": str(crf)}
        astream = container.add_stream("aac", rate=int(sample_rate))
        astream.layout = "mono"
        for image in frames:
            for packet in vstream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in vstream.encode(None):
            container.mux(packet)
        step = 1024
        for start in range(0, audio.size, step):
            chunk = audio[start : start + step]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
            frame.sample_rate = int(sample_rate)
            frame.pts = start
            frame.time_base = Fraction(1, int(sample_rate))
            for packet in astream.encode(frame):
                container.mux(packet)
        for packet in astream.encode(None):
            container.mux(packet)
