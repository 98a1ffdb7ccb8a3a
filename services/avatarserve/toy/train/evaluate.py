"""Quality and speed of a toy bundle on held-out people, through the real `SequentialPipeline`.

Clips: each held-out clip's reference image and audio go in; the generated frames (trimmed to the clip's
length) are scored with `quality.evaluate_video` against that reference image, next to the ground truth's
own scores. Long stream: one held-out `toy.make_stream`, fed to the pipeline in 2 s audio chunks and scored
incrementally (`QualityAccumulator`), so any length runs in constant memory.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch

from ... import quality
from ...engine.bundle import ModelBundle
from ...engine.pipeline import SequentialPipeline
from ..dataset import HELDOUT_SEED_START
from ..world import make_clip, make_stream


def with_stream(bundle: ModelBundle, **changes: Any) -> ModelBundle:
    return dataclasses.replace(bundle, stream=bundle.stream.replace(**changes)) if changes else bundle


def evaluate_clips(bundle: ModelBundle, num_clips: int, seconds: float, first_seed: int = HELDOUT_SEED_START,
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
    pipe = SequentialPipeline(bundle)
    rows: List[Dict[str, Any]] = []
    gen_s, frames_made = 0.0, 0
    for i in range(num_clips):
        clip = make_clip(first_seed + i, seconds, size=bundle.stream.width)
        t0 = time.perf_counter()
        blocks = pipe.generate(clip.reference_image, clip.audio, prompt="", seed=first_seed + i)
        gen_s += time.perf_counter() - t0
        frames = np.concatenate([b.frames for b in blocks])[: clip.num_frames]
        frames_made += sum(b.frames.shape[0] for b in blocks)
        res = quality.evaluate_video(frames, clip.audio, clip.reference_image)
        gt = quality.evaluate_video(clip.frames, clip.audio, clip.reference_image)
        rows.append({"seed": clip.seed, "lipsync_corr": res["lipsync_corr"], "best_offset_frames": res["best_offset_frames"],
                     "identity_drift_10s": res["identity_drift_first"], "flicker": res["flicker"],
                     "face_lost_frames": res["face_lost_frames"], "lipsync_corr_ground_truth": gt["lipsync_corr"],
                     "flicker_ground_truth": gt["flicker"], "identity_drift_10s_ground_truth": gt["identity_drift_first"]})
        log(f"eval clip {clip.seed}: lipsync {res['lipsync_corr']:.3f} (gt {gt['lipsync_corr']:.3f}) offset "
            f"{res['best_offset_frames']} drift {res['identity_drift_first']:.3f} flicker {res['flicker']:.2f}")

    def col(key: str) -> np.ndarray:
        return np.asarray([r[key] for r in rows], dtype=np.float64)

    return {
        "clips": num_clips, "seconds_per_clip": seconds, "first_seed": first_seed,
        "lipsync_corr": float(col("lipsync_corr").mean()),
        "lipsync_corr_ground_truth": float(col("lipsync_corr_ground_truth").mean()),
        "lipsync_ratio": float(col("lipsync_corr").mean() / max(col("lipsync_corr_ground_truth").mean(), 1e-9)),
        "best_offset_frames": int(np.median(col("best_offset_frames"))),
        "best_offset_frames_per_clip": [int(v) for v in col("best_offset_frames")],
        "identity_drift_10s": float(col("identity_drift_10s").mean()),
        "identity_drift_10s_ground_truth": float(col("identity_drift_10s_ground_truth").mean()),
        "flicker": float(col("flicker").mean()),
        "flicker_ground_truth": float(col("flicker_ground_truth").mean()),
        "face_lost_frames": int(col("face_lost_frames").sum()),
        "generated_fps": frames_made / gen_s if gen_s else None,
        "per_clip": rows,
    }


def evaluate_stream(bundle: ModelBundle, seconds: float, seed: int, log: Callable[[str], None] = print,
                    log_every_s: float = 60.0) -> Dict[str, Any]:
    stream = make_stream(seed, seconds, size=bundle.stream.width, chunk_seconds=2.0)
    acc = quality.QualityAccumulator(stream.reference_image)
    pipe = SequentialPipeline(bundle)

    def audio_chunks() -> Iterator[np.ndarray]:
        for chunk in stream:
            acc.update(chunk.frames[:0], chunk.audio)
            yield chunk.audio

    fps = bundle.stream.fps
    t0 = time.perf_counter()
    made, next_log = 0, log_every_s
    for block in pipe.stream_blocks(stream.reference_image, audio_chunks(), prompt="", seed=seed):
        acc.update(block.frames)
        made += block.frames.shape[0]
        if made / fps >= next_log:
            log(f"stream {seed}: {made / fps:.0f}/{seconds:.0f} s generated, {made / (time.perf_counter() - t0):.1f} fps")
            next_log += log_every_s
    wall = time.perf_counter() - t0
    res = acc.result()
    return {**_stream_row(seed, res), "face_lost_frames": res["face_lost_frames"], "generated_fps": made / wall,
            "stream_config": {"adaptive_sink": bundle.stream.adaptive_sink, "rolling_rope": bundle.stream.rolling_rope}}


def ground_truth_stream(seconds: float, seed: int, size: int = 64, max_offset: int = 5) -> Dict[str, Any]:
    """The toy world's own long stream, scored chunk by chunk (constant memory): the ceiling of a model's."""
    stream = make_stream(seed, seconds, size=size)
    acc = quality.QualityAccumulator(stream.reference_image)
    for chunk in stream:
        acc.update(chunk.frames, chunk.audio)
    return _stream_row(seed, acc.result(max_offset=max_offset))


def _stream_row(seed: int, res: Dict[str, Any]) -> Dict[str, Any]:
    return {"seed": seed, "seconds": res["seconds"], "lipsync_corr": res["lipsync_corr"],
            "best_offset_frames": res["best_offset_frames"], "identity_drift_10s": res["identity_drift_first"],
            "identity_drift_last_10s": res["identity_drift_last"], "flicker": res["flicker"]}


def measure_fps(bundle: ModelBundle, seconds: float = 10.0, seed: int = HELDOUT_SEED_START, threads: int = 2,
                repeats: int = 2) -> Dict[str, Any]:
    """Frames per second of the whole sequential pipeline (audio front end, 4 DiT steps, VAE decode) on one
    held-out clip, with `threads` intra-op threads; the best of `repeats` runs (the machine is shared)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        clip = make_clip(seed, seconds, size=bundle.stream.width)
        pipe = SequentialPipeline(bundle)
        walls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            blocks = pipe.generate(clip.reference_image, clip.audio, seed=seed)
            walls.append(time.perf_counter() - t0)
        n = sum(b.frames.shape[0] for b in blocks)
        return {"threads": threads, "frames": n, "video_seconds": n / 25.0, "wall_s": [round(w, 3) for w in walls],
                "fps": n / min(walls), "x_realtime": n / 25.0 / min(walls)}
    finally:
        torch.set_num_threads(prev)


def full_report(bundle: ModelBundle, num_clips: int = 20, seconds: float = 10.0, stream_seconds: float = 600.0,
                first_seed: int = HELDOUT_SEED_START, log: Callable[[str], None] = print,
                fps_seconds: float = 10.0) -> Dict[str, Any]:
    """What issue #4 asks for: held-out clips with RSFM on, and one long held-out stream with RSFM on and with
    AAS + rolling RoPE off; plus the pipeline's frames per second on 2 threads."""
    out: Dict[str, Any] = {"bench": "quality", "mode": "model", "config": bundle.preset.name}
    out["speed_2_threads"] = measure_fps(bundle, fps_seconds, seed=first_seed, threads=2)
    out["speed_1_thread"] = measure_fps(bundle, fps_seconds, seed=first_seed, threads=1)
    log(f"speed: {out['speed_2_threads']} / 1 thread: {out['speed_1_thread']}")
    out["clips"] = evaluate_clips(bundle, num_clips, seconds, first_seed, log=log)
    if stream_seconds > 0:
        seed = first_seed + num_clips
        out["stream_ground_truth"] = ground_truth_stream(stream_seconds, seed, bundle.stream.width)
        out["stream_rsfm"] = evaluate_stream(bundle, stream_seconds, seed, log=log)
        out["stream_no_aas_no_rolling_rope"] = evaluate_stream(
            with_stream(bundle, adaptive_sink=False, rolling_rope=False), stream_seconds, seed, log=log)
    c = out["clips"]
    # The headline keys: lip sync, offset and flicker over the held-out clips; identity drift within the
    # long stream with RSFM on (its first 10 s vs its last 10 s), and the same stream with AAS + rolling RoPE off.
    summary: Dict[str, Any] = {
        "lipsync_corr": c["lipsync_corr"], "lipsync_corr_ground_truth": c["lipsync_corr_ground_truth"],
        "lipsync_ratio": c["lipsync_ratio"], "best_offset_frames": c["best_offset_frames"],
        "clips_identity_drift_10s": c["identity_drift_10s"],
        "clips_identity_drift_10s_ground_truth": c["identity_drift_10s_ground_truth"],
        "flicker": c["flicker"], "flicker_ground_truth": c["flicker_ground_truth"],
        "fps": out["speed_2_threads"]["fps"], "x_realtime": out["speed_2_threads"]["x_realtime"],
        "fps_1_thread": out["speed_1_thread"]["fps"]}
    if stream_seconds > 0:
        on, off = out["stream_rsfm"], out["stream_no_aas_no_rolling_rope"]
        summary.update(identity_drift_10s=on["identity_drift_10s"], identity_drift_10min=on["identity_drift_last_10s"],
                       stream_seconds=on["seconds"])
        summary["drift_ratio_10min_vs_10s"] = on["identity_drift_last_10s"] / max(on["identity_drift_10s"], 1e-9)
        for key, st in (("rsfm_on", on), ("rsfm_off", off)):  # full details: out["stream_rsfm"], ...
            summary[key] = {"seconds": st["seconds"], "identity_drift_10s": st["identity_drift_10s"],
                            "identity_drift_10min": st["identity_drift_last_10s"],
                            "lipsync_corr": st["lipsync_corr"], "best_offset_frames": st["best_offset_frames"],
                            "flicker": st["flicker"], **st["stream_config"]}
    out["summary"] = summary
    return out
