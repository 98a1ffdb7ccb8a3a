"""Seconds per block per pipeline stage, printed as ONE JSON object.

    python bench/model_step.py --json [--config tiny] [--blocks 20] [--threads 2]
    python bench/model_step.py --json --config liveavatar-14b --device cuda --dtype bf16 --batch 1,2,4 [--fp8] [--compile]

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
from typing import Sequence

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


def _random_dit(config: str, device: str, dtype: torch.dtype):
    from avatarserve.model.config import get_preset
    from avatarserve.model.transformer import CausalS2VTransformer

    preset = get_preset(config)
    with torch.device("meta"):
        model = CausalS2VTransformer(preset.model)
    model = model.to(dtype=dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    return model.eval(), preset


def _compile_blocks(model) -> None:
    """torch.compile the parts of each transformer block that are pure tensor functions (the FFN, the q/k/v
    projections with their norms, the text cross-attention); the KV-cache bookkeeping between them stays eager.
    The 40 blocks share one compiled graph per input shape (their parameters are graph inputs)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    for block in model.blocks:
        block.ffn = torch.compile(block.ffn)
        block.self_attn.qkv = torch.compile(block.self_attn.qkv)
        block.cross_attn.cross = torch.compile(block.cross_attn.cross)


def bench_dit_stage(config: str, blocks: int, warmup: int, device: str, dtype: torch.dtype,
                    batches: Sequence[int] = (1,), fp8: bool = False, compiled: bool = False) -> dict:
    """One DiT stage with random weights, no VAE/audio models, for each batch size: `batch` sessions, each with its
    own KV cache, whose blocks go through ONE forward per step (`forward_blocks`; batch 1 is the plain
    `forward_block`). For liveavatar-14b at 704x384 this needs 32.6 GB of bf16 weights (about half with --fp8)
    plus a 12.5 GB KV cache per session. `--dit-only` runs it for any config."""
    from avatarserve.model.sampler import FlowMatchSchedule
    from avatarserve.model.transformer import BlockRequest, SinkInputs

    t0 = time.perf_counter()
    model, preset = _random_dit(config, device, dtype)
    fp8_backend = None
    if fp8:
        from avatarserve.model.fp8 import apply_fp8

        fp8_backend = apply_fp8(model).backend
    if compiled:
        _compile_blocks(model)
    _sync(device)
    build_s = time.perf_counter() - t0
    cfg, st = preset.model, preset.stream
    lh, lw, f = st.latent_height, st.latent_width, st.latent_frames_per_block
    sched = FlowMatchSchedule.create(st.num_steps, st.shift)
    g = torch.Generator(device=device).manual_seed(1)
    weights_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    rows = []
    for batch in batches:
        sessions = []
        for _ in range(batch):
            cache = model.new_cache(lh, lw, f, st.window_blocks)
            sink = SinkInputs(torch.randn(1, 16, 1, lh, lw, device=device, dtype=dtype, generator=g),
                              torch.randn(1, 16, cfg.motion_latent_frames, lh, lw, device=device, dtype=dtype,
                                          generator=g))
            text = torch.randn(1, min(64, cfg.text_len), cfg.text_dim, device=device, dtype=dtype, generator=g)
            model.prefill_sink(cache, sink, text)
            sessions.append((cache, model.embed_text(text)))
        kv_bytes = sessions[0][0].nbytes()
        feats = torch.randn(1, cfg.audio_num_layers, cfg.audio_dim, st.frames_per_block, device=device, dtype=dtype,
                            generator=g)
        x = torch.randn(batch, 16, f, lh, lw, device=device, dtype=dtype, generator=g)
        timestep = torch.full((1,), sched.timestep(0), device=device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        first_s = None
        for b in range(blocks + warmup):
            _sync(device)
            t = time.perf_counter()
            with torch.no_grad():
                a = model.encode_audio(feats, f)
                if batch == 1:
                    cache, ctx = sessions[0]
                    v = model.forward_block(cache, x, timestep, a, None, b, 30, text=ctx)
                else:
                    v = model.forward_blocks([BlockRequest(cache=cache, latents=x[i:i + 1], timestep=timestep,
                                                           audio=a, text=ctx, block_index=b, sink_index=30)
                                              for i, (cache, ctx) in enumerate(sessions)])
                x = sched.step(0, x, v)
            _sync(device)
            dt = time.perf_counter() - t
            if b == 0:
                first_s = dt
            if b >= warmup:
                times.append(dt)
        step_s = statistics.median(times)
        rows.append({
            "batch": batch, "seconds_per_forward": round(step_s, 4),
            "seconds_per_session_block": round(step_s / batch, 4),
            "first_forward_seconds": round(first_s, 3),  # includes compilation with --compile
            "realtime_at_this_batch": step_s <= st.block_seconds,
            "stage_fps": round(batch * st.frames_per_block / step_s, 2),
            "max_memory_allocated_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        })
        del sessions, x
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    base = rows[0]["seconds_per_session_block"]
    for row in rows:
        row["batching_speedup"] = round(base / row["seconds_per_session_block"], 3)
    fits = [r["batch"] for r in rows if r["realtime_at_this_batch"]]
    return {"config": config, "device": device, "dtype": str(dtype).replace("torch.", ""), "fp8": fp8_backend,
            "compiled": compiled, "resolution": [st.width, st.height], "block_seconds": st.block_seconds,
            "blocks_timed": blocks, "warmup_blocks": warmup, "weights_bytes": weights_bytes,
            "kv_cache_bytes_per_session": kv_bytes, "build_seconds": round(build_s, 2),
            "batches": rows,
            # A 5-GPU TPP pipeline (one GPU per denoising step) is DiT-bound: it serves as many real-time sessions
            # as one stage runs within a block's duration.
            "realtime_sessions_per_stage_measured": max(fits) if fits else 0,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}


def _batches(text: str) -> list:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--batch: comma-separated positive integers, got {text!r}")
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dit-only", action="store_true", help="time one DiT stage with random weights (implied for liveavatar-14b)")
    p.add_argument("--batch", default="1", help="DiT stage: comma-separated batch sizes (sessions per forward), e.g. 1,2,4")
    p.add_argument("--fp8", action="store_true", help="DiT stage: FP8 (e4m3) linear layers (model/fp8.py)")
    p.add_argument("--compile", action="store_true", help="DiT stage: torch.compile the blocks' pure tensor parts")
    p.add_argument("--json", action="store_true", help="print one JSON object (the default output anyway)")
    a = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    if a.config == "liveavatar-14b" or a.dit_only:
        out = bench_dit_stage(a.config, a.blocks, a.warmup, a.device, dtype, _batches(a.batch), fp8=a.fp8,
                              compiled=a.compile)
    else:
        out = bench_tiny_like(a.config, a.blocks, a.warmup, a.device, dtype, a.threads)
    out.update(bench="model_step", torch=torch.__version__, python=platform.python_version())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
