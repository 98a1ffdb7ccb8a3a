"""`avatarserve` command line.

  avatarserve model-info --config NAME [--height H --width W] --json
  avatarserve generate [--config toy] --image IMG --audio WAV --out OUT.mp4 --seed N [--checkpoint DIR]
  avatarserve up [--config deploy/local.yaml] / avatarserve down
  avatarserve stream --server ADDR --image IMG --audio WAV --out OUT.mp4 [--realtime] [--api-key K] [--ca-cert F]
  avatarserve keys create [--name N] [--max-sessions N] [--session-seconds-per-hour S] / keys list / keys revoke ID
  avatarserve tls-front --upstream HOST:PORT --cert CERT --key KEY [--port P]

Heavy imports (torch, Ray, gRPC) happen inside the subcommands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional


def _model_info(args: argparse.Namespace) -> int:
    import torch

    from .model.config import get_preset, stream_config
    from .model.kv_cache import KVCache
    from .model.transformer import CausalS2VTransformer

    preset = get_preset(args.config)
    overrides = {k: v for k, v in (("height", args.height), ("width", args.width)) if v}
    stream = stream_config(args.config, overrides)
    with torch.device("meta"):  # no weights are allocated
        model = CausalS2VTransformer(preset.model)
    per_component = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        per_component[top] = per_component.get(top, 0) + p.numel()
    total = sum(per_component.values())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cfg = preset.model
    cond_tokens = model.sink_token_count(stream.latent_height, stream.latent_width)
    kv_bytes = KVCache.bytes_for(num_layers=cfg.num_layers, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                                 block_tokens=stream.tokens_per_block, window_blocks=stream.window_blocks,
                                 cond_tokens=cond_tokens, dtype=dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    info = {
        "config": preset.name,
        "total_parameters": total,
        "parameters_by_component": per_component,
        "weights_bytes": total * elem,
        "dtype": args.dtype,
        "resolution": {"width": stream.width, "height": stream.height},
        "latent_shape_per_block": list(stream.latent_shape(cfg.in_dim)),
        "block_latent_bytes": int(torch.Size(stream.latent_shape(cfg.in_dim)).numel() * elem),
        "tokens_per_latent_frame": stream.tokens_per_frame,
        "kv_window_tokens": stream.window_tokens,
        "sink_tokens": cond_tokens,
        "kv_cache_bytes_per_session_per_stage": kv_bytes,
        "num_denoising_stages": stream.num_steps,
        "fps": stream.fps,
        "frames_per_block": stream.frames_per_block,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


def _read_wav(path: str, sample_rate: int):
    """Any WAV/FLAC/OGG -> float32 mono PCM in [-1, 1) at `sample_rate` (via the SDK's reader)."""
    import numpy as np

    from avatarserve_client.audio import read_wav

    return read_wav(path, sample_rate=sample_rate).astype(np.float32) / 32768.0


def _generate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from avatarserve_client.media import Mp4Writer

    from .engine.bundle import build_bundle
    from .engine.pipeline import SequentialPipeline

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    bundle = build_bundle(args.config, checkpoint=args.checkpoint, seed=0,
                          stream_overrides={k: v for k, v in (("height", args.height), ("width", args.width)) if v})
    load_s = time.perf_counter() - t0
    st = bundle.stream
    audio = _read_wav(args.audio, st.sample_rate)
    pipe = SequentialPipeline(bundle)
    with open(args.image, "rb") as fh:
        image = fh.read()
    pcm16 = (audio * 32768.0).round().clip(-32768, 32767).astype(np.int16)
    t1 = time.perf_counter()
    blocks = 0
    n = 0
    ttff = None
    frame_ms = 1000.0 / st.fps
    # Frames are written as they are generated, so memory stays flat for long inputs.
    with Mp4Writer(args.out, fps=st.fps, sample_rate=st.sample_rate, audio_pcm=pcm16) as writer:
        for blk in pipe.stream_blocks(image, (audio[i:i + 3200] for i in range(0, len(audio), 3200)),
                                      prompt=args.prompt, seed=args.seed):
            if ttff is None:
                ttff = time.perf_counter() - t1
            writer.add_frames(list(blk.frames), [blk.pts_ms + i * frame_ms for i in range(len(blk.frames))])
            blocks += 1
            n += len(blk.frames)
    gen_s = time.perf_counter() - t1
    print(json.dumps({
        "out": args.out, "config": args.config, "blocks": blocks, "frames": n, "fps": st.fps,
        "video_seconds": n / st.fps, "audio_seconds": len(audio) / st.sample_rate,
        "generation_seconds": round(gen_s, 3), "generated_fps": round(n / gen_s, 2) if gen_s else None,
        "realtime_factor": round((n / st.fps) / gen_s, 3) if gen_s else None,
        "ttff_s": round(ttff or 0.0, 3), "load_seconds": round(load_s, 3),
    }))
    return 0


def _keys_store(args: argparse.Namespace):
    """(ApiKeyStore on the cluster's Redis, where) from --redis-url / REDIS_URL / the local cluster's state file."""
    import os

    from .serve.config import resolve_redis_url
    from .serve.control.api_keys import ApiKeyStore
    from .serve.ops.launcher import ClusterState, LauncherError, load_config

    namespace, url = args.namespace, args.redis_url
    if args.config:
        app = load_config(args.config)["app"]
        namespace = namespace or app.namespace
        url = url or app.redis_url
    url = url or os.environ.get("REDIS_URL")
    if not url:
        state = ClusterState.load()
        if state is None:
            raise LauncherError("no Redis to keep keys in: pass --redis-url, set REDIS_URL, or start a local cluster "
                                "(`avatarserve up`)")
        url = state.redis_url
    return ApiKeyStore.from_url(resolve_redis_url(url), namespace=namespace or "avatarserve:"), namespace


def _keys(args: argparse.Namespace) -> int:
    import asyncio

    from .serve.control.api_keys import KeysFile, QuotaLimits, make_record

    period = args.period_s if getattr(args, "period_s", None) else None
    if args.keys_cmd == "create":
        seconds = args.session_seconds
        if args.session_seconds_per_hour is not None:
            seconds, period = args.session_seconds_per_hour, 3600.0
        limits = QuotaLimits(args.max_sessions, seconds, period)
    if args.keys_cmd == "create" and args.keys_file:
        rec, key = make_record(args.name, limits, source="file")
        KeysFile(args.keys_file).append(rec)
        print(json.dumps({**rec.public(), "api_key": key, "keys_file": args.keys_file}))
        print("avatarserve keys: the key is shown only now; only its hash is in the keys file", file=sys.stderr)
        return 0
    if args.keys_cmd == "revoke" and args.keys_file:
        print(json.dumps({**KeysFile(args.keys_file).revoke(args.key_id).public()}))
        return 0

    async def run() -> int:
        store, _ = _keys_store(args)
        if args.keys_file:
            store.file = KeysFile(args.keys_file)
        try:
            if args.keys_cmd == "create":
                rec, key = await store.create(args.name, limits)
                print(json.dumps({**rec.public(), "api_key": key}))
                print("avatarserve keys: the key is shown only now; only its hash is stored", file=sys.stderr)
            elif args.keys_cmd == "revoke":
                print(json.dumps((await store.revoke(args.key_id)).public()))
            else:
                rows = []
                for rec in await store.list():
                    period_s = rec.limits.period_s or args.default_period_s
                    rows.append({**rec.public(), "open_sessions": await store.open_sessions(rec.key_id),
                                 "used_session_seconds": round(await store.usage(rec.key_id, period_s), 3),
                                 "usage_period_s": period_s})
                if args.json:
                    print(json.dumps(rows))
                else:
                    cols = ("key_id", "name", "source", "revoked", "max_sessions", "session_seconds", "usage_period_s",
                            "open_sessions", "used_session_seconds")
                    table = [cols] + [tuple("-" if r[c] is None else str(r[c]) for c in cols) for r in rows]
                    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
                    for row in table:
                        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
            return 0
        finally:
            await store.close()

    return asyncio.run(run())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avatarserve", description="Real-time audio-driven avatar video serving")
    sub = p.add_subparsers(dest="command", required=True)

    mi = sub.add_parser("model-info", help="parameters and KV-cache memory of a config (meta device, no weights)")
    mi.add_argument("--config", default="liveavatar-14b")
    mi.add_argument("--height", type=int)
    mi.add_argument("--width", type=int)
    mi.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    mi.add_argument("--json", action="store_true")
    mi.set_defaults(func=_model_info)

    g = sub.add_parser("generate", help="generate an mp4 in one process (SequentialPipeline)")
    g.add_argument("--config", default="toy", help="model config (default: toy, whose weights ship in the package)")
    g.add_argument("--image", required=True)
    g.add_argument("--audio", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--prompt", default="")
    g.add_argument("--checkpoint", help="local checkpoint folder (official Wan2.2-S2V layout; default: the config's "
                                        "shipped weights, random weights for tiny)")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.set_defaults(func=_generate)

    up = sub.add_parser("up", help="start redis-server, a local Ray head and the Serve app")
    up.add_argument("--config", default=None, help="deployment YAML (default: deploy/local.yaml)")
    up.set_defaults(func=lambda a: _launcher("up", a))
    down = sub.add_parser("down", help="stop exactly what `avatarserve up` started")
    down.set_defaults(func=lambda a: _launcher("down", a))

    keys = sub.add_parser("keys", help="API keys: create (the plain key is printed once), list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_cmd", required=True)
    for name, help_ in (("create", "create a key (stored hashed) and print it once"),
                        ("list", "ids, names, limits and usage of every key (never the keys)"),
                        ("revoke", "revoke a key: CreateSession with it fails with PERMISSION_DENIED")):
        kp = keys_sub.add_parser(name, help=help_)
        kp.add_argument("--redis-url", default=None, help="Redis of the cluster (default: REDIS_URL, else the local "
                                                          "cluster's); a password can come from REDIS_PASSWORD")
        kp.add_argument("--namespace", default=None, help="the application's key prefix (app.namespace; default "
                                                          "the --config file's, else avatarserve:)")
        kp.add_argument("--config", default=None, help="deployment YAML to read app.namespace / app.redis_url from")
        kp.add_argument("--keys-file", default=None, help="work on this keys file (auth.keys_file, e.g. the "
                                                          "content of a Kubernetes Secret) instead of Redis")
        if name == "create":
            kp.add_argument("--name", default="", help="a label shown by `keys list`")
            kp.add_argument("--max-sessions", type=int, default=None, help="concurrent open sessions")
            kp.add_argument("--session-seconds-per-hour", type=float, default=None,
                            help="streaming seconds per hour (the period is then 3600 s)")
            kp.add_argument("--session-seconds", type=float, default=None,
                            help="streaming seconds per --period-s (default period: the app's auth.quota_period_s)")
            kp.add_argument("--period-s", type=float, default=None, help="this key's quota period")
        elif name == "revoke":
            kp.add_argument("key_id", help="the key's id (from `keys create` / `keys list`)")
        else:
            kp.add_argument("--json", action="store_true", help="one JSON list instead of a table")
            kp.add_argument("--default-period-s", type=float, default=3600.0,
                            help="period of the usage shown for keys without their own (the app's "
                                 "auth.quota_period_s)")
    keys.set_defaults(func=_keys)

    tf = sub.add_parser("tls-front", help="TLS-terminating gRPC front for the Serve gRPC proxy", add_help=False)
    tf.set_defaults(func=None)

    st = sub.add_parser("stream", help="stream a wav through a running server and write an mp4", add_help=False)
    st.set_defaults(func=None)
    web = sub.add_parser("web", help="serve a web page to talk to an avatar over WebRTC (avatarserve-client[web])",
                         add_help=False)
    web.set_defaults(func=None)
    return p


def _launcher(cmd: str, args: argparse.Namespace) -> int:
    from .serve.ops import launcher

    return launcher.up(args.config) if cmd == "up" else launcher.down()


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "stream":
        from avatarserve_client.cli import run_stream

        return int(run_stream(_with_launcher_key(argv[1:])) or 0)
    if argv and argv[0] == "tls-front":
        from .serve.api.tls_front import main as tls_front_main

        return int(tls_front_main(argv[1:]) or 0)
    if argv and argv[0] == "web":
        try:
            from avatarserve_client.web import run_web
        except ImportError as exc:  # the client's `web` extra is not installed (MissingDependency says so)
            print(f"avatarserve web: error: {exc}", file=sys.stderr)
            return 2
        return int(run_web(argv[1:], prog="avatarserve web") or 0)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # typed errors of every layer end as one readable line, not a traceback
        if not _is_user_error(exc):
            raise
        print(f"avatarserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _with_launcher_key(argv: List[str]) -> List[str]:
    """`avatarserve stream` without --api-key / --api-key-file / AVATARSERVE_API_KEY: the key `avatarserve up` wrote
    into its state folder, when there is one."""
    import os

    if any(a.startswith(("--api-key", "--api-key-file")) for a in argv) or os.environ.get("AVATARSERVE_API_KEY"):
        return argv
    try:
        from .serve.ops.launcher import API_KEY_FILE, STATE_DIR
    except ImportError:  # serving extras missing
        return argv
    key_file = STATE_DIR / API_KEY_FILE
    return [*argv, "--api-key-file", str(key_file)] if key_file.exists() else argv


def _is_user_error(exc: BaseException) -> bool:
    from .engine.errors import EngineError
    from .model.checkpoint import CheckpointError
    from .model.config import ConfigError
    from .model.transformer import ModelInputError

    from avatarserve_client.errors import AvatarServeError

    known: tuple = (EngineError, CheckpointError, ConfigError, ModelInputError, FileNotFoundError, AvatarServeError)
    try:
        from .serve.control.api_keys import ApiKeyError
        from .serve.ops.launcher import LauncherError

        known += (LauncherError, ApiKeyError)
    except ImportError:  # serving extras missing: the model CLI still works
        pass
    return isinstance(exc, known)


if __name__ == "__main__":
    sys.exit(main())
