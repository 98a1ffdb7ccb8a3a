"""The avatar worker: joins a LiveKit room next to an agent and plays its speech through AvatarServe.

    python -m avatarserve_client.livekit worker --url wss://LIVEKIT --server AVATARSERVE_HOST:9000 \\
        --image face.png  (token: $LIVEKIT_WORKER_TOKEN, or minted from --api-key/--api-secret/--room/--agent-identity)

``AvatarSession.start`` (the agent side) mints the token and starts this for you, as a child process or a task.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from livekit import api, rtc
from livekit.agents.voice.avatar import DataStreamAudioReceiver

from ..aio import AsyncAvatarClient
from .generator import AvatarServeVideoGenerator
from .protocol import ATTRIBUTE_PUBLISH_ON_BEHALF
from .runner import AvatarServeRunner

logger = logging.getLogger("avatarserve_client.livekit")

DEFAULT_IDENTITY = "avatarserve-avatar"
TOKEN_ENV = "LIVEKIT_WORKER_TOKEN"


def worker_token(*, api_key: str, api_secret: str, room: str, agent_identity: str,
                 identity: str = DEFAULT_IDENTITY, name: str | None = None) -> str:
    """A room token for the avatar worker: kind agent, allowed to join `room`, publishing on behalf of
    `agent_identity` (the ``lk.publish_on_behalf`` attribute LiveKit's frontends and agents look for)."""
    return (api.AccessToken(api_key=api_key, api_secret=api_secret)
            .with_kind("agent")
            .with_identity(identity)
            .with_name(name or identity)
            .with_grants(api.VideoGrants(room_join=True, room=room))
            .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity})
            .to_jwt())


@dataclass
class WorkerOptions:
    livekit_url: str
    token: str
    server: str  # AvatarServe gRPC address
    image: Any  # path, PNG/JPEG bytes, PIL image or array
    prompt: str = ""
    application: str | None = "avatarserve"
    agent_identity: str | None = None  # whose audio to play; default: the token's lk.publish_on_behalf
    seed: int | None = None
    session_options: dict[str, Any] = field(default_factory=dict)


async def run_worker(opts: WorkerOptions, *, started: asyncio.Event | None = None) -> None:
    """Serve one agent until it leaves the room, the room closes, or the AvatarServe stream ends.

    `started` is set once the tracks are published and the worker listens for the agent's audio."""
    room = rtc.Room()
    await room.connect(opts.livekit_url, opts.token)
    try:
        agent = opts.agent_identity or room.local_participant.attributes.get(ATTRIBUTE_PUBLISH_ON_BEHALF) or None
        gone = asyncio.Event()
        room.on("disconnected", lambda *_: gone.set())
        room.on("participant_disconnected",
                lambda p: gone.set() if agent is not None and p.identity == agent else None)
        async with AsyncAvatarClient(opts.server, application=opts.application, timeout=120) as client:
            gen = AvatarServeVideoGenerator(client, opts.image, prompt=opts.prompt, seed=opts.seed,
                                            session_options=opts.session_options)
            receiver = DataStreamAudioReceiver(room, sender_identity=agent)
            runner = AvatarServeRunner(room, audio_recv=receiver, video_gen=gen)
            try:
                await runner.start()
                logger.info("avatar worker %s serving %s in room %s (AvatarServe session %s)",
                            room.local_participant.identity, agent or "the first agent", room.name,
                            gen.session.session_id if gen.session else "?")
                if started is not None:
                    started.set()
                done = asyncio.ensure_future(runner.wait_for_complete())
                left = asyncio.ensure_future(gone.wait())
                await asyncio.wait({done, left}, return_when=asyncio.FIRST_COMPLETED)
                left.cancel()
                if done.done():
                    done.result()  # a failed stream fails the worker
                else:
                    done.cancel()
                    await asyncio.gather(done, return_exceptions=True)
            finally:
                await runner.aclose()
    finally:
        await room.disconnect()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avatarserve_client.livekit",
                                description="AvatarServe avatar worker for LiveKit Agents")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="join a LiveKit room and play an agent's speech through AvatarServe")
    w.add_argument("--url", default=os.environ.get("LIVEKIT_URL"), help="LiveKit server URL (default $LIVEKIT_URL)")
    w.add_argument("--server", required=True, help="AvatarServe gRPC address HOST:PORT")
    w.add_argument("--application", default="avatarserve", help="Serve application name ('' for none)")
    w.add_argument("--image", required=True, help="reference photo (PNG/JPEG)")
    w.add_argument("--prompt", default="")
    w.add_argument("--seed", type=int, default=None)
    w.add_argument("--agent-identity", default=None,
                   help="the agent whose audio to play (default: the token's lk.publish_on_behalf)")
    w.add_argument("--token", default=None, help=f"room token (default ${TOKEN_ENV}; else minted from the keys)")
    w.add_argument("--api-key", default=os.environ.get("LIVEKIT_API_KEY"))
    w.add_argument("--api-secret", default=os.environ.get("LIVEKIT_API_SECRET"))
    w.add_argument("--room", default=None, help="room to join (to mint a token)")
    w.add_argument("--identity", default=DEFAULT_IDENTITY, help="the worker's participant identity")
    w.add_argument("-v", "--verbose", action="store_true")
    return p


async def _run_until_signalled(opts: WorkerOptions) -> None:
    """run_worker, cancelled (so it closes the session and leaves the room) on SIGTERM / SIGINT."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await run_worker(opts)
    except asyncio.CancelledError:
        logger.info("avatar worker stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.url:
        print("error: --url (or LIVEKIT_URL) is required", file=sys.stderr)
        return 2
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        if not (args.api_key and args.api_secret and args.room and args.agent_identity):
            print(f"error: give a token (--token / ${TOKEN_ENV}) or --api-key, --api-secret, --room and "
                  "--agent-identity to mint one", file=sys.stderr)
            return 2
        token = worker_token(api_key=args.api_key, api_secret=args.api_secret, room=args.room,
                             agent_identity=args.agent_identity, identity=args.identity)
    opts = WorkerOptions(livekit_url=args.url, token=token, server=args.server, image=args.image,
                         prompt=args.prompt, application=args.application or None,
                         agent_identity=args.agent_identity, seed=args.seed)
    try:
        asyncio.run(_run_until_signalled(opts))
    except Exception as exc:  # the command line reports, the exit code tells
        logger.error("avatar worker failed: %s: %s", type(exc).__name__, exc)
        return 1
    return 0
