"""Quality benchmark: lip sync, identity drift and flicker; prints ONE JSON object.

  # Ground truth of the toy world on held-out seeds (10**6 .. 10**6 + N - 1; training uses < 10**6):
  python bench/quality.py --ground-truth [--num-clips 20] [--seconds 10] [--stream-seconds 600]

  # A model through the real SequentialPipeline: 20 held-out clips + one 10-minute held-out stream with RSFM on
  # and with AAS + rolling RoPE off (the toy model's weights ship in the package; --checkpoint for others):
  python bench/quality.py --json --model toy [--checkpoint DIR] [--num-clips 20] [--seconds 10] [--stream-seconds 600]

  # Any video file with audio (e.g. a model's output), against the reference image it was made from:
  python bench/quality.py --video out.mp4 --reference ref.png

Model code evaluates its own outputs with `avatarserve.quality.evaluate_video(frames, audio,
reference_image)` (or `QualityAccumulator` for long streams); this script only adds the ground-truth
sweep and file decoding. Metric definitions: see the docstring of `avatarserve.quality`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

from avatarserve import quality
from avatarserve.toy import ToyWorldError, make_clip
from avatarserve.model.checkpoint import CheckpointError
from avatarserve.model.config import ConfigError
from avatarserve.toy.dataset import HELDOUT_SEED_START, split_of


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def ground_truth(
    num_clips: int, seconds: float, first_seed: int, size: int, stream_seconds: float, max_offset: int
) -> Dict[str, Any]:
    """Metrics of the toy world's own ground truth on held-out seeds (the ceiling a model can reach)."""
    if split_of(first_seed) != "heldout":
        raise ToyWorldError(f"--first-seed must be a held-out seed (>= {HELDOUT_SEED_START}), got {first_seed}")
    gen_s = eval_s = 0.0
    per_clip: List[Dict[str, Any]] = []
    clips = []
    for i in range(num_clips):
        t0 = time.perf_counter()
        clip = make_clip(first_seed + i, seconds, size=size)
        t1 = time.perf_counter()
        result = quality.evaluate_video(clip.frames, clip.audio, clip.reference_image, max_offset=max_offset)
        measured = quality.mouth_opening(clip.frames, clip.reference_image)
        t2 = time.perf_counter()
        gen_s += t1 - t0
        eval_s += t2 - t1
        result["mouth_measure_vs_truth_corr"] = _corr(measured, clip.mouth_open.astype(np.float64))
        per_clip.append(result)
        clips.append(clip)
    # Chance level: each clip's video against the next clip's audio.
    mismatched = [
        quality.lipsync(
            clips[i].frames, clips[(i + 1) % num_clips].audio, reference_image=clips[i].reference_image,
            max_offset=max_offset,
        )["corr"]
        for i in range(num_clips)
    ] if num_clips > 1 else []

    def col(key: str) -> np.ndarray:
        return np.asarray([r[key] for r in per_clip], dtype=np.float64)

    offsets = col("best_offset_frames")
    out: Dict[str, Any] = {
        "bench": "quality",
        "mode": "ground_truth",
        "split": "heldout",
        "seeds": [first_seed, first_seed + num_clips - 1],
        "clips": num_clips,
        "seconds_per_clip": seconds,
        "size": size,
        "lipsync_corr_ground_truth": float(col("lipsync_corr").mean()),
        "lipsync_corr_ground_truth_min": float(col("lipsync_corr").min()),
        "best_offset_frames": int(np.median(offsets)),
        "best_offset_frames_max_abs": int(np.abs(offsets).max()),
        "identity_drift_10s": float(col("identity_drift_first").mean()),
        "identity_drift_10s_max": float(col("identity_drift_first").max()),
        "flicker": float(col("flicker").mean()),
        "mouth_measure_vs_truth_corr": float(col("mouth_measure_vs_truth_corr").mean()),
        "lipsync_corr_mismatched_audio": float(np.mean(mismatched)) if mismatched else None,
        "generation_s": round(gen_s, 3),
        "evaluation_s": round(eval_s, 3),
        "evaluation_x_realtime": round(num_clips * seconds / max(eval_s, 1e-9), 1),
    }
    if stream_seconds > 0:
        from avatarserve.toy.train.evaluate import ground_truth_stream  # torch-heavy: only when asked

        t0 = time.perf_counter()
        out["stream"] = ground_truth_stream(stream_seconds, first_seed + num_clips, size, max_offset)
        out["stream"]["wall_s"] = round(time.perf_counter() - t0, 3)
    return out


def video_file(path: str, reference: str, max_offset: int) -> Dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    try:
        ref = np.asarray(Image.open(reference).convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise quality.QualityError(f"cannot read reference image {reference!r}: {exc}") from exc
    t0 = time.perf_counter()
    result = quality.evaluate_file(path, ref, max_offset=max_offset)
    return {
        "bench": "quality",
        "mode": "video",
        "video": path,
        "reference": reference,
        **result,
        "evaluation_s": round(time.perf_counter() - t0, 3),
    }


def model_report(config: str, checkpoint: Optional[str], num_clips: int, seconds: float, stream_seconds: float,
                 first_seed: int, threads: int, fps_seconds: float = 10.0) -> Dict[str, Any]:
    """What the toy-model issue asks for, with the headline keys at the top level (see toy/train/evaluate.py)."""
    import torch

    from avatarserve.engine.bundle import build_bundle
    from avatarserve.toy.train.evaluate import full_report

    if split_of(first_seed) != "heldout":
        raise ToyWorldError(f"--first-seed must be a held-out seed (>= {HELDOUT_SEED_START}), got {first_seed}")
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    report = full_report(build_bundle(config, checkpoint=checkpoint), num_clips, seconds, stream_seconds, first_seed,
                         log=lambda msg: print(msg, file=sys.stderr, flush=True), fps_seconds=fps_seconds)
    return {**report["summary"], **{k: v for k, v in report.items() if k != "summary"},
            "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ground-truth", action="store_true", help="evaluate held-out toy-world ground truth")
    mode.add_argument("--video", help="evaluate this video file (needs --reference)")
    mode.add_argument("--model", help="evaluate a model config (e.g. toy) on held-out clips and a long stream")
    parser.add_argument("--checkpoint", help="checkpoint folder for --model (default: the config's shipped weights)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --model evaluation")
    parser.add_argument("--fps-seconds", type=float, default=10.0, help="clip length of the --model speed test")
    parser.add_argument("--reference", help="reference image (png/jpg) for --video")
    parser.add_argument("--num-clips", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--first-seed", type=int, default=HELDOUT_SEED_START)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--stream-seconds", type=float, default=None,
                        help="length of the long held-out stream (default: 600 with --model, none with --ground-truth)")
    parser.add_argument("--max-offset", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="accepted for symmetry with the other benches: the "
                        "result is always one JSON object on stdout (progress goes to stderr)")
    args = parser.parse_args(argv)
    try:
        if args.ground_truth:
            if args.num_clips < 1:
                parser.error("--num-clips must be >= 1")
            out = ground_truth(
                args.num_clips, args.seconds, args.first_seed, args.size, args.stream_seconds or 0.0, args.max_offset
            )
        elif args.model:
            stream_seconds = 600.0 if args.stream_seconds is None else args.stream_seconds
            out = model_report(args.model, args.checkpoint, args.num_clips, args.seconds, stream_seconds,
                               args.first_seed, args.threads, args.fps_seconds)
        else:
            if not args.reference:
                parser.error("--video needs --reference")
            out = video_file(args.video, args.reference, args.max_offset)
    except (quality.QualityError, ToyWorldError, ConfigError, CheckpointError) as exc:
        print(json.dumps({"bench": "quality", "error": f"{type(exc).__name__}: {exc}"}))
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
