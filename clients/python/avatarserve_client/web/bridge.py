"""One browser connection: its RTCPeerConnection and the AvatarServe session behind it.

    browser mic (Opus, 48 kHz) --WebRTC--> resampled to 16 kHz mono --> AsyncSession.stream
    AsyncSession.stream --> VideoBlock (frames + block audio) --> Playout --> video + audio tracks --WebRTC--> browser

The data channel (label "control") carries JSON both ways:

* page -> server: ``{"type": "interrupt"}``;
* server -> page: ``session`` (id, geometry), ``started`` (the stream clock runs), ``frame`` (the
  video track began showing a new block: frame number ``n`` of the track, block index, idle,
  its stream pts, ``latency_ms`` = wall time the frame left minus the wall time its audio reached
  this server, and ``gen_ms`` = how long after its audio was complete the block arrived),
  ``event`` (the session's StatusEvents), ``interrupt`` (sent), ``error``, ``ended``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from typing import Any

import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av.audio.resampler import AudioResampler

from ..aio import AsyncAvatarClient, AsyncSession
from ..errors import AvatarServeError
from ..media import VideoBlock
from ..types import EventKind, IdleMode, StatusEvent
from .playout import Playout, ShownFrame
from .tracks import AvatarAudioTrack, AvatarVideoTrack

log = logging.getLogger("avatarserve_client.web")

MIC_QUEUE_MAX_S = 2.0  # mic audio the session has not taken yet beyond this is dropped (oldest first)


def placeholder_image(image: bytes, width: int, height: int) -> np.ndarray:
    """The reference photo at the session's frame size: what the video shows before the first block."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as img:
        return np.asarray(img.convert("RGB").resize((width, height), Image.BICUBIC))


class AvatarBridge:
    """A WebRTC peer for one page, streaming its microphone into one AvatarServe session."""

    def __init__(self, client: AsyncAvatarClient, image: bytes, *, prompt: str = "", seed: int | None = None,
                 jitter_ms: float = 200.0, ice_servers: list[str] | tuple[str, ...] = (),
                 create_timeout: float | None = None, record: bool = False) -> None:
        self.client = client
        self.image = image
        self.prompt = prompt
        self.seed = seed
        self.jitter_ms = jitter_ms
        self.create_timeout = create_timeout
        # record=True (diagnostics, tests): every video frame and audio frame sent and every block received, see
        # `sent`, `sent_audio` and `received`
        self.record = record
        self.sent: list[dict[str, Any]] = []
        self.sent_audio: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.wall_offset = time.time() - time.monotonic()  # monotonic -> wall clock (the `sent` times)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(u) for u in ice_servers]))
        self.session: AsyncSession | None = None
        self.playout: Playout | None = None
        self.channel: Any = None
        self.stream_started_at: float | None = None  # monotonic time of the stream clock's 0
        self.closed = asyncio.Event()
        self._mic: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
        self._mic_samples = 0
        self._streaming = False
        self._interrupting = False  # INTERRUPT sent, INTERRUPTED not seen yet: stale speech blocks are dropped
        self._tasks: list[asyncio.Task[Any]] = []
        self._last_block: int | None = None
        self._pending: list[str] = []  # messages for a data channel that is not open yet
        self.stats: dict[str, Any] = {"blocks": 0, "idle_blocks": 0, "dropped_after_interrupt": 0,
                                      "mic_samples": 0, "mic_dropped_samples": 0, "interrupts": 0}

    # -- signalling --------------------------------------------------------------------------

    async def answer(self, sdp: str, sdp_type: str) -> dict[str, Any]:
        """Create the session, take the browser's offer and return the answer (plus session info)."""
        handle = await self.client.create_session(self.image, self.prompt, seed=self.seed, return_audio=True,
                                                  idle_mode=IdleMode.FILL_SILENCE, timeout=self.create_timeout)
        self.session = self.client.attach(handle)
        g = handle.geometry
        self.playout = Playout(sample_rate=g.sample_rate, fps=g.fps, jitter_ms=self.jitter_ms)
        self.audio_track = AvatarAudioTrack(self.playout, on_frame=self._on_audio if self.record else None)
        self.video_track = AvatarVideoTrack(self.playout, placeholder_image(self.image, g.width, g.height),
                                            on_frame=self._on_frame)

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._tasks.append(asyncio.create_task(self._read_mic(track, g.sample_rate)))

        @self.pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            self.channel = channel
            channel.on("message", self._on_message)
            for text in self._pending:
                channel.send(text)
            self._pending.clear()

        @self.pc.on("connectionstatechange")
        async def on_state() -> None:
            if self.pc.connectionState in ("failed", "closed"):
                await self.close()

        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=sdp_type))
        self.pc.addTrack(self.audio_track)
        self.pc.addTrack(self.video_track)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._tasks.append(asyncio.create_task(self._run_stream()))
        info = {"session_id": handle.session_id,
                "geometry": {"fps": g.fps, "frames_per_block": g.frames_per_block, "sample_rate": g.sample_rate,
                             "width": g.width, "height": g.height}}
        self.send({"type": "session", **info})
        return {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type, **info}

    # -- data channel ------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        text = json.dumps(message)
        ch = self.channel
        if ch is None or ch.readyState == "connecting":
            self._pending.append(text)
        elif ch.readyState == "open":
            ch.send(text)

    def _on_message(self, message: Any) -> None:
        try:
            msg = json.loads(message)
        except (TypeError, ValueError):
            return
        if isinstance(msg, dict) and msg.get("type") == "interrupt":
            self._tasks.append(asyncio.create_task(self.interrupt()))
        elif isinstance(msg, dict) and msg.get("type") == "ping":
            self.send({"type": "pong", "id": msg.get("id"), "server_time": time.time()})

    # -- microphone -> session ---------------------------------------------------------------

    async def _read_mic(self, track: MediaStreamTrack, sample_rate: int) -> None:
        resampler = AudioResampler(format="s16", layout="mono", rate=sample_rate)
        limit = int(MIC_QUEUE_MAX_S * sample_rate)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                break
            for out in resampler.resample(frame):
                pcm = out.to_ndarray().reshape(-1).astype(np.int16, copy=False)
                if not self._streaming or not len(pcm):
                    continue  # before the stream clock starts the session cannot take audio
                self.stats["mic_samples"] += len(pcm)
                self._mic.put_nowait(pcm)
                self._mic_samples += len(pcm)
                while self._mic_samples > limit and self._mic.qsize() > 1:  # the session fell behind
                    old = self._mic.get_nowait()
                    if old is not None:
                        self._mic_samples -= len(old)
                        self.stats["mic_dropped_samples"] += len(old)
        self._mic.put_nowait(None)

    async def _mic_audio(self) -> Any:
        while (pcm := await self._mic.get()) is not None:
            self._mic_samples -= len(pcm)
            yield pcm

    async def _run_stream(self) -> None:
        assert self.session is not None and self.playout is not None
        try:
            async for item in self.session.stream(self._mic_audio(), include_events=True):
                if isinstance(item, VideoBlock):
                    self._on_block(item)
                else:
                    self._on_event(item)
            self.send({"type": "ended"})
        except asyncio.CancelledError:
            raise
        except AvatarServeError as exc:
            log.warning("session %s: stream failed: %s", self.session.session_id, exc)
            self.send({"type": "error", "message": str(exc)})
        finally:
            self._streaming = False

    def _on_event(self, event: StatusEvent) -> None:
        if event.kind is EventKind.STARTED:
            assert self.session is not None
            self.stream_started_at = self.session.stats.started_at
            self._streaming = True
            self.send({"type": "started"})
        elif event.kind is EventKind.INTERRUPTED:
            self._interrupting = False
        msg: dict[str, Any] = {"type": "event", "kind": event.kind.value, "message": event.message,
                               "code": event.code, "pts_ms": event.pts_ms, "block_index": event.block_index}
        if event.utterance is not None:
            u = event.utterance
            msg["utterance"] = {"index": u.index, "start_pts_ms": u.start_pts_ms, "duration_ms": u.duration_ms,
                                "played_ms": u.played_ms, "interrupted": u.interrupted}
        self.send(msg)

    def _on_block(self, block: VideoBlock) -> None:
        assert self.playout is not None
        if self._interrupting and not block.is_idle:
            self.stats["dropped_after_interrupt"] += 1  # made before the server took the INTERRUPT
            return
        self.stats["blocks"] += 1
        if self.record:
            self.received.append({"block": block.block_index, "pts_ms": block.pts_ms, "duration_ms": block.duration_ms,
                                  "idle": block.is_idle, "audio": block.audio, "num_frames": block.num_frames,
                                  "received_at": (block.received_at or time.monotonic()) + self.wall_offset})
        self.stats["idle_blocks"] += int(block.is_idle)
        self.playout.push(block, now=block.received_at or None)

    async def interrupt(self) -> None:
        """Barge-in: the session drops the speech it has not shown, and so does the playout."""
        if self.session is None or self.playout is None or not self._streaming:
            return
        self.stats["interrupts"] += 1
        self._interrupting = True
        self.playout.interrupt()
        try:
            dropped = await self.session.interrupt()
        except AvatarServeError as exc:
            self._interrupting = False
            self.send({"type": "error", "message": f"interrupt failed: {exc}"})
            return
        self.send({"type": "interrupt", "dropped_chunks": dropped})

    # -- session -> browser ------------------------------------------------------------------

    def _on_audio(self, n: int, start: int | None, due: float, pcm: np.ndarray) -> None:
        assert self.playout is not None
        rms = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) / 32767.0 if len(pcm) else 0.0
        dbov = max(-127, min(0, round(20 * np.log10(rms)))) if rms > 0 else -127  # RFC 6465, as aiortc sends it
        self.sent_audio.append({"n": n, "at": due + self.wall_offset, "dbov": dbov,
                                "pos_ms": None if start is None else start * 1000.0 / self.playout.sample_rate})

    def _on_frame(self, n: int, shown: ShownFrame | None, due: float) -> None:
        if self.record:
            self.sent.append({"n": n, "at": due + self.wall_offset, "late_ms": (time.monotonic() - due) * 1000.0,
                              "image": None if shown is None else shown.image,
                              "pts_ms": None if shown is None else shown.pts_ms,
                              "block": None if shown is None else shown.block_index,
                              "idle": None if shown is None else shown.is_idle})
        if shown is None or shown.block_index == self._last_block:
            return
        self._last_block = shown.block_index
        msg: dict[str, Any] = {"type": "frame", "n": n, "block": shown.block_index, "idle": shown.is_idle,
                               "pts_ms": round(shown.pts_ms, 1), "server_time": time.time()}
        if self.stream_started_at is not None:
            audio_in = self.stream_started_at + shown.pts_ms / 1000.0
            msg["latency_ms"] = round((due - audio_in) * 1000.0, 1)
            audio_complete = self.stream_started_at + shown.block_end_ms / 1000.0
            msg["gen_ms"] = round((shown.block_received_at - audio_complete) * 1000.0, 1)
        self.send(msg)

    # -- teardown ----------------------------------------------------------------------------

    async def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self._streaming = False
        self._mic.put_nowait(None)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()
        if self.session is not None:
            try:
                await self.session.close(timeout=10.0)
            except AvatarServeError as exc:
                log.warning("closing session %s: %s", self.session.session_id, exc)
