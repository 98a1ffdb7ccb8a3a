"""`StageHost`: the gRPC server inside a stage replica that runs a `StageHandler` per session.

Per session, a hop runs five small tasks joined by bounded queues (size `queue_size`):

    upstream Pipe ──reader──► in_q ──worker (handler.process)──► down_q ──sender──► next hop's Pipe
          ▲                                     │ control items                         │
          └──────────── writer ◄── up_q ◄───────┴──────────── relay ◄───────────────────┘

- Order: one worker per session awaits `process` for one block at a time.
- Back-pressure: every queue is bounded and every producer awaits `put`, and gRPC flow control
  bounds the bytes on the wire; a caller that stops reading stalls the tail, then every hop up
  to the caller's `send`.
- Return path: results of the last hop flow back up the same bidi streams; relaying hops
  forward them as serialized bytes (no parse, no copy beyond gRPC's), so the caller needs no
  server of its own and receives results, control items and errors in one ordered stream.
- Control items emitted by a hop go up; every relaying hop hands them to its handler's
  `on_control` before forwarding them.
- Failure of a handler at hop k: hop k stops taking blocks, lets blocks it already passed on
  finish downstream (their results reach the caller), then sends one typed Error up and ends.
  Every hop closes the session (handler.close_session) when its Pipe ends, whatever the reason:
  end-of-stream, error, caller cancellation or server stop. Other sessions are untouched.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Optional, Tuple, TypeVar, Union

import grpc
import grpc.aio

from avatarserve.serve.dataplane.transport import (
    BlockItem,
    ChannelPool,
    ControlItem,
    ErrorCode,
    HopStamp,
    PipelineError,
    ProtocolError,
    StageError,
    StageHandler,
    TransportOptions,
    block_from_proto,
    block_to_proto,
    control_from_proto,
    control_to_proto,
    message_kind,
    now_ns,
    open_pipe,
    serialize_message,
    validate_session_id,
    SERVICE_NAME,
)
from avatarserve.stage.v1 import stage_pb2 as pb

__all__ = ["BackgroundStageHost", "StageHost", "StageHostConfig", "format_address"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_WIRE_ERRORS = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass(frozen=True)
class StageHostConfig:
    name: str = "stage"  # hop name in stamps, errors and traces (e.g. "DenoiseStage1#abc123")
    bind_host: str = "127.0.0.1"
    port: int = 0  # 0: ephemeral (unless port_range is set)
    advertise_host: Optional[str] = None  # default: bind_host, or this host's IP for a wildcard bind
    port_range: Optional[Tuple[int, int]] = None  # bind the first free port in [lo, hi] (NetworkPolicy clusters)
    max_sessions: int = 64
    drain_timeout_s: float = 30.0  # how long a failed hop waits for blocks it passed on to finish
    transport: TransportOptions = field(default_factory=TransportOptions)

    def __post_init__(self) -> None:
        if not self.name:
            raise StageError("StageHostConfig.name must be non-empty")
        if not 0 <= self.port < 65536:
            raise StageError(f"port {self.port} out of range")
        if self.port_range is not None:
            lo, hi = self.port_range
            if self.port or not 0 < lo <= hi < 65536:
                raise StageError(f"port_range {self.port_range} needs 0 < lo <= hi < 65536 and port 0")
        if self.max_sessions < 1:
            raise StageError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.drain_timeout_s <= 0:
            raise StageError(f"drain_timeout_s must be > 0, got {self.drain_timeout_s}")


@dataclass(frozen=True)
class _End:
    reason: str


@dataclass(frozen=True)
class _Fail:
    code: ErrorCode
    message: str


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _code_of(exc: BaseException) -> ErrorCode:
    return exc.code if isinstance(exc, StageError) else ErrorCode.HANDLER_FAILED


class _HopSession:
    """State of one session at one hop; lives exactly as long as the upstream Pipe call."""

    def __init__(self, host: "StageHost", session_id: str, route: list[str], config: bytes, context: grpc.aio.ServicerContext) -> None:
        self.host = host
        self.sid = session_id
        self.route = route
        self.config = config
        self.context = context
        q = host.config.transport.queue_size
        self.in_q: asyncio.Queue[Union[tuple[BlockItem, int], _End, _Fail]] = asyncio.Queue(q)
        self.down_q: asyncio.Queue[pb.StageMessage] = asyncio.Queue(q)
        self.up_q: asyncio.Queue[Union[bytes, pb.StageMessage]] = asyncio.Queue(q)
        self.call: Optional[grpc.aio.StreamStreamCall] = None
        self.handler_open = False
        self.terminal_queued = False
        self.failed_here = False
        self.downstream_done = asyncio.Event()
        self.closed = asyncio.Event()  # set once this hop freed the session's state (`StageHost._forget`)
        self.blocks_processed = 0
        self.tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def name(self) -> str:
        return self.host.name

    def _error(self, code: ErrorCode, message: str) -> pb.StageMessage:
        return pb.StageMessage(error=pb.Error(session_id=self.sid, code=int(code), message=message, origin=self.name))

    def stats(self) -> dict[str, int]:
        return {
            "in_queue": self.in_q.qsize(),
            "down_queue": self.down_q.qsize(),
            "up_queue": self.up_q.qsize(),
            "blocks_processed": self.blocks_processed,
        }

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        handler = self.host.handler
        try:
            try:
                await handler.open_session(self.sid, self.config)
            except Exception as exc:
                await self.context.write(self._error(_code_of(exc), f"open_session failed: {_describe(exc)}"))
                return
            self.handler_open = True
            hops: list[str] = []
            if self.route:
                try:
                    self.call, hops = await open_pipe(
                        self.host._channels.get(self.route[0]),
                        self.sid,
                        self.route,
                        self.config,
                        self.host.config.transport.open_timeout_s,
                        raw_responses=True,
                    )
                except PipelineError as exc:
                    err = pb.Error(session_id=self.sid, code=int(exc.code), message=exc.message, origin=exc.origin or self.name)
                    await self.context.write(pb.StageMessage(error=err))
                    return
            await self.context.write(pb.StageMessage(opened=pb.Opened(session_id=self.sid, hops=[self.name, *hops])))
            spawn = asyncio.get_running_loop().create_task
            self.tasks["reader"] = spawn(self._guard(self._read_up()), name=f"{self.sid}/reader")
            self.tasks["worker"] = spawn(self._guard(self._work()), name=f"{self.sid}/worker")
            if self.call is not None:
                self.tasks["sender"] = spawn(self._guard(self._send_down()), name=f"{self.sid}/sender")
                self.tasks["relay"] = spawn(self._guard(self._relay()), name=f"{self.sid}/relay")
            else:
                self.downstream_done.set()
            await self._write_up()
        finally:
            # gRPC cancels this coroutine when the caller goes away, possibly while it is
            # already cleaning up: run the cleanup as its own task so it always completes.
            cleanup = asyncio.get_running_loop().create_task(self._cleanup(), name=f"{self.sid}/cleanup")
            self.host._closing.add(cleanup)
            cleanup.add_done_callback(self.host._closing.discard)
            await asyncio.shield(cleanup)

    async def _cleanup(self) -> None:
        try:
            tasks = list(self.tasks.values())
            for t in tasks:
                t.cancel()
            if self.call is not None:
                self.call.cancel()  # frees the session at every downstream hop too
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if self.handler_open:
                self.handler_open = False
                try:
                    await self.host.handler.close_session(self.sid)
                except Exception:
                    log.exception("%s: close_session(%s) failed", self.name, self.sid)
        finally:
            self.host._forget(self)

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        """Turn a bug in the plumbing into an Error for this session instead of a hang."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: session %s internal failure", self.name, self.sid)
            self._abort(ErrorCode.INTERNAL, _describe(exc))

    def _abort(self, code: ErrorCode, message: str) -> None:
        """Unordered stop: drop what is queued upward and queue the error right away."""
        if self.terminal_queued:
            return
        current = asyncio.current_task()
        for t in self.tasks.values():
            if t is not current:
                t.cancel()
        while not self.up_q.empty():
            self.up_q.get_nowait()
        self.terminal_queued = True
        self.up_q.put_nowait(self._error(code, message))

    async def _put_up(self, msg: Union[bytes, pb.StageMessage], *, terminal: bool = False) -> None:
        if self.terminal_queued:
            return  # the caller already gets a terminal item; nothing may follow it
        if terminal:
            self.terminal_queued = True
        await self.up_q.put(msg)

    def _cancel(self, *names: str) -> None:
        current = asyncio.current_task()
        for n in names:
            t = self.tasks.get(n)
            if t is not None and t is not current:
                t.cancel()

    # ---------------------------------------------------------------- tasks

    async def _write_up(self) -> None:
        while True:
            msg = await self.up_q.get()
            await self.context.write(msg)
            if message_kind(msg) in ("end", "error"):
                return

    async def _read_up(self) -> None:
        while True:
            msg = await self.context.read()
            if msg is grpc.aio.EOF:
                await self.in_q.put(_End("upstream half-closed"))
                return
            try:
                kind = message_kind(msg)
                if kind == "block":
                    if msg.block.session_id != self.sid:
                        raise ProtocolError(f"block for session {msg.block.session_id!r} on the pipe of session {self.sid!r}")
                    recv = now_ns()
                    item = block_from_proto(msg.block)
                elif kind == "end":
                    await self.in_q.put(_End(msg.end.reason))
                    return
                else:
                    raise ProtocolError(f"unexpected {kind!r} item after open")
            except StageError as exc:
                # Queued behind the blocks already read, so they are processed first.
                await self.in_q.put(_Fail(exc.code, _describe(exc)))
                return
            await self.in_q.put((item, recv))

    async def _work(self) -> None:
        handler = self.host.handler
        while True:
            entry = await self.in_q.get()
            if isinstance(entry, _End):
                if self.call is not None:
                    await self.down_q.put(pb.StageMessage(end=pb.EndOfStream(session_id=self.sid, reason=entry.reason)))
                else:
                    await self._put_up(pb.StageMessage(end=pb.EndOfStream(session_id=self.sid, reason=entry.reason)), terminal=True)
                return
            if isinstance(entry, _Fail):
                await self._fail(entry.code, entry.message)
                return
            item, recv = entry
            start = now_ns()
            try:
                outs = await handler.process(self.sid, item)
                end = now_ns()
                messages = self._encode_outputs(outs, item, HopStamp(self.name, recv, start, end))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._fail(_code_of(exc), f"block {item.block_index}: {_describe(exc)}")
                return
            for downstream, msg in messages:
                if downstream and self.call is not None:
                    await self.down_q.put(msg)
                else:
                    await self._put_up(msg)
            self.blocks_processed += 1

    def _encode_outputs(self, outs: Any, item: BlockItem, stamp: HopStamp) -> list[tuple[bool, pb.StageMessage]]:
        if not isinstance(outs, (list, tuple)):
            raise ProtocolError(f"process() must return a list of items, got {type(outs).__name__}")
        messages: list[tuple[bool, pb.StageMessage]] = []
        for out in outs:
            if isinstance(out, BlockItem):
                out.stamps = [*item.stamps, stamp]
                messages.append((True, pb.StageMessage(block=block_to_proto(self.sid, out))))
            elif isinstance(out, ControlItem):
                if not out.origin:
                    out.origin = self.name
                messages.append((False, pb.StageMessage(control=control_to_proto(self.sid, out))))
            else:
                raise ProtocolError(f"process() returned a {type(out).__name__}; expected BlockItem or ControlItem")
        return messages

    async def _fail(self, code: ErrorCode, message: str) -> None:
        """Ordered failure: results of blocks already passed on reach the caller before the error."""
        self.failed_here = True
        self._cancel("reader")
        if self.call is not None and not self.downstream_done.is_set():
            try:
                await asyncio.wait_for(self._drain_downstream(), self.host.config.drain_timeout_s)
            except asyncio.TimeoutError:
                message += f" (next hop did not drain within {self.host.config.drain_timeout_s:g}s)"
        await self._put_up(self._error(code, message), terminal=True)

    async def _drain_downstream(self) -> None:
        await self.down_q.put(pb.StageMessage(end=pb.EndOfStream(session_id=self.sid, reason=f"{self.name} failed")))
        await self.downstream_done.wait()

    async def _send_down(self) -> None:
        assert self.call is not None
        while True:
            msg = await self.down_q.get()
            try:
                await self.call.write(msg)
                if msg.WhichOneof("kind") == "end":
                    await self.call.done_writing()
                    return
            except _WIRE_ERRORS:
                return  # the relay sees the broken stream and reports it

    async def _relay(self) -> None:
        assert self.call is not None
        next_hop = self.route[0]
        try:
            try:
                while True:
                    raw = await self.call.read()
                    if raw is grpc.aio.EOF:
                        break
                    kind = message_kind(raw)
                    if kind == "block":
                        await self._put_up(raw)
                    elif kind == "control":
                        if not await self._deliver_control(raw):
                            return
                        await self._put_up(raw)
                    elif kind in ("end", "error"):
                        if not self.failed_here:
                            if kind == "error":
                                self._cancel("reader", "worker", "sender")
                            await self._put_up(raw, terminal=True)
                        return
                    else:
                        raise ProtocolError(f"next hop {next_hop} sent {kind!r}")
                problem = f"next hop {next_hop} closed the stream without end-of-stream"
            except grpc.aio.AioRpcError as exc:
                problem = f"next hop {next_hop} broke the stream: {exc.code().name} {exc.details()}"
            except StageError as exc:  # malformed item from the next hop
                problem = f"next hop {next_hop}: {exc}"
            if not self.failed_here:
                self._cancel("reader", "worker", "sender")
                await self._put_up(self._error(ErrorCode.UNAVAILABLE, problem), terminal=True)
        finally:
            self.downstream_done.set()

    async def _deliver_control(self, raw: bytes) -> bool:
        """Hand a control item from downstream to this hop's handler; False if that failed."""
        on_control = getattr(self.host.handler, "on_control", None)
        if on_control is None:
            return True
        item = control_from_proto(pb.StageMessage.FromString(raw).control)
        try:
            await on_control(self.sid, item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._abort(_code_of(exc), f"on_control({item.kind!r}) failed: {_describe(exc)}")
            return False
        return True


def _check_handler(handler: Any) -> None:
    if not all(callable(getattr(handler, m, None)) for m in ("open_session", "process", "close_session")):
        raise StageError(f"{type(handler).__name__} does not implement StageHandler (open_session, process, close_session)")


class StageHost:
    """gRPC server for one stage replica; serves `StageService.Pipe` for `handler`.

    Use on the event loop that should run the data plane: `address = await host.start()`,
    `await host.stop()`. See `BackgroundStageHost` to run one in a dedicated thread.
    """

    def __init__(self, handler: Optional[StageHandler], config: Optional[StageHostConfig] = None) -> None:
        if handler is not None:
            _check_handler(handler)
        self.handler: Optional[StageHandler] = handler  # None while the replica loads its model (see `attach`)
        self.config = config or StageHostConfig()
        self._server: Optional[grpc.aio.Server] = None
        self._channels = ChannelPool(self.config.transport)
        self._sessions: dict[str, _HopSession] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._address: Optional[str] = None
        self.sessions_opened = 0
        self.sessions_closed = 0

    @property
    def name(self) -> str:
        return self.config.name

    def attach(self, handler: StageHandler) -> None:
        """Give a host started without a handler (its replica was still loading the model) the handler to run."""
        if self.handler is not None:
            raise StageError(f"stage host {self.name!r} already has a handler")
        _check_handler(handler)
        self.handler = handler

    @property
    def address(self) -> str:
        if self._address is None:
            raise StageError(f"stage host {self.name!r} is not started")
        return self._address

    @property
    def live_sessions(self) -> int:
        return len(self._sessions)

    def session_ids(self) -> list[str]:
        return list(self._sessions)

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self._address,
            "live_sessions": len(self._sessions),
            "capacity": self.config.max_sessions,
            "sessions_opened": self.sessions_opened,
            "sessions_closed": self.sessions_closed,
            "sessions": {sid: s.stats() for sid, s in self._sessions.items()},
        }

    async def start(self) -> str:
        if self._server is not None:
            raise StageError(f"stage host {self.name!r} already started")
        server = grpc.aio.server(options=self.config.transport.server_options())
        handler = grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Pipe": grpc.stream_stream_rpc_method_handler(
                    self._pipe,
                    request_deserializer=pb.StageMessage.FromString,
                    response_serializer=serialize_message,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        port = self._bind(server)
        await server.start()
        self._server = server
        self._address = format_address(self._advertised_host(), port)
        log.info("stage host %s serving on %s", self.name, self._address)
        return self._address

    def _bind(self, server: grpc.aio.Server) -> int:
        """Bind the configured port, or the first free one of `port_range` (several replicas share a node)."""
        host = self.config.bind_host
        candidates = range(self.config.port_range[0], self.config.port_range[1] + 1) if self.config.port_range \
            else (self.config.port,)
        for candidate in candidates:
            try:
                port = server.add_insecure_port(format_address(host, candidate))
            except RuntimeError:  # grpc raises for an address in use (older versions return 0)
                port = 0
            if port:
                return port
        where = format_address(host, self.config.port) if not self.config.port_range else \
            f"{host} on any port in {self.config.port_range[0]}-{self.config.port_range[1]}"
        raise StageError(f"cannot bind {where}")

    def _advertised_host(self) -> str:
        if self.config.advertise_host:
            return self.config.advertise_host
        if self.config.bind_host in ("0.0.0.0", "::", "[::]", ""):
            return socket.gethostbyname(socket.gethostname())
        return self.config.bind_host

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving; live sessions are cancelled (their state is freed at every hop)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace_s)
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
        await self._channels.close()
        self._address = None

    async def __aenter__(self) -> "StageHost":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


    def _reject(self, session_id: str, code: ErrorCode, message: str) -> pb.StageMessage:
        return pb.StageMessage(error=pb.Error(session_id=session_id, code=int(code), message=message, origin=self.name))

    async def _pipe(self, _requests: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            first = await asyncio.wait_for(context.read(), self.config.transport.open_timeout_s)
        except asyncio.TimeoutError:
            await context.write(self._reject("", ErrorCode.DEADLINE_EXCEEDED, "no open item received"))
            return
        if first is grpc.aio.EOF:
            return
        kind = first.WhichOneof("kind")
        if kind != "open":
            await context.write(self._reject("", ErrorCode.PROTOCOL, f"the first item on a pipe must be 'open', got {kind!r}"))
            return
        op = first.open
        try:
            validate_session_id(op.session_id)
            for addr in op.route:
                if ":" not in addr:
                    raise ProtocolError(f"route entry {addr!r} is not host:port")
        except ProtocolError as exc:
            await context.write(self._reject(op.session_id, exc.code, str(exc)))
            return
        sid = op.session_id
        if self.handler is None:
            await context.write(self._reject(sid, ErrorCode.UNAVAILABLE, f"{self.name} is still loading its model"))
            return
        previous = self._sessions.get(sid)
        if previous is not None and previous.terminal_queued:
            # The session's previous stream has ended and is freeing its state here (its caller may already have
            # seen end-of-stream and reopened): wait for that, bounded like any drain, instead of refusing.
            try:
                await asyncio.wait_for(previous.closed.wait(), self.config.drain_timeout_s)
            except asyncio.TimeoutError:
                pass
        if sid in self._sessions:
            await context.write(self._reject(sid, ErrorCode.ALREADY_EXISTS, f"session {sid!r} is already open on {self.name}"))
            return
        if len(self._sessions) >= self.config.max_sessions:
            await context.write(self._reject(sid, ErrorCode.RESOURCE_EXHAUSTED, f"{self.name} is at capacity ({self.config.max_sessions} sessions)"))
            return
        session = _HopSession(self, sid, list(op.route), op.config, context)
        self._sessions[sid] = session
        self.sessions_opened += 1
        await session.run()  # the session removes itself (`_forget`) once its state is freed

    def _forget(self, session: _HopSession) -> None:
        if self._sessions.get(session.sid) is session:
            del self._sessions[session.sid]
            self.sessions_closed += 1
        session.closed.set()


class BackgroundStageHost:
    """Runs a `StageHost` on its own event loop in a daemon thread.

    Keeps the data plane independent of the embedding process's loop (a Ray Serve replica's request handling, a
    synchronous bench). Starting has two phases with different rules:

    1. `start()`: the thread, its loop and the gRPC server. Bounded work whatever the model: it must finish within
       `server_timeout_s`, and a failure is raised at once.
    2. the handler: `handler_factory()` builds it (for a real stage: imports torch, reads weights, builds the
       model). It runs in the calling thread with no time limit: loading is slow on slow disks and busy machines,
       and slow is not failed. Until it is attached the server answers every Pipe with UNAVAILABLE.

    `start()` runs both; pass `on_phase` to observe them ("serving" once the server listens, "loading" while the
    factory runs, "ready" once the handler is attached). Asyncio objects a handler creates bind to the loop that
    first uses them (Python >= 3.10), which is the host's loop.
    """

    def __init__(self, handler_factory: Callable[[], StageHandler], config: Optional[StageHostConfig] = None) -> None:
        self._factory = handler_factory
        self._config = config or StageHostConfig()
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._host: Optional[StageHost] = None
        self._stop: Optional[asyncio.Event] = None
        self._ready = threading.Event()
        self._startup_error: Optional[BaseException] = None

    @property
    def host(self) -> StageHost:
        if self._host is None:
            raise StageError("background stage host is not started")
        return self._host

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise StageError("background stage host is not started")
        return self._loop

    @property
    def address(self) -> str:
        return self.host.address

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._host is not None

    @property
    def loaded(self) -> bool:
        return self._host is not None and self._host.handler is not None

    def start(self, server_timeout_s: float = 120.0, on_phase: Optional[Callable[[str], None]] = None) -> str:
        """Start the server (bounded by `server_timeout_s`), then build and attach the handler (no time limit)."""
        address = self.start_server(server_timeout_s)
        if on_phase is not None:
            on_phase("loading")
        self.load_handler(server_timeout_s)
        if on_phase is not None:
            on_phase("ready")
        return address

    def start_server(self, timeout_s: float = 120.0) -> str:
        if self._thread is not None:
            raise StageError("background stage host already started")
        self._thread = threading.Thread(target=self._main, name=f"stage-host-{self._config.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise StageError(f"stage host {self._config.name!r}: the data-plane server did not start within "
                             f"{timeout_s:g}s (timeouts.stage_start_s)")
        if self._startup_error is not None:
            raise StageError(f"stage host {self._config.name!r} failed to start: {_describe(self._startup_error)}") from self._startup_error
        return self.address

    def load_handler(self, attach_timeout_s: float = 120.0) -> None:
        handler = self._factory()  # no time limit: see the class docstring

        async def _attach() -> None:
            self.host.attach(handler)

        self.call(_attach(), attach_timeout_s)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            host = StageHost(None, self._config)
            await host.start()
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self._host = host
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await host.stop()

    def submit(self, coro: Coroutine[Any, Any, T]) -> "concurrent.futures.Future[T]":
        """Schedule `coro` on the host's loop (thread-safe)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return self.submit(coro).result(timeout_s)

    def stats(self, timeout_s: float = 10.0) -> dict[str, Any]:
        async def _stats() -> dict[str, Any]:
            return self.host.stats()

        return self.call(_stats(), timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None:
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            thread.join(timeout_s)
        self._thread = None
        self._host = None
