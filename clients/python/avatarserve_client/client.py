"""Synchronous AvatarServe client."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import grpc

from avatarserve_client.v1 import avatar_service_pb2 as pb
from avatarserve_client.v1 import avatar_service_pb2_grpc as pb_grpc

from ._stream_protocol import StreamItem, StreamProtocol
from ._streaming import DEFAULT_MAX_MESSAGE_BYTES, SendQueue, StreamStats, control_message, load_image_bytes
from .errors import AvatarServeError, FailedPrecondition, SessionNotFound, from_rpc_error
from .types import (AudioEncoding, CloseSummary, Geometry, IdleMode, OutputFormat, SessionHandle,
                    SessionInfo, StatusEvent, build_create_request, parse_formats)

Metadata = Sequence[tuple[str, str]]

API_KEY_ENV = "AVATARSERVE_API_KEY"


def resolve_api_key(api_key: str | None) -> str | None:
    """`api_key`, else the AVATARSERVE_API_KEY environment variable (None: no key is sent)."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return key.strip() or None if key else None


def api_key_metadata(api_key: str | None) -> list[tuple[str, str]]:
    """The metadata that carries an API key (sent on CreateSession only)."""
    return [("authorization", f"Bearer {api_key}")] if api_key else []


def resolve_credentials(credentials: grpc.ChannelCredentials | None,
                        root_certificates: str | os.PathLike | bytes | None) -> grpc.ChannelCredentials | None:
    """Channel credentials: `credentials` as given, else TLS trusting the PEM CA certificate(s) at the path (or the
    PEM bytes) `root_certificates`, else None (plaintext)."""
    if credentials is not None or root_certificates is None:
        return credentials
    pem = root_certificates if isinstance(root_certificates, bytes) else Path(root_certificates).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=pem)


# A StreamSession that fails UNAVAILABLE before the server's first reply is retried by gRPC itself: the server touched
# nothing of the session then (a gateway being stopped, a pipeline that could not open, a first message that never
# reached the gateway). Both clients send only the Hello until that first reply, so a retry replays just the Hello:
# grpcio's replay of a longer stream can drop a message (1.85.3: 28 of 400 replayed 24-message streams lost one or two,
# none of 300 that sent one message before the first reply). After the first reply a stream is never retried: video was
# delivered, and the client decides. Unary calls are not retried (CreateSession is not idempotent).
STREAM_RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.2s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": pb.DESCRIPTOR.services_by_name["AvatarService"].full_name, "method": "StreamSession"}],
    "retryPolicy": STREAM_RETRY_POLICY,
}]})


def channel_options(max_message_bytes: int, extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Channel options of both clients; `extra` adds to them, and its own "grpc.service_config" replaces ours."""
    ours: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_bytes),
                                   ("grpc.max_send_message_length", max_message_bytes)]
    if not any(key == "grpc.service_config" for key, _ in extra):
        ours.append(("grpc.service_config", SERVICE_CONFIG))
    return [*ours, *extra]


def request_metadata(base: Metadata, application: str | None, session_id: str | None) -> list[tuple[str, str]]:
    """Metadata for a call: the Ray Serve proxy routes on `application` and `session_id`."""
    md = list(base)
    if application:
        md.append(("application", application))
    if session_id:
        md.append(("session_id", session_id))
    return md


def session_ref(session: Any, token: str | None) -> tuple[str, str]:
    """(id, token) of a SessionHandle, a Session / AsyncSession, or a session id with its token."""
    session = getattr(session, "handle", session)
    if isinstance(session, SessionHandle):
        return session.session_id, session.session_token
    if token is None:
        raise TypeError("a session_token is required when the session is given by id")
    return session, token


class AvatarClient:
    """Blocking client for AvatarService.

    Args:
        address: "host:port" of the Ray Serve gRPC proxy.
        timeout: default deadline (s) of unary calls; streams have none unless given.
        application: Ray Serve application name, sent as `application` metadata.
        metadata: extra metadata sent on every call.
        credentials: channel credentials for TLS; None = plaintext (unless `root_certificates`).
        api_key: the API key CreateSession needs (sent as `authorization: Bearer <key>` on CreateSession only;
            session calls use the session token). Default: the AVATARSERVE_API_KEY environment variable.
        root_certificates: path of the PEM CA certificate(s) to trust (or the PEM bytes): connects with TLS.
    """

    def __init__(self, address: str, *, timeout: float | None = 30.0, application: str | None = None,
                 metadata: Metadata = (), credentials: grpc.ChannelCredentials | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 options: Sequence[tuple[str, Any]] = (), api_key: str | None = None,
                 root_certificates: str | os.PathLike | bytes | None = None) -> None:
        opts = channel_options(max_message_bytes, options)
        credentials = resolve_credentials(credentials, root_certificates)
        self._channel = (grpc.secure_channel(address, credentials, options=opts) if credentials
                         else grpc.insecure_channel(address, options=opts))
        self._stub = pb_grpc.AvatarServiceStub(self._channel)
        self.address = address
        self.timeout = timeout
        self.application = application
        self.metadata = tuple(metadata)
        self._api_key = resolve_api_key(api_key)

    def _md(self, session_id: str | None = None, *, api_key: bool = False) -> list[tuple[str, str]]:
        md = request_metadata(self.metadata, self.application, session_id)
        return md + api_key_metadata(self._api_key) if api_key else md

    def _unary(self, method: Callable[..., Any], request: Any, session_id: str | None,
               timeout: float | None, *, api_key: bool = False) -> Any:
        try:
            return method(request, metadata=self._md(session_id, api_key=api_key),
                          timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def create_session(self, image: Any, prompt: str = "", *, width: int = 0, height: int = 0,
                       seed: int | None = None, formats: Iterable[str | OutputFormat] | str = ("jpeg",),
                       jpeg_quality: int = 0, audio_encoding: str | AudioEncoding = AudioEncoding.PCM_S16LE,
                       idle_mode: str | IdleMode | None = None, fill_grace_ms: int = 0,
                       idle_timeout_s: int = 0, return_audio: bool = False,
                       timeout: float | None = None) -> SessionHandle:
        """Create a session from a reference image (path, bytes, PIL image or HxWx3 array)."""
        request = build_create_request(
            load_image_bytes(image), prompt, width=width, height=height, seed=seed,
            formats=parse_formats(formats), jpeg_quality=jpeg_quality,
            audio_encoding=AudioEncoding(audio_encoding), idle_mode=idle_mode,
            fill_grace_ms=fill_grace_ms, idle_timeout_s=idle_timeout_s, return_audio=return_audio)
        return SessionHandle.from_proto(self._unary(self._stub.CreateSession, request, None, timeout,
                                                    api_key=True))

    def get_session(self, session: "SessionHandle | Session | str", token: str | None = None, *,
                    timeout: float | None = None) -> SessionInfo:
        sid, tok = session_ref(session, token)
        reply = self._unary(self._stub.GetSession,
                            pb.GetSessionRequest(session_id=sid, session_token=tok), sid, timeout)
        return SessionInfo.from_proto(reply)

    def close_session(self, session: "SessionHandle | Session | str", token: str | None = None, *,
                      timeout: float | None = None) -> CloseSummary:
        sid, tok = session_ref(session, token)
        reply = self._unary(self._stub.CloseSession,
                            pb.CloseSessionRequest(session_id=sid, session_token=tok), sid, timeout)
        return CloseSummary.from_proto(reply)

    def session(self, image: Any, prompt: str = "", **options: Any) -> "Session":
        """Create a session and return it as a context manager that closes it on exit."""
        return Session(self, self.create_session(image, prompt, **options))

    def attach(self, handle: SessionHandle) -> "Session":
        """Wrap an existing session (e.g. to reopen its stream after a disconnect)."""
        return Session(self, handle)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "AvatarClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Session:
    """A live session. Use as a context manager: ``with client.session(img) as s: ...``.

    Attributes:
        handle: id, token and geometry from CreateSession.
        events: every StatusEvent received on this object's streams, in order.
        stats: timing of the most recent stream.
    """

    def __init__(self, client: AvatarClient, handle: SessionHandle) -> None:
        self.client = client
        self.handle = handle
        self.events: list[StatusEvent] = []
        self.stats = StreamStats()
        self.summary: CloseSummary | None = None
        self._queue: SendQueue | None = None
        self._closed = False

    @property
    def session_id(self) -> str:
        return self.handle.session_id

    @property
    def geometry(self) -> Geometry:
        return self.handle.geometry

    # -- control ---------------------------------------------------------------------------

    def interrupt(self) -> int:
        """Barge-in: drop audio queued locally and send INTERRUPT ahead of any new audio.

        Returns the number of locally queued chunks dropped. Thread-safe; callable from inside
        the `for block in s.stream(...)` loop.
        """
        queue = self._require_queue()
        dropped = queue.interrupt(control_message(pb.Control.KIND_INTERRUPT))
        self.stats.audio_chunks_dropped += dropped
        return dropped

    def end_of_input(self) -> None:
        """No more audio: send END_OF_INPUT after what is queued; the stream then drains."""
        self._require_queue().close(control_message(pb.Control.KIND_END_OF_INPUT))

    def end_of_utterance(self) -> None:
        """The audio queued so far completes an utterance (sent in order with it); the server reports its playback
        with UTTERANCE_STARTED / UTTERANCE_ENDED events. Thread-safe."""
        self._require_queue().put(control_message(pb.Control.KIND_END_OF_UTTERANCE))

    def _require_queue(self) -> SendQueue:
        if self._queue is None:
            raise FailedPrecondition("no stream is open on this session (call stream() first)")
        return self._queue

    # -- streaming -------------------------------------------------------------------------

    def stream(self, audio: Iterable[Any] | None = None, *, realtime: bool = False,
               lead_ms: float = 0.0, include_events: bool = False, end_of_input: bool = True,
               decode: bool = True, max_queued_chunks: int = 32, timeout: float | None = None,
               on_event: Callable[[StatusEvent], None] | None = None) -> Iterator[StreamItem]:
        """Open the bidi stream, send `audio` and yield VideoBlocks (and events if asked).

        `audio` items: AudioChunk messages (e.g. from chunk_pcm), numpy PCM arrays or PCM bytes
        (stamped with seq/pts here), or StreamMarker values sent in order. With `realtime`, audio
        is paced to real time (`lead_ms` ahead). When the iterable ends, END_OF_INPUT is sent if
        `end_of_input`, otherwise the stream stays open until end_of_input()/interrupt()/close.
        A background thread feeds a bounded queue (`max_queued_chunks`), so a slow network or
        server back-pressures the audio source instead of growing memory.
        Iteration ends after END_OF_STREAM. Errors raise typed AvatarServeError subclasses.
        """
        if self._queue is not None:
            raise FailedPrecondition("a stream is already open on this Session object")
        if self._closed:
            raise FailedPrecondition(f"session {self.session_id} was closed by this client")
        queue = SendQueue(max_queued_chunks)
        return self._run_stream(queue, audio, realtime, lead_ms, include_events, end_of_input,
                                decode, timeout, on_event)

    def _run_stream(self, queue: SendQueue, audio: Iterable[Any] | None, realtime: bool,
                    lead_ms: float, include_events: bool, end_of_input: bool, decode: bool,
                    timeout: float | None, on_event: Callable[[StatusEvent], None] | None
                    ) -> Iterator[StreamItem]:
        proto = StreamProtocol(self.handle, self.events, include_events=include_events,
                               decode=decode, on_event=on_event)
        self.stats = proto.stats
        stop = threading.Event()
        # STARTED arrived (or the stream ended): the server's stream clock runs, and gRPC no longer retries the call
        started = threading.Event()

        def requests() -> Iterator[pb.ClientMessage]:
            yield proto.hello()
            started.wait()  # as the asyncio client: a retry then has only the Hello to replay (STREAM_RETRY_POLICY)
            while (msg := queue.get()) is not None:
                proto.sent(msg)
                yield msg

        call = self.client._stub.StreamSession(requests(), metadata=self.client._md(self.session_id),
                                               timeout=timeout)

        def feed() -> None:
            try:
                if realtime:  # pace on the server's stream clock, which starts at STARTED, not at the call
                    started.wait()
                    if stop.is_set():
                        return
                # stop.wait as the sleep makes pacing interruptible when the stream ends.
                for item in proto.audio_items(audio, realtime, lead_ms, sleep=stop.wait):
                    if stop.is_set():
                        return
                    msg = proto.to_message(item)
                    if proto.is_end_of_input(msg):
                        queue.close(msg)
                        return
                    if not queue.put(msg):  # False once the stream ended (the queue is aborted)
                        return
                if end_of_input:
                    queue.close(proto.end_of_input())
            except BaseException as exc:  # surfaced by the receiving side
                proto.feeder_failed(exc)
                queue.abort()
                call.cancel()

        feeder = threading.Thread(target=feed, name=f"avatarserve-feed-{self.session_id[:8]}",
                                  daemon=True)
        self._queue = queue
        try:
            if audio is not None:
                feeder.start()
            for reply in call:
                item = proto.receive(reply, time.monotonic())
                if proto.started:
                    started.set()
                if item is not None:
                    yield item
                if proto.ended:
                    break
            proto.raise_feeder_error()
        except grpc.RpcError as exc:
            raise proto.error_for(exc) from exc
        finally:
            stop.set()
            started.set()
            queue.abort()
            if not proto.ended:
                call.cancel()
            if feeder.ident is not None:
                feeder.join(timeout=2.0)
            self._queue = None

    # -- lifecycle -------------------------------------------------------------------------

    def info(self, *, timeout: float | None = None) -> SessionInfo:
        return self.client.get_session(self.handle, timeout=timeout)

    def close(self, *, timeout: float | None = None) -> CloseSummary | None:
        """Close the session on the server (idempotent; None if the server forgot it)."""
        if self._queue is not None:
            self._queue.abort()
        try:
            self.summary = self.client.close_session(self.handle, timeout=timeout)
        except SessionNotFound:
            self.summary = None
        self._closed = True
        return self.summary

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._closed:
            return
        try:
            self.close()
        except AvatarServeError:
            if exc_type is None:
                raise  # otherwise keep the original error, not the cleanup failure
