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
import collections
import concurrent.futures
import json
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Optional, Tuple, TypeVar, Union

import grpc
import grpc.aio

from avatarserve.serve.cancel_safe import wait_for
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
    START_BLOCK_KEY,
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
    # Session recovery (serve/dataplane/recovery.py): when a pipe breaks (a hop was lost, not a clean end or a handler
    # failure), keep the session's handler state this long for the gateway to reopen the pipe at a block <= the ones
    # done here (0: free it at once), and keep the last `memo_blocks` results to send again instead of recomputing.
    resume_hold_s: float = 0.0
    memo_blocks: int = 0
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
        if self.resume_hold_s < 0 or self.memo_blocks < 0:
            raise StageError(f"resume_hold_s and memo_blocks must be >= 0, got {self.resume_hold_s}, {self.memo_blocks}")


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


@dataclass
class _Parked:
    """A session whose pipe broke: its handler state is kept (for `resume_hold_s`) with the results of its last
    blocks, so a reopened pipe continues it exactly."""

    next_block: int  # the next block the handler expects
    memo: "collections.deque[tuple[int, list[tuple[bool, pb.StageMessage]]]]"
    timer: Optional[asyncio.Task[None]] = None

    def covers(self, start_block: int) -> bool:
        """Can blocks [start_block, next_block) be answered from the memo?"""
        if start_block >= self.next_block:
            return start_block == self.next_block
        held = {b for b, _ in self.memo}
        return all(b in held for b in range(start_block, self.next_block))


class _HopSession:
    """State of one session at one hop; lives exactly as long as the upstream Pipe call."""

    def __init__(self, host: "StageHost", session_id: str, route: list[str], config: bytes, context: grpc.aio.ServicerContext,
                 resumed: Optional[_Parked] = None) -> None:
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
        self.task: Optional[asyncio.Task[Any]] = None  # the Pipe call serving this session (cancelled to supersede it)
        # Results of the last blocks (sent again when a reopened pipe replays them) and the next block the handler
        # expects; carried over from a parked session when this pipe resumes one.
        self.memo: collections.deque = resumed.memo if resumed else collections.deque(maxlen=host.config.memo_blocks)
        self.next_block: Optional[int] = resumed.next_block if resumed else None
        self.resumed = resumed is not None
        self.clean_end = False  # end-of-stream passed through this hop: free the state, nothing to resume
        self.inflight: Optional[tuple[BlockItem, int, int, asyncio.Task[Any]]] = None  # the block being computed
        self.opening: Optional[asyncio.Task[None]] = None  # handler.open_session while it runs

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
            if not self.resumed:
                # Shielded: a handler opens in an executor thread that a cancel does not stop; if the caller goes
                # away meanwhile, `_cleanup` waits for the open and closes what it created (no stale session).
                self.opening = asyncio.get_running_loop().create_task(handler.open_session(self.sid, self.config),
                                                                      name=f"{self.sid}/open")
                try:
                    await asyncio.shield(self.opening)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.opening = None
                    await self.context.write(self._error(_code_of(exc), f"open_session failed: {_describe(exc)}"))
                    return
                self.opening = None
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
                    err = pb.Error(session_id=self.sid, code=int(exc.code), message=exc.message, origin=exc.origin or self.name,
                                   lost_hop=exc.lost_hop)
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
            if self.opening is not None:  # cancelled while the handler was opening: let it finish, then close it
                opening, self.opening = self.opening, None
                try:
                    await opening
                    self.handler_open = True
                except BaseException:  # noqa: BLE001 - the open failed: nothing to close
                    pass
            tasks = list(self.tasks.values())
            for t in tasks:
                t.cancel()
            if self.call is not None:
                self.call.cancel()  # frees the session at every downstream hop too
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if self.handler_open:
                self.handler_open = False
                settled = await self._settle_inflight()
                if settled and self.host.config.resume_hold_s > 0 and not self.clean_end and not self.failed_here \
                        and self.next_block is not None:
                    self.host._park(self.sid, _Parked(self.next_block, self.memo))
                else:
                    await self.host._close_handler_session(self.sid)
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
                # Callers end a pipe with an end-of-stream item; a bare half-close means the upstream hop went away.
                # End like a lost hop (not a clean end), so every hop downstream keeps the session for a reopen.
                self._abort(ErrorCode.UNAVAILABLE, "upstream closed the pipe without end-of-stream")
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
                self.clean_end = True
                if self.call is not None:
                    await self.down_q.put(pb.StageMessage(end=pb.EndOfStream(session_id=self.sid, reason=entry.reason)))
                else:
                    await self._put_up(pb.StageMessage(end=pb.EndOfStream(session_id=self.sid, reason=entry.reason)), terminal=True)
                return
            if isinstance(entry, _Fail):
                await self._fail(entry.code, entry.message)
                return
            item, recv = entry
            b = item.block_index
            if self.next_block is not None and b < self.next_block:
                # A reopened pipe replays a block this hop already did: send its results again (exact, no compute).
                messages = next((m for mb, m in self.memo if mb == b), None)
                if messages is None:
                    await self._fail(ErrorCode.PROTOCOL, f"block {b} was done here and its result is no longer held "
                                                         f"(next block {self.next_block})")
                    return
            else:
                start = now_ns()
                # Shielded: model work in an executor thread finishes even when this pipe is torn down, and the
                # handler's state then includes the block; `_cleanup` waits for it before parking the session.
                task = asyncio.get_running_loop().create_task(handler.process(self.sid, item), name=f"{self.sid}/{b}")
                self.inflight = (item, recv, start, task)
                try:
                    outs = await asyncio.shield(task)
                    messages = self._done(item, recv, start, outs)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.inflight = None
                    await self._fail(_code_of(exc), f"block {b}: {_describe(exc)}")
                    return
            for downstream, msg in messages:
                if downstream and self.call is not None:
                    await self.down_q.put(msg)
                else:
                    await self._put_up(msg)
            self.blocks_processed += 1

    def _done(self, item: BlockItem, recv: int, start: int, outs: Any) -> list[tuple[bool, pb.StageMessage]]:
        """A block the handler finished: its messages, remembered for a reopened pipe."""
        self.inflight = None
        messages = self._encode_outputs(outs, item, HopStamp(self.name, recv, start, now_ns()))
        self.next_block = item.block_index + 1
        if self.memo.maxlen:
            self.memo.append((item.block_index, messages))
        return messages

    async def _settle_inflight(self) -> bool:
        """Wait for a block the handler was computing when the pipe was torn down; False if it failed."""
        if self.inflight is None:
            return True
        item, recv, start, task = self.inflight
        try:
            # Bounded: a handler stuck on a block (the reason a caller may have given up on this pipe) must not
            # keep the session here forever.
            outs = await wait_for(asyncio.shield(task), self.host.config.drain_timeout_s)
            self._done(item, recv, start, outs)
            return True
        except BaseException:  # noqa: BLE001 - the block failed, was cancelled or is stuck: the state is unknown
            self.inflight = None
            if not task.done():
                log.warning("%s: session %s: block %d still running after %g s; freeing the session", self.name,
                            self.sid, item.block_index, self.host.config.drain_timeout_s)
                task.cancel()
            return False

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
                await wait_for(self._drain_downstream(), self.host.config.drain_timeout_s)
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
                        self.clean_end = self.clean_end or kind == "end"
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
                lost = self._error(ErrorCode.UNAVAILABLE, problem)
                lost.error.lost_hop = next_hop
                await self._put_up(lost, terminal=True)
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


def _start_block(config: bytes) -> Optional[int]:
    """The start block of a reopened pipe (`START_BLOCK_KEY` in the session config JSON); None for a fresh one."""
    try:
        value = json.loads(config or b"{}").get(START_BLOCK_KEY)
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


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
        self._parked: dict[str, _Parked] = {}  # sessions whose pipe broke, kept for a reopen (resume_hold_s)
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
        return len(self._sessions) + len(self._parked)

    @property
    def parked_sessions(self) -> int:
        return len(self._parked)

    async def _close_handler_session(self, sid: str) -> None:
        try:
            await self.handler.close_session(sid)
        except Exception:
            log.exception("%s: close_session(%s) failed", self.name, sid)

    def _park(self, sid: str, parked: _Parked) -> None:
        """Keep a broken pipe's session state for `resume_hold_s` (then free it)."""
        async def expire() -> None:
            await asyncio.sleep(self.config.resume_hold_s)
            if self._parked.get(sid) is parked:
                del self._parked[sid]
                log.info("%s: session %s was not reopened within %g s; freed", self.name, sid, self.config.resume_hold_s)
                await self._close_handler_session(sid)

        old = self._parked.pop(sid, None)
        if old is not None and old.timer is not None:
            old.timer.cancel()
        parked.timer = asyncio.get_running_loop().create_task(expire(), name=f"{sid}/parked")
        self._parked[sid] = parked

    def _unpark(self, sid: str) -> Optional[_Parked]:
        parked = self._parked.pop(sid, None)
        if parked is not None and parked.timer is not None:
            parked.timer.cancel()
        return parked

    def session_ids(self) -> list[str]:
        return list(self._sessions) + [sid for sid in self._parked if sid not in self._sessions]

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self._address,
            "live_sessions": self.live_sessions,
            "parked_sessions": len(self._parked),
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
        for sid in list(self._parked):
            self._unpark(sid)
            if self.handler is not None:
                await self._close_handler_session(sid)
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
            first = await wait_for(context.read(), self.config.transport.open_timeout_s)
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
        if previous is not None:
            # The session's previous pipe is still here. Either it ended and is freeing its state (its caller may
            # already have seen end-of-stream and reopened), or its caller is gone (a hop further up died, or the
            # client vanished) and this hop has not noticed yet. Only the gateway holding the session's stream lock
            # opens pipes for it, so a new open supersedes the old pipe: end it, then wait (bounded like a drain)
            # for its state to be freed instead of refusing.
            if not previous.terminal_queued:
                log.info("%s: session %s reopened; ending its previous pipe", self.name, sid)
                previous._abort(ErrorCode.UNAVAILABLE, f"session {sid!r} was reopened on {self.name}: this pipe "
                                                       "is superseded")
            try:
                await wait_for(previous.closed.wait(), self.config.drain_timeout_s)
            except asyncio.TimeoutError:
                if previous.task is not None:  # its caller stopped reading: cancel the call outright
                    previous.task.cancel()
                    await asyncio.wait({asyncio.ensure_future(previous.closed.wait())}, timeout=self.config.drain_timeout_s)
        if sid in self._sessions:
            await context.write(self._reject(sid, ErrorCode.ALREADY_EXISTS, f"session {sid!r} is already open on {self.name}"))
            return
        parked = self._unpark(sid)
        if parked is not None:
            start = _start_block(op.config)
            if start is None or not parked.covers(start):
                # A fresh stream, or a reopen this hop cannot continue exactly: rebuild from the config instead.
                await self._close_handler_session(sid)
                parked = None
            else:
                log.info("%s: session %s resumes at block %d (next block here %d)", self.name, sid, start,
                         parked.next_block)
        if parked is None and len(self._sessions) + len(self._parked) >= self.config.max_sessions:
            await context.write(self._reject(sid, ErrorCode.RESOURCE_EXHAUSTED, f"{self.name} is at capacity ({self.config.max_sessions} sessions)"))
            return
        session = _HopSession(self, sid, list(op.route), op.config, context, resumed=parked)
        session.task = asyncio.current_task()
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
