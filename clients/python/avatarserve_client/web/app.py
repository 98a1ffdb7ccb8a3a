"""`avatarserve-web` / `avatarserve web`: a web page to talk to an avatar over WebRTC.

    avatarserve-web --server 127.0.0.1:9000 [--host 127.0.0.1] [--port 8080]

Serves one page (and its script, style and default face, all from this package: nothing from a
CDN) and a signalling endpoint, ``POST /api/offer`` (JSON ``{"sdp", "type", "image"?: base64
PNG/JPEG, "prompt"?, "seed"?}`` -> the SDP answer plus ``session_id`` and ``geometry``). Each
offer gets its own AvatarServe session and RTCPeerConnection (see bridge.py).

No STUN/TURN server is used unless given (``--ice-server stun:HOST:PORT``): the page and this
server are expected on the same host or network.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import signal
import sys
from importlib import resources
from typing import Any, Sequence

from ..errors import MissingDependency

try:
    import aiortc  # noqa: F401  (the web extra; fail early with the extra's name)
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise MissingDependency(getattr(exc, "name", None) or "aiortc", "web", "avatarserve web") from exc

from .._streaming import load_image_bytes
from ..aio import AsyncAvatarClient
from ..errors import (AvatarServeError, CapacityExhausted, InvalidArgument, PermissionDenied, SessionNotFound,
                      Unavailable)
from .bridge import AvatarBridge

log = logging.getLogger("avatarserve_client.web")

STATIC_PACKAGE = "avatarserve_client.web"
_CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png",
                  ".svg": "image/svg+xml", ".ico": "image/x-icon"}
MAX_REQUEST_BYTES = 32 * 1024 * 1024  # an offer carries the photo


def static_file(name: str) -> bytes:
    """A file of the page (package data under web/static)."""
    return resources.files(STATIC_PACKAGE).joinpath("static", name).read_bytes()


def static_names() -> list[str]:
    return sorted(p.name for p in resources.files(STATIC_PACKAGE).joinpath("static").iterdir() if p.is_file())


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _status_for(exc: AvatarServeError) -> int:
    if isinstance(exc, InvalidArgument):
        return 400
    if isinstance(exc, PermissionDenied):
        return 403
    if isinstance(exc, SessionNotFound):
        return 404
    if isinstance(exc, (CapacityExhausted, Unavailable)):
        return 503
    return 502


def create_app(server: str, *, application: str | None = None, jitter_ms: float = 200.0,
               ice_servers: Sequence[str] = (), default_image: bytes | None = None, prompt: str = "",
               seed: int | None = None, create_timeout: float | None = 120.0,
               record: bool = False) -> web.Application:
    """The aiohttp application; ``app["bridges"]`` holds the live connections (AvatarBridge).

    `record` (diagnostics): bridges keep every frame they send and block they receive, and
    ``app["history"]`` keeps every bridge.
    """
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app["bridges"] = set()
    app["history"] = []
    app["tasks"] = set()
    face = default_image if default_image is not None else static_file("default_face.png")
    names = set(static_names())

    async def on_startup(app: web.Application) -> None:
        app["client"] = AsyncAvatarClient(server, application=application)

    async def on_shutdown(app: web.Application) -> None:
        await asyncio.gather(*(b.close() for b in list(app["bridges"])), return_exceptions=True)
        for task in list(app["tasks"]):
            task.cancel()
        await app["client"].close()

    async def index(request: web.Request) -> web.Response:
        return web.Response(body=static_file("index.html"), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in names:
            raise web.HTTPNotFound()
        suffix = name[name.rfind("."):]
        return web.Response(body=static_file(name), content_type=_CONTENT_TYPES.get(suffix, "application/octet-stream"),
                            headers={"Cache-Control": "no-cache"})

    async def default_face(request: web.Request) -> web.Response:
        kind = "image/png" if face.startswith(b"\x89PNG") else "image/jpeg"
        return web.Response(body=face, content_type=kind, headers={"Cache-Control": "no-cache"})

    async def config(request: web.Request) -> web.Response:
        return web.json_response({"ice_servers": list(ice_servers), "server": server})

    async def offer(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            sdp, sdp_type = body["sdp"], body["type"]
        except (ValueError, KeyError, TypeError):
            return _error(400, 'expected JSON {"sdp": ..., "type": "offer", "image"?: base64, "prompt"?, "seed"?}')
        if sdp_type != "offer" or not isinstance(sdp, str):
            return _error(400, f"expected an SDP offer, got type {sdp_type!r}")
        image = face
        if body.get("image"):
            data = str(body["image"])
            if data.startswith("data:"):
                data = data.split(",", 1)[-1]
            try:
                image = load_image_bytes(base64.b64decode(data, validate=True))
            except (binascii.Error, ValueError):
                return _error(400, "image is not valid base64")
            except InvalidArgument as exc:
                return _error(400, str(exc))
        seed_value = body.get("seed", seed)
        if seed_value is not None and not isinstance(seed_value, int):
            return _error(400, f"seed must be an integer, got {seed_value!r}")
        bridge = AvatarBridge(app["client"], image, prompt=str(body.get("prompt") or prompt), seed=seed_value,
                              jitter_ms=jitter_ms, ice_servers=list(ice_servers), create_timeout=create_timeout,
                              record=record)
        app["bridges"].add(bridge)
        if record:
            app["history"].append(bridge)
        try:
            answer = await bridge.answer(sdp, sdp_type)
        except AvatarServeError as exc:
            await bridge.close()
            app["bridges"].discard(bridge)
            return _error(_status_for(exc), str(exc))
        except ValueError as exc:  # aiortc: an offer it cannot answer
            await bridge.close()
            app["bridges"].discard(bridge)
            return _error(400, f"cannot answer this offer: {exc}")

        async def forget() -> None:
            await bridge.closed.wait()
            app["bridges"].discard(bridge)

        task = asyncio.get_running_loop().create_task(forget())
        app["tasks"].add(task)  # keep a reference until it is done
        task.add_done_callback(app["tasks"].discard)
        return web.json_response(answer)

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/default-face", default_face)
    app.router.add_get("/api/config", config)
    app.router.add_post("/api/offer", offer)
    return app


class WebServer:
    """Run the app on host:port (0: a free port) inside the current event loop: ``async with WebServer(...) as s``."""

    def __init__(self, server: str, *, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        self.app = create_app(server, **options)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    async def start(self) -> "WebServer":
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "WebServer":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


def add_web_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `web` options (lets another CLI mount this subcommand)."""
    parser.add_argument("--server", required=True, help="gRPC address of the AvatarServe cluster, HOST:PORT")
    parser.add_argument("--host", default="127.0.0.1", help="address the page is served on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port of the page (default: 8080; 0: any free port)")
    parser.add_argument("--application", default=None, help="Ray Serve application name")
    parser.add_argument("--image", default=None, help="default face (PNG/JPEG) when the page sends none "
                                                      "(default: a face from the toy world)")
    parser.add_argument("--prompt", default="", help="default text prompt")
    parser.add_argument("--seed", type=int, default=None, help="noise seed of every session (default: random)")
    parser.add_argument("--jitter-ms", type=float, default=200.0,
                        help="playout margin against late blocks (grows by itself after an underrun)")
    parser.add_argument("--ice-server", action="append", default=[], metavar="URL",
                        help="STUN/TURN server for both ends (repeatable; default: none, host candidates only)")
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default: WARNING)")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    image = load_image_bytes(args.image) if args.image else None
    server = WebServer(args.server, host=args.host, port=args.port, application=args.application,
                       jitter_ms=args.jitter_ms, ice_servers=args.ice_server, default_image=image,
                       prompt=args.prompt, seed=args.seed)
    await server.start()
    print(json.dumps({"url": server.url, "server": args.server}), flush=True)
    print(f"avatarserve web: open {server.url} (Ctrl-C stops)", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / not supported here
            pass
    try:
        await stop.wait()
    finally:
        await server.stop()


def run_web(argv: Sequence[str] | None = None, prog: str = "avatarserve-web") -> int:
    parser = add_web_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(_serve(args))
    except AvatarServeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the port is taken
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    sys.exit(run_web())
