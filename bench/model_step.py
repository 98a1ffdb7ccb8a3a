"""Seconds per block per pipeline stage, printed as ONE JSON object.

    python bench/model_step.py --json [--config tiny] [--blocks 20] [--threads 2]
    python bench/model_step.py --json --config liveavatar-14b --device cuda --dtype bf16   # random weights, one GPU

Stages are timed the way the cluster runs them: audio features for one block, each denoising step (one
`StageRunner.step`: audio tokens + one cached DiT forward + Euler update), and the streaming VAE decode of the block.
The first `--warmup` blocks are excluded (cache fill, sink prefill, allocator warm-up). For liveavatar-14b the weights
are random bf16 (no checkpoint is read) and the reference image is random.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_tiny_like(config: str, blocks: int, warmup: int, device: str, dtype: torch.dtype, threads: int) -> dict:
    from avatarserve.engine.bundle import build_bundle
    from avatarserve.engine.runners import AudioEncoderRunner, DecoderRunner, StageRunner

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    bundle = build_bundle(config, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    st = bundle.stream
    audio = AudioEncoderRunner(bundle.audio, st)
    stages = [StageRunner(k, bundle.transformer, bundle.schedule, st) for k in range(st.num_steps)]
    decoder = DecoderRunner(bundle.vae, st, bundle.model_config.motion_frames)
    rng = np.random.default_rng(0)
    image = (rng.random((st.height, st.width, 3)) * 255).astype(np.uint8)
    sink = decoder.prepare_sink(image, bundle.encode_prompt("a person talking"), 0)
    sid = "bench"
    audio.create(sid)
    for s in stages:
        s.create(sid, sink)
    decoder.create(sid, sink)
    times = {"audio": [], "decode": []}
    times.update({f"step{k}": [] for k in range(st.num_steps)})
    pcm = (0.2 * rng.standard_normal(st.samples_per_block * (blocks + warmup))).astype(np.float32)
    for b in range(blocks + warmup):
        t = time.perf_counter()
        audio.push(sid, pcm[b * st.samples_per_block:(b + 1) * st.samples_per_block])
        payload = audio.next_block(sid)
        dt = {"audio": time.perf_counter() - t}
        for k, stage in enumerate(stages):
            t = time.perf_counter()
            payload = stage.step(payload)
            _sync(device)
            dt[f"step{k}"] = time.perf_counter() - t
        if b == 0:
            for stage in stages:
                stage.set_aas_latent(sid, payload.latents[:, :, :1])
        t = time.perf_counter()
        decoder.decode(payload)
        _sync(device)
        dt["decode"] = time.perf_counter() - t
        if b >= warmup:
            for k, v in dt.items():
                times[k].append(v)
    per_stage = {k: round(statistics.median(v), 6) for k, v in times.items()}
    slowest = max(per_stage.values())
    sequential = sum(per_stage.values())
    block_s = st.block_seconds
    return {
        "config": config, "device": device, "dtype": str(dtype).replace("torch.", ""), "threads": threads,
        "resolution": [st.width, st.height], "blocks_timed": blocks, "warmup_blocks": warmup,
        "seconds_per_block_per_stage": per_stage,
        "sequential_seconds_per_block": round(sequential, 6),
        "sequential_realtime_factor": round(block_s / sequential, 3),
        "tpp_bottleneck_seconds_per_block": round(slowest, 6),
        "tpp_realtime_factor": round(block_s / slowest, 3),
        "block_video_seconds": block_s, "load_seconds": round(load_s, 3),
    }


def bench_dit_stage(config: str, blocks: int, warmup: int, device: str, dtype: torch.dtype) -> dict:
    """One DiT stage with random weights, no VAE/audio models: for liveavatar-14b at 704x384 (needs ~46 GB of
    accelerator memory: 32.6 GB of bf16 weights + a 12.5 GB KV cache). `--dit-only` runs it for any config."""
    from avatarserve.model.config import get_preset
    from avatarserve.model.sampler import FlowMatchSchedule
    from avatarserve.model.transformer import CausalS2VTransformer, SinkInputs

    preset = get_preset(config)
    cfg, st = preset.model, preset.stream
    with torch.device("meta"):
        model = CausalS2VTransformer(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    model.eval()
    lh, lw, f = st.latent_height, st.latent_width, st.latent_frames_per_block
    cache = model.new_cache(lh, lw, f, st.window_blocks)
    sink = SinkInputs(torch.randn(1, 16, 1, lh, lw, device=device, dtype=dtype),
                      torch.randn(1, 16, cfg.motion_latent_frames, lh, lw, device=device, dtype=dtype))
    text = torch.randn(1, min(64, cfg.text_len), cfg.text_dim, device=device, dtype=dtype)
    t0 = time.perf_counter()
    model.prefill_sink(cache, sink, text)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    sched = FlowMatchSchedule.create(st.num_steps, st.shift)
    ctx = model.embed_text(text)
    feats = torch.randn(1, cfg.audio_num_layers, cfg.audio_dim, st.frames_per_block, device=device, dtype=dtype)
    times = []
    x = torch.randn(1, 16, f, lh, lw, device=device, dtype=dtype)
    for b in range(blocks + warmup):
        _sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            a = model.encode_audio(feats, f)
            v = model.forward_block(cache, x, torch.full((1,), sched.timestep(0), device=device), a, text, b, 30, text=ctx)
            x = sched.step(0, x, v)
        _sync(device)
        if b >= warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    mem = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return {"config": config, "device": device, "dtype": str(dtype).replace("torch.", ""),
            "resolution": [st.width, st.height], "seconds_per_block_one_stage": round(step_s, 4),
            "sink_prefill_seconds": round(prefill_s, 4), "kv_cache_bytes": cache.nbytes(),
            "max_memory_allocated_bytes": mem,
            "tpp_fps_if_dit_bound": round(st.frames_per_block / step_s, 2),
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dit-only", action="store_true", help="time one DiT stage with random weights (implied for liveavatar-14b)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the default output anyway)")
    a = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    if a.config == "liveavatar-14b" or a.dit_only:
        out = bench_dit_stage(a.config, a.blocks, a.warmup, a.device, dtype)
    else:
        out = bench_tiny_like(a.config, a.blocks, a.warmup, a.device, dtype, a.threads)
    out.update(bench="model_step", torch=torch.__version__, python=platform.python_version())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
