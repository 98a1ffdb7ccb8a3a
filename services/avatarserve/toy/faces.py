"""Procedural cartoon faces: identities, head motion, blinks, the speech-driven mouth, rendering.

Geometry lives in normalised image coordinates: x and y run over [-1, 1] across the image (y points
down), so one identity looks the same at any resolution. A face is drawn in its rest pose; per
frame the head is rotated about a pivot under the chin and translated (`HeadMotion`), the eyes
close on blinks (`BlinkSchedule`) and the mouth opens with the speech envelope (`MouthFollower`).
Shapes are anti-aliased analytically (signed distance to each ellipse), all frames of a chunk at
once with numpy; small features are evaluated only inside their bounding window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from avatarserve.toy.errors import ToyWorldError

FPS = 25
HAIR_STYLES = ("short", "long", "bun", "bald", "curly")

_IDENTITY_KEY = 201
_MOTION_KEY = 202
_BLINK_KEY = 203

Colour = Tuple[float, float, float]

# Base palettes (sRGB in [0, 1]); identities jitter around them.
_SKIN_TONES = (
    (1.00, 0.88, 0.77), (0.96, 0.80, 0.66), (0.94, 0.76, 0.49), (0.88, 0.67, 0.41),
    (0.78, 0.53, 0.26), (0.62, 0.40, 0.22), (0.50, 0.33, 0.21), (1.00, 0.80, 0.71),
)
_FANTASY_SKIN = ((0.62, 0.85, 0.55), (0.60, 0.75, 0.95), (0.80, 0.70, 0.95))
_HAIR = (
    (0.12, 0.10, 0.10), (0.27, 0.18, 0.12), (0.47, 0.31, 0.18), (0.86, 0.75, 0.43),
    (0.67, 0.27, 0.14), (0.63, 0.63, 0.65), (0.90, 0.90, 0.90),
)
_FANTASY_HAIR = ((0.24, 0.35, 0.78), (0.90, 0.43, 0.67), (0.47, 0.24, 0.63), (0.24, 0.59, 0.31))
_EYES = ((0.35, 0.20, 0.10), (0.20, 0.45, 0.80), (0.25, 0.55, 0.30), (0.45, 0.50, 0.55), (0.55, 0.45, 0.20))
_MOUTH_INSIDE = (0.16, 0.03, 0.06)
_EYE_WHITE = (0.97, 0.97, 0.95)
_PUPIL = (0.04, 0.04, 0.05)


def _dist(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


def _jitter(rng: np.random.Generator, colour: Sequence[float], amount: float) -> Colour:
    c = np.clip(np.asarray(colour) + rng.uniform(-amount, amount, 3), 0.0, 1.0)
    return tuple(float(round(v, 4)) for v in c)  # type: ignore[return-value]


def _hsv_to_rgb(h: float, s: float, v: float) -> Colour:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return tuple(float(round(c, 4)) for c in rgb)  # type: ignore[return-value]


@dataclass(frozen=True)
class Identity:
    """Everything that makes one cartoon person look like themselves."""

    skin: Colour
    hair: Colour
    eyes: Colour
    lips: Colour
    background_a: Colour
    background_b: Colour  # second gradient colour (equal to background_a: flat background)
    background_angle: float  # gradient direction, radians
    hair_style: str
    face_width: float  # ellipse semi-axis in x, normalised units
    face_aspect: float  # semi-axis y / semi-axis x
    face_cy: float  # face centre y at rest
    eye_spacing: float  # eye centre |x| as a fraction of face_width
    eye_size: float  # eye scale factor
    mouth_width: float  # mouth semi-width as a fraction of face_width
    blush: bool

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Identity":
        try:
            kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
            identity = cls(**kwargs)
        except TypeError as exc:
            raise ToyWorldError(f"malformed identity {data!r}: {exc}") from exc
        if identity.hair_style not in HAIR_STYLES:
            raise ToyWorldError(f"unknown hair_style {identity.hair_style!r}; known: {HAIR_STYLES}")
        return identity

    @property
    def face_height(self) -> float:
        return self.face_width * self.face_aspect


def sample_identity(seed: int) -> Identity:
    """The cartoon person of `seed`. Colours are kept apart so face, hair and background separate."""
    rng = np.random.default_rng([seed, _IDENTITY_KEY])
    base = _FANTASY_SKIN if rng.random() < 0.06 else _SKIN_TONES
    skin = _jitter(rng, base[int(rng.integers(len(base)))], 0.04)
    for _ in range(100):
        hairs = _FANTASY_HAIR if rng.random() < 0.15 else _HAIR
        hair = _jitter(rng, hairs[int(rng.integers(len(hairs)))], 0.05)
        if _dist(hair, skin) >= 0.35:
            break
    eyes = _jitter(rng, _EYES[int(rng.integers(len(_EYES)))], 0.05)
    # Lips: a darker, redder skin, kept visibly apart from it so the closed mouth shows a lip line.
    lips_rgb = np.clip(0.55 * np.asarray(skin) + np.asarray((0.25, 0.02, 0.05)), 0.0, 1.0)
    while _dist(lips_rgb, skin) < 0.18:
        lips_rgb = lips_rgb * 0.85
    lips = tuple(float(round(v, 4)) for v in lips_rgb)
    for _ in range(1000):
        bg_a = _hsv_to_rgb(rng.random(), rng.uniform(0.15, 0.7), rng.uniform(0.3, 0.95))
        if rng.random() < 0.6:
            shift = rng.uniform(-0.25, 0.25)
            bg_b = tuple(float(round(min(max(c + shift, 0.0), 1.0), 4)) for c in bg_a)
        else:
            bg_b = bg_a
        if all(_dist(bg, other) >= 0.35 for bg in (bg_a, bg_b) for other in (skin, hair, lips)):
            break
    return Identity(
        skin=skin,
        hair=hair,
        eyes=eyes,
        lips=lips,  # type: ignore[arg-type]
        background_a=bg_a,
        background_b=bg_b,  # type: ignore[arg-type]
        background_angle=float(round(rng.uniform(0, 2 * math.pi), 4)),
        hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
        face_width=float(round(rng.uniform(0.40, 0.50), 4)),
        face_aspect=float(round(rng.uniform(1.1, 1.32), 4)),
        face_cy=float(round(rng.uniform(0.06, 0.14), 4)),
        eye_spacing=float(round(rng.uniform(0.34, 0.42), 4)),
        eye_size=float(round(rng.uniform(0.85, 1.2), 4)),
        mouth_width=float(round(rng.uniform(0.28, 0.38), 4)),
        blush=bool(rng.random() < 0.4),
    )


class HeadMotion:
    """Slow, smooth head sway: a sum of three low-frequency sinusoids per degree of freedom."""

    # Peak amplitudes: translation in normalised units (0.03 = ~1 px at 64x64), rotation in radians.
    AMPLITUDE = (0.035, 0.025, math.radians(3.0))

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, _MOTION_KEY])
        self._freq = rng.uniform(0.04, 0.35, (3, 3))  # Hz
        self._phase = rng.uniform(0, 2 * math.pi, (3, 3))
        weights = rng.uniform(0.3, 1.0, (3, 3))
        self._amp = weights / weights.sum(axis=1, keepdims=True) * np.asarray(self.AMPLITUDE)[:, None]

    def pose(self, frame_start: int, num_frames: int, fps: int = FPS) -> np.ndarray:
        """[num_frames, 3] = (dx, dy, angle) for frames frame_start..frame_start+num_frames-1."""
        # Scalar math.sin, not np.sin: vectorised transcendental kernels may round differently
        # depending on array length, and a stream must not depend on how it is chunked.
        out = np.zeros((num_frames, 3))
        for i in range(num_frames):
            t = (frame_start + i) / fps
            for k in range(3):
                out[i, k] = sum(
                    self._amp[k, j] * math.sin(2 * math.pi * self._freq[k, j] * t + self._phase[k, j]) for j in range(3)
                )
        return out


class BlinkSchedule:
    """Blinks at random intervals (2-6 s, sometimes a double blink); eye openness per frame."""

    CLOSE_S, HOLD_S, OPEN_S = 0.06, 0.04, 0.12

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng([seed, _BLINK_KEY])
        self._starts: List[float] = [float(self._rng.uniform(0.5, 4.0))]

    def _extend(self, until_s: float) -> None:
        while self._starts[-1] < until_s + 1.0:
            if self._rng.random() < 0.1:
                gap = self._rng.uniform(0.3, 0.45)
            else:
                gap = self._rng.uniform(2.0, 6.0)
            self._starts.append(self._starts[-1] + float(gap))

    def eye_open(self, frame_start: int, num_frames: int, fps: int = FPS) -> np.ndarray:
        """[num_frames] in [0, 1]; 1 = open."""
        t = (frame_start + np.arange(num_frames)) / fps
        self._extend(float(t[-1]) if num_frames else 0.0)
        openness = np.ones(num_frames)
        total = self.CLOSE_S + self.HOLD_S + self.OPEN_S
        starts = np.asarray(self._starts)
        for s in starts[(starts <= (t[-1] if num_frames else 0)) & (starts + total >= (t[0] if num_frames else 0))]:
            tau = t - s
            shape = np.ones(num_frames)
            closing = (tau >= 0) & (tau < self.CLOSE_S)
            shape[closing] = 1.0 - tau[closing] / self.CLOSE_S
            held = (tau >= self.CLOSE_S) & (tau < self.CLOSE_S + self.HOLD_S)
            shape[held] = 0.0
            opening = (tau >= self.CLOSE_S + self.HOLD_S) & (tau < total)
            shape[opening] = (tau[opening] - self.CLOSE_S - self.HOLD_S) / self.OPEN_S
            openness = np.minimum(openness, shape)
        return openness


def frame_rms(audio: np.ndarray, samples_per_frame: int) -> np.ndarray:
    """RMS of each non-overlapping video-frame window of audio ([len // spf])."""
    n = audio.size // samples_per_frame
    x = audio[: n * samples_per_frame].astype(np.float64).reshape(n, samples_per_frame)
    return np.sqrt(np.mean(x * x, axis=1))


class MouthFollower:
    """Mouth opening from loudness: a dB envelope follower with fast attack and slower release.

    The opening is linear in the followed level between `floor_db` (closed) and `full_db` (fully
    open); both are relative to the speaker's peak level so quiet and loud speakers both articulate.
    State carries across calls, so streaming chunk by chunk gives the same track as one call.
    """

    ATTACK = 0.85  # fraction of the gap closed per frame when getting louder (~1 frame)
    RELEASE = 0.45  # ... when getting quieter (~2 frames, the jaw closes more slowly)

    def __init__(self, peak_dbfs: float) -> None:
        self.floor_db = peak_dbfs - 40.0
        self.full_db = peak_dbfs - 10.0
        self._level = self.floor_db

    def __call__(self, rms: np.ndarray) -> np.ndarray:
        out = np.empty(rms.size)
        level = self._level
        for i, r in enumerate(rms):
            # Quieter than the floor is just "closed": the jaw cannot close further, so a deep
            # silence does not slow the next opening down.
            x = max(20.0 * math.log10(max(float(r), 1e-7)), self.floor_db)
            level += (self.ATTACK if x > level else self.RELEASE) * (x - level)
            out[i] = level
        self._level = level
        return np.clip((out - self.floor_db) / (self.full_db - self.floor_db), 0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Rendering


class _Canvas:
    """Frames [T, H, W, 3] (float32) plus the pixel grid and per-frame head pose."""

    def __init__(self, size: int, pose: np.ndarray, pivot: Tuple[float, float]) -> None:
        self.size = size
        self.px = 2.0 / size
        self.grid = (-1.0 + (np.arange(size, dtype=np.float32) + 0.5) * self.px).astype(np.float32)
        self.T = pose.shape[0]
        self.pose = pose.astype(np.float32)
        self.pivot = pivot
        self.img = np.zeros((self.T, size, size, 3), dtype=np.float32)
        angles = pose[:, 2].tolist()
        self.cos = np.asarray([math.cos(a) for a in angles], dtype=np.float32)[:, None, None]
        self.sin = np.asarray([math.sin(a) for a in angles], dtype=np.float32)[:, None, None]
        # Feature windows are sized for the largest sway of the toy world (or of this chunk, if
        # larger), so they do not depend on how a stream is chunked.
        amp = np.asarray(HeadMotion.AMPLITUDE)
        seen = np.abs(self.pose).max(axis=0) if self.T else np.zeros(3)
        self.max_shift = float(math.hypot(max(amp[0], seen[0]), max(amp[1], seen[1])))
        self.max_angle = float(max(amp[2], seen[2]))

    def window(self, x: float, y: float, radius: float) -> Tuple[slice, slice]:
        """Pixel window covering a feature of `radius` around rest point (x, y) in any frame."""
        sway = self.max_shift + math.hypot(x - self.pivot[0], y - self.pivot[1]) * self.max_angle
        pad = radius + sway + 2 * self.px

        def span(lo: float, hi: float) -> slice:
            a = int(math.floor((lo + 1.0) / self.px))
            b = int(math.ceil((hi + 1.0) / self.px)) + 1
            return slice(max(a, 0), min(max(b, 0), self.size))

        return span(y - pad, y + pad), span(x - pad, x + pad)

    def head_coords(self, rows: slice, cols: slice) -> Tuple[np.ndarray, np.ndarray]:
        """Rest-pose coordinates [T, h, w] of the pixels in the window (inverse head transform)."""
        gx = self.grid[cols][None, None, :] - self.pose[:, 0, None, None] - self.pivot[0]
        gy = self.grid[rows][None, :, None] - self.pose[:, 1, None, None] - self.pivot[1]
        hx = self.cos * gx + self.sin * gy + self.pivot[0]
        hy = -self.sin * gx + self.cos * gy + self.pivot[1]
        return hx, hy

    def paint(self, rows: slice, cols: slice, alpha: np.ndarray, colour: Sequence[float]) -> None:
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return
        a = alpha[..., None].astype(np.float32)
        region = self.img[:, rows, cols]
        region += a * (np.asarray(colour, dtype=np.float32) - region)


def _ellipse_alpha(
    x: np.ndarray, y: np.ndarray, cx: Any, cy: Any, a: Any, b: Any, px: float, wobble: Any = None
) -> np.ndarray:
    """Anti-aliased coverage of an ellipse (first-order signed distance of f = q^2 - 1).

    a, b may be per-frame arrays [T, 1, 1]; shapes thinner than a pixel get partial coverage.
    `wobble(dx, dy)` optionally scales the radius with the polar angle (curly outlines).
    """
    dx = (x - cx) / a
    dy = (y - cy) / b
    q2 = dx * dx + dy * dy
    if wobble is not None:
        q2 = q2 / wobble(dx, dy) ** 2
    grad = 2.0 * np.sqrt((dx / a) ** 2 + (dy / b) ** 2) + 1e-12
    dist = (q2 - 1.0) / grad
    alpha = np.clip(0.5 - dist / px, 0.0, 1.0)
    thin = np.minimum(1.0, 2.0 * np.minimum(a, b) / px)
    return alpha * thin


def _smoothstep(edge: np.ndarray, px: float) -> np.ndarray:
    """Coverage of the half-plane value < 0 with a one-pixel anti-aliased edge."""
    return np.clip(0.5 - edge / px, 0.0, 1.0)


def _background(identity: Identity, size: int) -> np.ndarray:
    g = -1.0 + (np.arange(size) + 0.5) * 2.0 / size
    gx, gy = np.meshgrid(g, g)
    proj = (math.cos(identity.background_angle) * gx + math.sin(identity.background_angle) * gy) / math.sqrt(2)
    w = ((proj + 1.0) / 2.0)[..., None]
    return (np.asarray(identity.background_a) * (1 - w) + np.asarray(identity.background_b) * w).astype(np.float32)


def render(
    identity: Identity,
    size: int,
    pose: np.ndarray,
    eye_open: np.ndarray,
    mouth_open: np.ndarray,
) -> np.ndarray:
    """Render frames uint8 [T, size, size, 3] for per-frame pose [T, 3], eye_open [T], mouth_open [T]."""
    if not isinstance(size, (int, np.integer)) or not 16 <= size <= 1024:
        raise ToyWorldError(f"size must be an integer in [16, 1024], got {size!r}")
    pose = np.asarray(pose, dtype=np.float64)
    T = pose.shape[0]
    if pose.shape != (T, 3) or np.shape(eye_open) != (T,) or np.shape(mouth_open) != (T,):
        raise ToyWorldError(
            f"pose [T,3], eye_open [T], mouth_open [T] must agree; got {pose.shape}, "
            f"{np.shape(eye_open)}, {np.shape(mouth_open)}"
        )
    if T == 0:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    fw, fh, fcy = identity.face_width, identity.face_height, identity.face_cy
    canvas = _Canvas(int(size), pose, pivot=(0.0, fcy + fh))
    px = canvas.px
    canvas.img[:] = _background(identity, canvas.size)[None]
    full = (slice(0, canvas.size), slice(0, canvas.size))
    hx, hy = canvas.head_coords(*full)
    style = identity.hair_style
    hair_cy = fcy - 0.12 * fh

    def wavy(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        # 1 + 0.06 sin(9 theta) from (dx, dy) with only exact arithmetic: Im(u^9), u = e^{i theta}.
        r = np.sqrt(dx * dx + dy * dy) + 1e-12
        re, im = dx / r, dy / r
        re2, im2 = re * re - im * im, 2 * re * im
        re4, im4 = re2 * re2 - im2 * im2, 2 * re2 * im2
        re8, im8 = re4 * re4 - im4 * im4, 2 * re4 * im4
        return 1.0 + 0.06 * (re8 * im + im8 * re)

    # Hair behind the head.
    if style == "long":
        canvas.paint(*full, _ellipse_alpha(hx, hy, 0.0, fcy - 0.05 * fh, 1.28 * fw, 1.08 * fh, px), identity.hair)
    elif style in ("short", "bun"):
        back = _ellipse_alpha(hx, hy, 0.0, hair_cy, 1.1 * fw, 1.02 * fh, px) * _smoothstep(hy - (fcy + 0.05 * fh), px)
        canvas.paint(*full, back, identity.hair)
    elif style == "curly":
        back = _ellipse_alpha(hx, hy, 0.0, hair_cy, 1.22 * fw, 1.1 * fh, px, wobble=wavy)
        canvas.paint(*full, back * _smoothstep(hy - (fcy + 0.3 * fh), px), identity.hair)
    if style == "bun":
        canvas.paint(*full, _ellipse_alpha(hx, hy, 0.0, fcy - 1.12 * fh, 0.38 * fw, 0.3 * fh, px), identity.hair)

    # Face.
    canvas.paint(*full, _ellipse_alpha(hx, hy, 0.0, fcy, fw, fh, px), identity.skin)

    def feature(x: float, y: float, radius: float, draw: Callable[[np.ndarray, np.ndarray, slice, slice], None]) -> None:
        rows, cols = canvas.window(x, y, radius)
        if rows.start < rows.stop and cols.start < cols.stop:
            fx, fy = canvas.head_coords(rows, cols)
            draw(fx, fy, rows, cols)

    skin = np.asarray(identity.skin)
    if identity.blush:
        blush = tuple(0.6 * skin + 0.4 * np.asarray((0.95, 0.45, 0.5)))
        for side in (-1, 1):
            bx, by = side * 0.55 * fw, fcy + 0.28 * fh
            feature(bx, by, 0.2 * fw, lambda x, y, r, c, bx=bx, by=by: canvas.paint(
                r, c, 0.5 * _ellipse_alpha(x, y, bx, by, 0.16 * fw, 0.1 * fh, px), blush))

    # Nose: a slightly darker skin bump, well above the mouth.
    ny = fcy + 0.14 * fh
    feature(0.0, ny, 0.15 * fw, lambda x, y, r, c: canvas.paint(
        r, c, _ellipse_alpha(x, y, 0.0, ny, 0.09 * fw, 0.1 * fh, px), tuple(0.82 * skin)))

    # Eyes: white, iris and pupil; a blink shrinks the white vertically down to a lash line.
    ey = fcy - 0.12 * fh
    ew, eh = 0.19 * fw * identity.eye_size, 0.13 * fh * identity.eye_size
    openness = np.asarray(eye_open, dtype=np.float32)[:, None, None]
    for side in (-1, 1):
        ex = side * identity.eye_spacing * fw

        def draw_eye(x: np.ndarray, y: np.ndarray, r: slice, c: slice, ex: float = ex) -> None:
            white = _ellipse_alpha(x, y, ex, ey, ew, np.maximum(eh * openness, 1e-4), px)
            canvas.paint(r, c, white, _EYE_WHITE)
            canvas.paint(r, c, white * _ellipse_alpha(x, y, ex, ey, 0.55 * ew, 0.55 * ew, px), identity.eyes)
            canvas.paint(r, c, white * _ellipse_alpha(x, y, ex, ey, 0.27 * ew, 0.27 * ew, px), _PUPIL)
            lash = _ellipse_alpha(x, y, ex, ey, 1.05 * ew, 0.6 * px, px) * (1.0 - openness)
            canvas.paint(r, c, lash, tuple(0.35 * skin))
            # Brow: a flat hair-coloured bar.
            canvas.paint(r, c, _ellipse_alpha(x, y, ex, ey - 1.9 * eh, 1.1 * ew, 0.3 * eh, px), identity.hair)

        feature(ex, ey - eh, 1.25 * ew + 2.2 * eh, draw_eye)

    # Mouth: the upper lip stays put and the jaw drops, so the dark opening grows downwards.
    my = fcy + 0.5 * fh
    mw = identity.mouth_width * fw
    opening = 0.25 * fh * np.asarray(mouth_open, dtype=np.float32)[:, None, None]
    lip = 0.045 * fh
    width = mw * (1.0 - 0.15 * np.asarray(mouth_open, dtype=np.float32)[:, None, None])

    def draw_mouth(x: np.ndarray, y: np.ndarray, r: slice, c: slice) -> None:
        canvas.paint(r, c, _ellipse_alpha(x, y, 0.0, my + opening / 2, width + lip, lip + opening / 2, px), identity.lips)
        inside = _ellipse_alpha(x, y, 0.0, my + opening / 2, 0.88 * width, np.maximum(opening / 2, 1e-4), px)
        canvas.paint(r, c, inside, _MOUTH_INSIDE)

    feature(0.0, my + 0.125 * fh, mw + lip + 0.15 * fh, draw_mouth)

    # Fringe: hair in front of the forehead above a scalloped hairline (parabolic arches).
    if style != "bald":
        phase = 0.8 * hx / fw + 0.5
        arch = phase - np.floor(phase)
        hairline = fcy - fh * (0.42 + 0.1 * 4.0 * arch * (1.0 - arch))
        front = _ellipse_alpha(hx, hy, 0.0, fcy, fw, fh, px) * _smoothstep(hy - hairline, px)
        canvas.paint(*full, front, identity.hair)

    return np.clip(np.round(canvas.img * 255.0), 0, 255).astype(np.uint8)
