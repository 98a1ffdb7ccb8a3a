"""Command line: `avatarserve-stream` / `python -m avatarserve_client stream` / `avatarserve stream`.

    avatarserve-stream --server HOST:PORT --image face.png --audio speech.wav --out out.mp4 \
        [--realtime] [--prompt TEXT] [--seed N] [--width W --height H] [--api-key KEY | --api-key-file F]
        [--ca-cert CA.pem | --tls]

The API key defaults to the AVATARSERVE_API_KEY environment variable.

Streams the WAV through a new session, writes the video with the audio muxed in, and prints a
one-line JSON summary (blocks, frames, ttff_s, fps, ...) on stdout. Reading the audio and
writing the MP4 need the `cli` extra: pip install 'avatarserve-client[cli]'.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import grpc

from .audio import chunk_pcm, read_wav, require_soundfile
from .client import AvatarClient
from .errors import AvatarServeError, InvalidArgument
from .media import Mp4Writer, VideoBlock, require_av


def add_stream_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `stream` options to a parser (lets another CLI mount this subcommand)."""
    parser.add_argument("--server", required=True, help="gRPC address of the server, HOST:PORT")
    parser.add_argument("--image", required=True, help="reference photo (PNG or JPEG)")
    parser.add_argument("--audio", required=True, help="input audio (WAV/FLAC/OGG; any rate/channels)")
    parser.add_argument("--out", required=True, help="output video file (.mp4)")
    parser.add_argument("--prompt", default="", help="text prompt (default: the server's)")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: server draws one)")
    parser.add_argument("--width", type=int, default=0, help="output width (0 = server default)")
    parser.add_argument("--height", type=int, default=0, help="output height (0 = server default)")
    parser.add_argument("--formats", default="jpeg",
                        help="server output formats, comma-separated: jpeg, h264 (default: jpeg)")
    parser.add_argument("--jpeg-quality", type=int, default=0, help="1..100 (0 = server default)")
    parser.add_argument("--realtime", action="store_true",
                        help="send audio no faster than real time (like a live microphone)")
    parser.add_argument("--lead-ms", type=float, default=0.0,
                        help="with --realtime, send audio this far ahead of real time")
    parser.add_argument("--chunk-ms", type=float, default=40.0, help="audio chunk length (ms)")
    parser.add_argument("--idle-mode", choices=["fill_silence", "wait_for_audio"], default=None,
                        help="server idle behaviour (default: server default, fill_silence)")
    parser.add_argument("--application", default=None, help="Ray Serve application name")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system root CAs")
    parser.add_argument("--ca-cert", default=None,
                        help="use TLS trusting this PEM CA certificate (e.g. a self-signed server's)")
    parser.add_argument("--api-key", default=None,
                        help="API key for CreateSession (default: the AVATARSERVE_API_KEY environment variable)")
    parser.add_argument("--api-key-file", default=None,
                        help="read the API key from this file (e.g. the one `avatarserve up` writes)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="deadline (s) of session creation and closing")
    return parser


def stream_command(args: argparse.Namespace) -> int:
    """Run `stream` with parsed arguments; returns the process exit code."""
    try:
        summary = _stream(args)
    except AvatarServeError as exc:
        print(f"avatarserve stream: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True))
    return 0


def _stream(args: argparse.Namespace) -> dict:
    # Before a session is created for nothing:
    require_soundfile("the stream command (audio file reading)", extra="cli")
    require_av("the stream command (MP4 writing)", extra="cli")
    pcm = read_wav(args.audio)
    chunks = chunk_pcm(pcm, chunk_ms=args.chunk_ms)
    credentials = grpc.ssl_channel_credentials() if args.tls and not args.ca_cert else None
    api_key = args.api_key
    if api_key is None and args.api_key_file:
        try:
            api_key = open(args.api_key_file).read().strip()
        except OSError as exc:
            raise InvalidArgument(f"cannot read the API key file {args.api_key_file}: {exc}") from exc
    t0 = time.monotonic()
    with AvatarClient(args.server, timeout=args.timeout, application=args.application,
                      credentials=credentials, root_certificates=args.ca_cert, api_key=api_key) as client:
        with client.session(args.image, args.prompt, width=args.width, height=args.height,
                            seed=args.seed, formats=args.formats, jpeg_quality=args.jpeg_quality,
                            idle_mode=args.idle_mode) as session:
            geometry = session.geometry
            writer = Mp4Writer(args.out, fps=geometry.fps, sample_rate=geometry.sample_rate,
                               audio_pcm=pcm)
            with writer:
                block: VideoBlock
                for block in session.stream(chunks, realtime=args.realtime, lead_ms=args.lead_ms):
                    writer.add_block(block)
            stats = session.stats
    wall = time.monotonic() - t0
    return {
        "session_id": session.session_id,
        "blocks": stats.blocks,
        "frames": stats.frames,
        "idle_blocks": stats.idle_blocks,
        "ttff_s": None if stats.ttff_s is None else round(stats.ttff_s, 4),
        "fps": None if stats.fps is None else round(stats.fps, 3),
        "audio_s": round(len(pcm) / 16000.0, 3),
        "wall_s": round(wall, 3),
        "width": geometry.width,
        "height": geometry.height,
        "out": args.out,
    }


def run_stream(argv: Sequence[str] | None = None, *, prog: str = "avatarserve stream") -> int:
    """Entry point for `avatarserve stream ARGS...` (argv excludes the word `stream`)."""
    parser = add_stream_arguments(argparse.ArgumentParser(
        prog=prog, description="Stream a WAV through AvatarServe into an MP4."))
    return stream_command(parser.parse_args(argv))


def stream_main(argv: Sequence[str] | None = None) -> int:
    """Console script `avatarserve-stream ARGS...` of the avatarserve-client distribution."""
    return run_stream(argv, prog="avatarserve-stream")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avatarserve_client", description="AvatarServe client")
    sub = parser.add_subparsers(dest="command", required=True)
    add_stream_arguments(sub.add_parser("stream", help="stream a WAV into an MP4"))
    args = parser.parse_args(argv)
    if args.command == "stream":
        return stream_command(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
