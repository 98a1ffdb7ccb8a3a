"""AvatarServe for LiveKit Agents (extra ``livekit``): an avatar worker speaking LiveKit's avatar data-stream
protocol, and the agent-side ``AvatarSession``.

    from avatarserve_client.livekit import AvatarSession

    avatar = AvatarSession(server="avatarserve-host:9000", image="face.png")
    await avatar.start(session, room=ctx.room)

Pieces: ``AvatarServeVideoGenerator`` (a livekit-agents ``VideoGenerator`` over one AvatarServe session),
``AvatarServeRunner`` (the worker's media loop: receiver -> generator -> ``rtc.AVSynchronizer`` -> tracks, playback
RPCs back), ``run_worker`` / ``python -m avatarserve_client.livekit worker`` (joins the room), ``protocol`` (the
topic, RPC and attribute names).
"""

from __future__ import annotations

try:
    import livekit.agents  # noqa: F401
    from livekit import rtc  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ..errors import MissingDependency

    raise MissingDependency("livekit-agents", "livekit", "avatarserve_client.livekit") from exc

from . import protocol
from .generator import SAMPLE_RATE, AvatarServeVideoGenerator, MediaInfo, PlaybackFinished
from .runner import AvatarServeRunner, MediaPushed
from .session import AvatarSession
from .worker import WorkerOptions, run_worker, worker_token

__all__ = [
    "AvatarServeRunner", "AvatarServeVideoGenerator", "AvatarSession", "MediaInfo", "MediaPushed",
    "PlaybackFinished", "SAMPLE_RATE", "WorkerOptions", "protocol", "run_worker", "worker_token",
]
