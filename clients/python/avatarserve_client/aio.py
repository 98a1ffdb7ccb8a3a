"""asyncio (grpc.aio) AvatarServe client. Same surface as the sync client, with `await`."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import grpc
import grpc.aio

from avatarserve_client.v1 import avatar_service_pb2 as pb
from avatarserve_client.v1 import avatar_service_pb2_grpc as pb_grpc

from ._stream_protocol import StreamItem, StreamProtocol
from ._streaming import (DEFAULT_MAX_MESSAGE_BYTES, AsyncSendQueue, StreamStats, control_message,
                         load_image_bytes)
from .audio import _aiter
from .client import (Metadata, api_key_metadata, channel_options, request_metadata, resolve_api_key,
                     resolve_credentials, session_ref)
from .errors import AvatarServeError, FailedPrecondition, SessionNotFound, from_rpc_error
from .types import (AudioEncoding, CloseSummary, Geometry, IdleMode, OutputFormat, SessionHandle,
                    SessionInfo, StatusEvent, build_create_request, parse_formats)


class AsyncAvatarClient:
    """grpc.aio client for AvatarService; see AvatarClient for the arguments."""

    def __init__(self, address: str, *, timeout: float | None = 30.0, application: str | None = None,
                 metadata: Metadata = (), credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: Sequence[tuple[str, Any]] = (), api_key: str | None = None,
                 root_certificates: str | os.PathLike | bytes | None = None) -> None:
        opts = channel_options(max_message_bytes, options)
        credentials = resolve_credentials(credentials, root_certificates)
        self._channel = (grpc.aio.secure_channel(address, credentials, options=opts) if credentials
                         else grpc.aio.insecure_channel(address, options=opts))
        self._stub = pb_grpc.AvatarServiceStub(self._channel)
        self.address = address
        self.timeout = timeout
        self.application = application
        self.metadata = tuple(metadata)
        self._api_key = resolve_api_key(api_key)

    def _md(self, session_id: str | None = None, *, api_key: bool = False) -> list[tuple[str, str]]:
        md = request_metadata(self.metadata, self.application, session_id)
        return md + api_key_metadata(self._api_key) if api_key else md

    async def _unary(self, method: Callable[..., Any], request: Any, session_id: str | None,
                     timeout: float | None, *, api_key: bool = False) -> Any:
        try:
            return await method(request, metadata=self._md(session_id, api_key=api_key),
                                timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    async def create_session(self, image: Any, prompt: str = "", *, width: int = 0, height: int = 0,
                             seed: int | None = None,
                             formats: Iterable[str | OutputFormat] | str = ("jpeg",),
                             jpeg_quality: int = 0,
                             audio_encoding: str | AudioEncoding = AudioEncoding.PCM_S16LE,
                             idle_mode: str | IdleMode | None = None, fill_grace_ms: int = 0,
                             idle_timeout_s: int = 0, return_audio: bool = False,
                             timeout: float | None = None) -> SessionHandle:
        request = build_create_request(
            load_image_bytes(image), prompt, width=width, height=height, seed=seed,
            formats=parse_formats(formats), jpeg_quality=jpeg_quality,
            audio_encoding=AudioEncoding(audio_encoding), idle_mode=idle_mode,
            fill_grace_ms=fill_grace_ms, idle_timeout_s=idle_timeout_s, return_audio=return_audio)
        reply = await self._unary(self._stub.CreateSession, request, None, timeout, api_key=True)
        return SessionHandle.from_proto(reply)

    async def get_session(self, session: "SessionHandle | AsyncSession | str", token: str | None = None,
                          *, timeout: float | None = None) -> SessionInfo:
        sid, tok = session_ref(session, token)
        reply = await self._unary(self._stub.GetSession,
                                  pb.GetSessionRequest(session_id=sid, session_token=tok), sid, timeout)
        return SessionInfo.from_proto(reply)

    async def close_session(self, session: "SessionHandle | AsyncSession | str", token: str | None = None,
                            *, timeout: float | None = None) -> CloseSummary:
        sid, tok = session_ref(session, token)
        reply = await self._unary(self._stub.CloseSession,
                                  pb.CloseSessionRequest(session_id=sid, session_token=tok), sid, timeout)
        return CloseSummary.from_proto(reply)

    def session(self, image: Any, prompt: str = "", **options: Any) -> "_SessionContext":
        """``async with client.session(img) as s:`` creates on entry and closes on exit."""
        return _SessionContext(self, image, prompt, options)

    def attach(self, handle: SessionHandle) -> "AsyncSession":
        return AsyncSession(self, handle)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncAvatarClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class _SessionContext:
    def __init__(self, client: AsyncAvatarClient, image: Any, prompt: str, options: dict[str, Any]) -> None:
        self._client, self._image, self._prompt, self._options = client, image, prompt, options
        self._session: AsyncSession | None = None

    async def __aenter__(self) -> "AsyncSession":
        handle = await self._client.create_session(self._image, self._prompt, **self._options)
        self._session = AsyncSession(self._client, handle)
        return self._session

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._session is not None
        await self._session._close_on_exit(exc_type)


class AsyncSession:
    """asyncio twin of Session: ``async for block in s.stream(audio): ...``."""

    def __init__(self, client: AsyncAvatarClient, handle: SessionHandle) -> None:
        self.client = client
        self.handle = handle
        self.events: list[StatusEvent] = []
        self.stats = StreamStats()
        self.summary: CloseSummary | None = None
        self._queue: AsyncSendQueue | None = None
        self._closed = False

    @property
    def session_id(self) -> str:
        return self.handle.session_id

    @property
    def geometry(self) -> Geometry:
        return self.handle.geometry

    async def interrupt(self) -> int:
        """Drop locally queued audio and send INTERRUPT; returns the chunks dropped."""
        dropped = await self._require_queue().interrupt(control_message(pb.Control.KIND_INTERRUPT))
        self.stats.audio_chunks_dropped += dropped
        return dropped

    async def end_of_input(self) -> None:
        await self._require_queue().close(control_message(pb.Control.KIND_END_OF_INPUT))

    async def end_of_utterance(self) -> None:
        """The audio queued so far completes an utterance (sent in order with it); the server reports its playback
        with UTTERANCE_STARTED / UTTERANCE_ENDED events."""
        await self._require_queue().put(control_message(pb.Control.KIND_END_OF_UTTERANCE))

    def _require_queue(self) -> AsyncSendQueue:
        if self._queue is None:
            raise FailedPrecondition("no stream is open on this session (call stream() first)")
        return self._queue

    def stream(self, audio: Iterable[Any] | Any | None = None, *, realtime: bool = False,
               lead_ms: float = 0.0, include_events: bool = False, end_of_input: bool = True,
               decode: bool = True, max_queued_chunks: int = 32, timeout: float | None = None,
               on_event: Callable[[StatusEvent], None] | None = None) -> AsyncIterator[StreamItem]:
        """See Session.stream. `audio` may be a sync or async iterable (a sync one must not
        block: it runs on the event loop)."""
        if self._queue is not None:
            raise FailedPrecondition("a stream is already open on this AsyncSession object")
        if self._closed:
            raise FailedPrecondition(f"session {self.session_id} was closed by this client")
        return self._run_stream(AsyncSendQueue(max_queued_chunks), audio, realtime, lead_ms,
                                include_events, end_of_input, decode, timeout, on_event)

    async def _run_stream(self, queue: AsyncSendQueue, audio: Any, realtime: bool, lead_ms: float,
                          include_events: bool, end_of_input: bool, decode: bool,
                          timeout: float | None, on_event: Callable[[StatusEvent], None] | None
                          ) -> AsyncIterator[StreamItem]:
        proto = StreamProtocol(self.handle, self.events, include_events=include_events,
                               decode=decode, on_event=on_event)
        self.stats = proto.stats
        call = self.client._stub.StreamSession(metadata=self.client._md(self.session_id),
                                               timeout=timeout)
        # grpc.aio replaces the server's status with INTERNAL when a write is in flight as the
        # server ends the call (grpc/grpc#36066). Waiting for STARTED before sending audio keeps
        # Hello rejections (NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION) intact, and leaves a
        # gRPC retry only the Hello to replay (see client.STREAM_RETRY_POLICY).
        started = asyncio.Event()

        async def write() -> None:
            try:
                await call.write(proto.hello())
                await started.wait()
                while (msg := await queue.get()) is not None:
                    proto.sent(msg)
                    await call.write(msg)
                await call.done_writing()
            except (grpc.RpcError, asyncio.InvalidStateError):
                proto.write_failed = True  # the call ended; the reading side reports why

        async def feed() -> None:
            try:
                if realtime:  # pace on the server's stream clock, which starts at STARTED, not at the call
                    await started.wait()
                async for item in _aiter(proto.audio_items(audio, realtime, lead_ms)):
                    msg = proto.to_message(item)
                    if proto.is_end_of_input(msg):
                        await queue.close(msg)
                        return
                    if not await queue.put(msg):
                        return
                if end_of_input:
                    await queue.close(proto.end_of_input())
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                proto.feeder_failed(exc)
                call.cancel()

        self._queue = queue
        tasks = [asyncio.create_task(write())]
        if audio is not None:
            tasks.append(asyncio.create_task(feed()))
        try:
            while (reply := await call.read()) is not grpc.aio.EOF:
                now = time.monotonic()
                # Decoding is CPU work: keep the event loop responsive.
                block = (await asyncio.to_thread(proto.video_block, reply, now)
                         if proto.needs_decoding(reply) else None)
                item = proto.receive(reply, now, block)
                if proto.started:
                    started.set()
                if item is not None:
                    yield item
                if proto.ended:
                    break
            proto.raise_feeder_error()
        except (grpc.RpcError, asyncio.CancelledError) as exc:
            error = proto.error_for(exc)
            if error is None:
                raise
            raise error from exc
        finally:
            started.set()
            if not proto.ended:
                call.cancel()
            await queue.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._queue = None

    async def info(self, *, timeout: float | None = None) -> SessionInfo:
        return await self.client.get_session(self.handle, timeout=timeout)

    async def close(self, *, timeout: float | None = None) -> CloseSummary | None:
        """Close the session on the server (idempotent; None if the server forgot it)."""
        if self._queue is not None:
            await self._queue.close()
        try:
            self.summary = await self.client.close_session(self.handle, timeout=timeout)
        except SessionNotFound:
            self.summary = None
        self._closed = True
        return self.summary

    async def _close_on_exit(self, exc_type: Any) -> None:
        if self._closed:
            return
        try:
            await self.close()
        except AvatarServeError:
            if exc_type is None:
                raise

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self._close_on_exit(exc_type)
