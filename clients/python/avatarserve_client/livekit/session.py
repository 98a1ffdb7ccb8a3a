"""Agent side: ``AvatarSession``, what a LiveKit agent adds to get an AvatarServe avatar.

    avatar = AvatarSession(server="avatarserve-host:9000", image="face.png")
    await avatar.start(session, room=ctx.room)        # before session.start(...)

Like livekit-plugins' avatar providers, ``start`` mints a room token for the avatar worker (kind agent, with
``lk.publish_on_behalf`` = this agent's identity), starts the worker, and points the agent's audio output at it
(``DataStreamAudioOutput`` with ``destination_identity`` = the worker). Self-hosted: the worker runs here, as a child
process (default) or a task of this event loop, and calls AvatarServe over gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Any, Literal

from livekit import rtc
from livekit.agents import get_job_context
from livekit.agents.voice.avatar import AvatarSession as BaseAvatarSession
from livekit.agents.voice.avatar import DataStreamAudioOutput

from .._streaming import load_image_bytes, wait_done
from .generator import SAMPLE_RATE
from .worker import DEFAULT_IDENTITY, TOKEN_ENV, WorkerOptions, run_worker, worker_token

if TYPE_CHECKING:
    from livekit.agents import AgentSession

logger = logging.getLogger("avatarserve_client.livekit")


class AvatarSession(BaseAvatarSession):
    """An AvatarServe avatar for a LiveKit agent.

    Args:
        server: AvatarServe gRPC address ``HOST:PORT``.
        image: the reference photo (path, PNG/JPEG bytes, PIL image or HxWx3 array).
        prompt, seed, session_options: AvatarServe session options.
        application: the Serve application name (None when the server is reached without one).
        avatar_identity, avatar_name: the worker's participant identity and name.
        launch: ``"process"`` (a child ``python -m avatarserve_client.livekit worker``) or ``"task"`` (in this
            process's event loop).
        clear_buffer_timeout: passed to ``DataStreamAudioOutput``; None (LiveKit's own avatar sessions use it) waits
            for the worker's ``lk.playback_finished`` after an interruption instead of guessing.
        worker_stop_timeout: at ``aclose()``, how long the worker process may take to exit after SIGTERM before it
            is killed.
    """

    def __init__(self, *, server: str, image: Any, prompt: str = "", application: str | None = "avatarserve",
                 seed: int | None = None, session_options: dict[str, Any] | None = None,
                 avatar_identity: str = DEFAULT_IDENTITY, avatar_name: str | None = None,
                 launch: Literal["process", "task"] = "process", clear_buffer_timeout: float | None = None,
                 worker_stop_timeout: float = 15.0) -> None:
        super().__init__()
        if launch not in ("process", "task"):
            raise ValueError(f"launch must be 'process' or 'task', got {launch!r}")
        if worker_stop_timeout <= 0:
            raise ValueError(f"worker_stop_timeout must be > 0, got {worker_stop_timeout!r}")
        self._worker_stop_timeout = worker_stop_timeout
        self._server = server
        self._image = load_image_bytes(image)
        self._prompt = prompt
        self._application = application
        self._seed = seed
        self._session_options = dict(session_options or {})
        self._identity = avatar_identity
        self._name = avatar_name or avatar_identity
        self._launch = launch
        self._clear_buffer_timeout = clear_buffer_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._image_file: str | None = None

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "avatarserve"

    async def start(self, agent_session: "AgentSession", room: rtc.Room, *, livekit_url: str | None = None,
                    api_key: str | None = None, api_secret: str | None = None) -> None:
        url = livekit_url or os.environ.get("LIVEKIT_URL")
        key = api_key or os.environ.get("LIVEKIT_API_KEY")
        secret = api_secret or os.environ.get("LIVEKIT_API_SECRET")
        if not (url and key and secret):
            raise ValueError("livekit_url, api_key and api_secret must be given or set in LIVEKIT_URL, "
                             "LIVEKIT_API_KEY and LIVEKIT_API_SECRET")
        job_ctx = get_job_context(required=False)
        if job_ctx is not None:
            agent_identity = job_ctx.local_participant_identity
        elif room.isconnected():
            agent_identity = room.local_participant.identity
        else:
            raise RuntimeError("AvatarSession.start() needs a connected room or an agent job context: connect the "
                               "room first")
        await super().start(agent_session, room)
        token = worker_token(api_key=key, api_secret=secret, room=room.name, agent_identity=agent_identity,
                             identity=self._identity, name=self._name)
        if self._launch == "task":
            opts = WorkerOptions(livekit_url=url, token=token, server=self._server, image=self._image,
                                 prompt=self._prompt, application=self._application, agent_identity=agent_identity,
                                 seed=self._seed, session_options=self._session_options)
            self._task = asyncio.create_task(run_worker(opts), name=f"avatarserve-worker-{self._identity}")
        else:
            await self._start_process(url, token, agent_identity)

        agent_session.output.replace_audio_tail(
            DataStreamAudioOutput(room, destination_identity=self._identity, sample_rate=SAMPLE_RATE,
                                  wait_remote_track=rtc.TrackKind.KIND_VIDEO, wait_playback_start=True,
                                  clear_buffer_timeout=self._clear_buffer_timeout))

    async def _start_process(self, url: str, token: str, agent_identity: str) -> None:
        if self._session_options:
            raise ValueError("session_options need launch='task' (the worker command line does not take them)")
        fd, self._image_file = tempfile.mkstemp(prefix="avatarserve-face-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(self._image)
        cmd = [sys.executable, "-m", "avatarserve_client.livekit", "worker", "--url", url, "--server", self._server,
               "--image", self._image_file, "--prompt", self._prompt, "--application", self._application or "",
               "--agent-identity", agent_identity, "--identity", self._identity]
        if self._seed is not None:
            cmd += ["--seed", str(self._seed)]
        env = dict(os.environ, **{TOKEN_ENV: token})  # not on the command line, where `ps` would show it
        self._proc = await asyncio.create_subprocess_exec(*cmd, env=env)
        logger.info("started AvatarServe worker process %d as %s", self._proc.pid, self._identity)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._proc is not None:
            if self._proc.returncode is None:
                self._proc.terminate()
                if not await wait_done(self._proc.wait(), self._worker_stop_timeout):
                    self._proc.kill()
                    await self._proc.wait()
            self._proc = None
        if self._image_file is not None:
            try:
                os.unlink(self._image_file)
            except OSError:
                pass
            self._image_file = None
        await super().aclose()
