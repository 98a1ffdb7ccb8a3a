"""gRPC data plane between stage replicas: items, tensor codec, wire helpers and the caller side.

A session's blocks travel over one long-lived bidi `StageService.Pipe` per hop (see
`protos/avatarserve/stage/v1/stage.proto`). This module holds what both ends share:

- `WireTensor`: a dense tensor as it travels (dtype name, shape, raw little-endian bytes), with
  zero-copy views as numpy arrays or torch tensors (bfloat16 included);
- `BlockItem` / `ControlItem` / `HopStamp`: the engine-agnostic items handlers see;
- `StageHandler`: the protocol a stage's engine implements; `ControlBoard`: lets a handler wait
  deterministically for an upstream control item (the Adaptive Attention Sink update);
- `PipelineClient` / `PipelineSession`: what the gateway uses to open a session on a route, send
  blocks, and receive results, control items and errors, all in order on one stream.

Hops relay results of the tail towards the caller without parsing them: a `StageMessage` holds
only its oneof, so the first field tag of the serialized bytes names its kind (`message_kind`).
"""

from __future__ import annotations

import asyncio
import enum
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import grpc
import grpc.aio
import numpy as np
from avatarserve_client._streaming import wait_event  # one cancel-safe wait for the SDK and the server

from avatarserve.serve.cancel_safe import wait_for
from avatarserve.stage.v1 import stage_pb2 as pb

if TYPE_CHECKING:  # torch is imported lazily: the gateway path does not need it to relay bytes.
    import torch

__all__ = [
    "PIPE_METHOD",
    "SERVICE_NAME",
    "ControlBoard",
    "ControlItem",
    "ControlTimeoutError",
    "BlockItem",
    "ErrorCode",
    "HopStamp",
    "Item",
    "PipelineClient",
    "PipelineError",
    "PipelineSession",
    "ProtocolError",
    "StageError",
    "StageHandler",
    "TensorCodecError",
    "TransportOptions",
    "WireTensor",
    "block_from_proto",
    "block_to_proto",
    "control_from_proto",
    "control_to_proto",
    "message_kind",
    "now_ns",
    "open_pipe",
    "serialize_message",
    "validate_session_id",
]

PIPE_METHOD = "/" + pb.DESCRIPTOR.services_by_name["StageService"].full_name + "/Pipe"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StageService"].full_name
MAX_SESSION_ID_LEN = 256


# --------------------------------------------------------------------------------------- errors


# Session config key (JSON in the Open item): the block a (re)opened pipe starts at; > 0 when the gateway rebuilds a
# session on a new route after a replica loss (serve/dataplane/recovery.py).
START_BLOCK_KEY = "start_block"
# Block metadata key: "1" on a block replayed to rebuild state after a replica loss; its output is not delivered again.
REPLAY_KEY = "replay"
# Block metadata key: the block's deadline, unix milliseconds (its audio span's end on the stream's wall clock plus
# `late_after_s`): stages run blocks earliest deadline first (engine/scheduler.py).
DEADLINE_KEY = "deadline_ms"


class ErrorCode(enum.IntEnum):
    """Mirror of `avatarserve.stage.v1.ErrorCode` (typed on the Python side)."""

    UNSPECIFIED = pb.ERROR_CODE_UNSPECIFIED
    INVALID_ARGUMENT = pb.ERROR_CODE_INVALID_ARGUMENT
    PROTOCOL = pb.ERROR_CODE_PROTOCOL
    ALREADY_EXISTS = pb.ERROR_CODE_ALREADY_EXISTS
    UNAVAILABLE = pb.ERROR_CODE_UNAVAILABLE
    HANDLER_FAILED = pb.ERROR_CODE_HANDLER_FAILED
    RESOURCE_EXHAUSTED = pb.ERROR_CODE_RESOURCE_EXHAUSTED
    DEADLINE_EXCEEDED = pb.ERROR_CODE_DEADLINE_EXCEEDED
    INTERNAL = pb.ERROR_CODE_INTERNAL


class StageError(Exception):
    """Base of data-plane errors. A handler may raise a subclass to choose the wire error code."""

    code: ErrorCode = ErrorCode.INTERNAL


class TensorCodecError(StageError, ValueError):
    """A tensor cannot be encoded or decoded (unknown dtype, byte count does not match shape...)."""

    code = ErrorCode.INVALID_ARGUMENT


class ProtocolError(StageError):
    """A peer broke the Pipe protocol (no Open first, unexpected item kind, wrong session id...)."""

    code = ErrorCode.PROTOCOL


class ControlTimeoutError(StageError):
    """An awaited control item did not arrive in time."""

    code = ErrorCode.DEADLINE_EXCEEDED


class PipelineError(StageError):
    """An Error item that reached the caller: the session is closed at every hop."""

    def __init__(self, code: ErrorCode, message: str, *, origin: str = "", session_id: str = "",
                 lost_hop: str = "") -> None:
        self.code = code
        self.message = message
        self.origin = origin
        self.session_id = session_id
        self.lost_hop = lost_hop  # address of a hop whose process or stream was lost (the session can be re-placed)
        where = f" at {origin}" if origin else ""
        super().__init__(f"session {session_id!r} failed{where} [{code.name}]: {message}")

    @classmethod
    def from_proto(cls, err: pb.Error) -> "PipelineError":
        try:
            code = ErrorCode(err.code)
        except ValueError:
            code = ErrorCode.UNSPECIFIED
        return cls(code, err.message, origin=err.origin, session_id=err.session_id, lost_hop=err.lost_hop)


def validate_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not session_id:
        raise ProtocolError(f"session_id must be a non-empty string, got {session_id!r}")
    if len(session_id) > MAX_SESSION_ID_LEN:
        raise ProtocolError(f"session_id is {len(session_id)} characters long; the limit is {MAX_SESSION_ID_LEN}")
    if not session_id.isprintable():
        raise ProtocolError(f"session_id {session_id!r} contains non-printable characters")
    return session_id


# --------------------------------------------------------------------------------------- tensors

# dtype name -> (numpy dtype or None when numpy has none, bytes per element)
_NUMPY_DTYPES: dict[str, Optional[np.dtype]] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": None,
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
_ITEMSIZE = {name: (2 if dt is None else dt.itemsize) for name, dt in _NUMPY_DTYPES.items()}
_NUMPY_KIND_TO_NAME = {dt.str.lstrip("<|>="): name for name, dt in _NUMPY_DTYPES.items() if dt is not None}
_LITTLE = sys.byteorder == "little"


def _torch_dtypes() -> dict[str, "torch.dtype"]:
    import torch

    return {
        "float64": torch.float64,
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int64": torch.int64,
        "int32": torch.int32,
        "int16": torch.int16,
        "int8": torch.int8,
        "uint8": torch.uint8,
        "bool": torch.bool,
    }


@dataclass(frozen=True, slots=True)
class WireTensor:
    """A dense tensor as it crosses a hop: dtype name, shape and C-contiguous little-endian bytes.

    Passing a `WireTensor` through a stage unchanged costs no decode/encode. `numpy()` and
    `torch()` return zero-copy, read-only views of `data` (copy before writing in place).
    """

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in _ITEMSIZE:
            raise TensorCodecError(f"unsupported dtype {self.dtype!r}; supported: {sorted(_ITEMSIZE)}")
        if any((not isinstance(d, int)) or d < 0 for d in self.shape):
            raise TensorCodecError(f"shape {self.shape!r} must be non-negative integers")
        if not isinstance(self.data, bytes):
            raise TensorCodecError(f"data must be bytes, got {type(self.data).__name__}")
        expected = math.prod(self.shape) * _ITEMSIZE[self.dtype]
        if len(self.data) != expected:
            raise TensorCodecError(
                f"{self.dtype}{list(self.shape)} needs {expected} bytes, got {len(self.data)}"
            )

    @property
    def nbytes(self) -> int:
        return len(self.data)

    # ---- encode

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "WireTensor":
        if not isinstance(array, np.ndarray):
            raise TensorCodecError(f"expected a numpy array, got {type(array).__name__}")
        name = _NUMPY_KIND_TO_NAME.get(array.dtype.newbyteorder("<").str.lstrip("<|>="))
        if name is None:
            raise TensorCodecError(f"unsupported numpy dtype {array.dtype}; supported: {sorted(_NUMPY_KIND_TO_NAME.values())}")
        target = _NUMPY_DTYPES[name]
        assert target is not None
        # tobytes() is the single unavoidable copy: the protobuf bytes field needs a bytes object.
        return cls(name, tuple(int(d) for d in array.shape), np.ascontiguousarray(array, dtype=target).tobytes())

    @classmethod
    def from_torch(cls, tensor: "torch.Tensor") -> "WireTensor":
        import torch

        if not isinstance(tensor, torch.Tensor):
            raise TensorCodecError(f"expected a torch tensor, got {type(tensor).__name__}")
        names = {v: k for k, v in _torch_dtypes().items()}
        name = names.get(tensor.dtype)
        if name is None:
            raise TensorCodecError(f"unsupported torch dtype {tensor.dtype}; supported: {sorted(names.values())}")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        if name == "bfloat16":  # numpy has no bfloat16: move the raw 16-bit words
            t = t.view(torch.int16)
        raw = t.numpy()
        if not _LITTLE:
            raw = raw.byteswap()
        return cls(name, tuple(int(d) for d in tensor.shape), raw.tobytes())

    @classmethod
    def of(cls, value: "TensorLike") -> "WireTensor":
        """Accept a WireTensor, numpy array or torch tensor."""
        if isinstance(value, WireTensor):
            return value
        if isinstance(value, np.ndarray):
            return cls.from_numpy(value)
        if type(value).__module__.startswith("torch"):
            return cls.from_torch(value)
        raise TensorCodecError(f"cannot encode {type(value).__name__} as a tensor (need numpy, torch or WireTensor)")

    # ---- decode

    def numpy(self) -> np.ndarray:
        dt = _NUMPY_DTYPES[self.dtype]
        if dt is None:
            raise TensorCodecError(f"{self.dtype} has no numpy dtype; use WireTensor.torch()")
        return np.frombuffer(self.data, dtype=dt).reshape(self.shape)

    def torch(self) -> "torch.Tensor":
        import torch

        dt = _torch_dtypes()[self.dtype]
        if not self.data:
            return torch.empty(self.shape, dtype=dt)
        with warnings.catch_warnings():
            # The view is read-only in spirit; torch warns because bytes is immutable.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(self.data, dtype=dt)
        return flat.view(self.shape)

    # ---- proto

    def to_proto(self, name: str) -> pb.Tensor:
        return pb.Tensor(name=name, dtype=self.dtype, shape=self.shape, data=self.data)

    @classmethod
    def from_proto(cls, t: pb.Tensor) -> "WireTensor":
        return cls(t.dtype, tuple(int(d) for d in t.shape), t.data)


TensorLike = Union[WireTensor, np.ndarray, "torch.Tensor"]


def _tensors_to_proto(tensors: Mapping[str, TensorLike]) -> list[pb.Tensor]:
    out = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TensorCodecError(f"tensor names must be non-empty strings, got {name!r}")
        out.append(WireTensor.of(value).to_proto(name))
    return out


def _tensors_from_proto(tensors: Sequence[pb.Tensor]) -> dict[str, WireTensor]:
    out: dict[str, WireTensor] = {}
    for t in tensors:
        if not t.name:
            raise TensorCodecError("a tensor has an empty name")
        if t.name in out:
            raise TensorCodecError(f"tensor name {t.name!r} appears twice in one item")
        out[t.name] = WireTensor.from_proto(t)
    return out


# --------------------------------------------------------------------------------------- items


@dataclass(frozen=True, slots=True)
class HopStamp:
    """Wall-clock (Unix ns) times one hop saw a block; see `HopStamp` in stage.proto."""

    hop: str
    recv_unix_ns: int = 0
    start_unix_ns: int = 0
    end_unix_ns: int = 0


@dataclass(slots=True)
class BlockItem:
    """One block of one session flowing towards the tail (latent, audio features...)."""

    block_index: int
    tensors: dict[str, TensorLike] = field(default_factory=dict)
    pts_ms: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    stamps: list[HopStamp] = field(default_factory=list)

    def tensor(self, name: str) -> WireTensor:
        try:
            return WireTensor.of(self.tensors[name])
        except KeyError:
            raise TensorCodecError(f"block {self.block_index} has no tensor {name!r} (has {sorted(self.tensors)})") from None


@dataclass(slots=True)
class ControlItem:
    """An item a hop sends back towards the head (delivered to every upstream handler, then the caller)."""

    kind: str
    apply_from_block: int = 0
    tensors: dict[str, TensorLike] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    origin: str = ""


Item = Union[BlockItem, ControlItem]


def block_to_proto(session_id: str, item: BlockItem) -> pb.Block:
    if item.block_index < 0:
        raise TensorCodecError(f"block_index must be >= 0, got {item.block_index}")
    return pb.Block(
        session_id=session_id,
        block_index=item.block_index,
        pts_ms=item.pts_ms,
        tensors=_tensors_to_proto(item.tensors),
        metadata=item.metadata,
        stamps=[pb.HopStamp(hop=s.hop, recv_unix_ns=s.recv_unix_ns, start_unix_ns=s.start_unix_ns, end_unix_ns=s.end_unix_ns) for s in item.stamps],
    )


def block_from_proto(block: pb.Block) -> BlockItem:
    return BlockItem(
        block_index=int(block.block_index),
        tensors=dict(_tensors_from_proto(block.tensors)),
        pts_ms=int(block.pts_ms),
        metadata=dict(block.metadata),
        stamps=[HopStamp(s.hop, s.recv_unix_ns, s.start_unix_ns, s.end_unix_ns) for s in block.stamps],
    )


def control_to_proto(session_id: str, item: ControlItem) -> pb.Control:
    if not item.kind:
        raise ProtocolError("a control item needs a non-empty kind")
    if item.apply_from_block < 0:
        raise ProtocolError(f"apply_from_block must be >= 0, got {item.apply_from_block}")
    return pb.Control(
        session_id=session_id,
        kind=item.kind,
        apply_from_block=item.apply_from_block,
        tensors=_tensors_to_proto(item.tensors),
        metadata=item.metadata,
        origin=item.origin,
    )


def control_from_proto(ctl: pb.Control) -> ControlItem:
    return ControlItem(
        kind=ctl.kind,
        apply_from_block=int(ctl.apply_from_block),
        tensors=dict(_tensors_from_proto(ctl.tensors)),
        metadata=dict(ctl.metadata),
        origin=ctl.origin,
    )


# --------------------------------------------------------------------------------------- wire

_FIELD_NAMES = {f.number: f.name for f in pb.StageMessage.DESCRIPTOR.fields}


def message_kind(message: Union[bytes, pb.StageMessage]) -> str:
    """Kind ("open", "block", "control", "end", "error", "opened") of a message or its serialized bytes.

    For bytes only the leading field tag is decoded, which names the oneof member because
    `StageMessage` has no other fields.
    """
    if isinstance(message, pb.StageMessage):
        kind = message.WhichOneof("kind")
        if kind is None:
            raise ProtocolError("empty StageMessage (no item set)")
        return kind
    tag, shift = 0, 0
    for i, byte in enumerate(message[:10]):
        tag |= (byte & 0x7F) << shift
        if not byte & 0x80:
            name = _FIELD_NAMES.get(tag >> 3)
            if name is None or (tag & 7) != 2:
                raise ProtocolError(f"serialized StageMessage starts with unknown field tag {tag}")
            return name
        shift += 7
    raise ProtocolError("empty or truncated serialized StageMessage")


def serialize_message(message: Union[bytes, pb.StageMessage]) -> bytes:
    """gRPC serializer that lets relayed, already serialized messages through untouched."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def now_ns() -> int:
    return time.time_ns()


@dataclass(frozen=True)
class TransportOptions:
    """Knobs shared by hops and the caller."""

    max_message_bytes: int = 64 * 1024 * 1024  # a 704x384 VAE block of 12 frames is ~10 MB
    queue_size: int = 2  # per-session bounded queues at each hop: the back-pressure bound
    open_timeout_s: float = 30.0
    keepalive_s: float = 20.0
    # Fixed HTTP/2 stream window. gRPC's default BDP auto-tuning grows windows to several MB per
    # stream on fast links, i.e. ~10 latents buffered per stalled hop; a fixed window bounds what
    # a stalled session holds while still allowing ~window/RTT bytes/s (1 MiB / 0.2 ms = 5 GB/s).
    # None: gRPC's auto-tuning.
    stream_window_bytes: Optional[int] = 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise StageError(f"max_message_bytes={self.max_message_bytes} is too small")
        if self.queue_size < 1:
            raise StageError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.open_timeout_s <= 0:
            raise StageError(f"open_timeout_s must be > 0, got {self.open_timeout_s}")
        if self.stream_window_bytes is not None and self.stream_window_bytes < 65535:
            raise StageError(f"stream_window_bytes must be >= 65535 (the HTTP/2 minimum), got {self.stream_window_bytes}")

    def _window_options(self) -> list[tuple[str, Any]]:
        if self.stream_window_bytes is None:
            return []
        return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", self.stream_window_bytes)]

    def channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            # One channel per peer address carries every session; no subchannel sharing games.
            ("grpc.use_local_subchannel_pool", 1),
            *self._window_options(),
        ]

    def server_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", int(self.keepalive_s * 1000 // 2)),
            ("grpc.keepalive_permit_without_calls", 1),
            # gRPC sets SO_REUSEPORT by default: two replicas would then both "bind" one port of a fixed range and
            # share its connections. Each data-plane server owns its port.
            ("grpc.so_reuseport", 0),
            *self._window_options(),
        ]


# --------------------------------------------------------------------------------------- handler


@runtime_checkable
class StageHandler(Protocol):
    """What a stage's engine implements. All methods run on the host's event loop: run CPU/GPU
    work in an executor (`loop.run_in_executor`) so other sessions keep flowing.

    `process` returns 0..n items: `BlockItem`s continue towards the tail (or reach the caller
    from the last hop), `ControlItem`s travel back towards the head. Raising closes this session
    only; raise a `StageError` subclass to pick the error code. A handler may also define
    `async def on_control(self, session_id, item: ControlItem) -> None`, called for every
    control item emitted by a downstream hop of that session (see `ControlBoard`).
    """

    async def open_session(self, session_id: str, config: bytes) -> None: ...

    async def process(self, session_id: str, item: BlockItem) -> list[Item]: ...

    async def close_session(self, session_id: str) -> None: ...


class ControlBoard:
    """Per-session store of control items received from downstream, with deterministic waits.

    A consumer that must apply an update before block N calls
    `await board.wait_for(session_id, kind, for_block=N)`: it returns the newest item of that kind
    with `apply_from_block <= N` as soon as one has arrived (immediately if it already has).
    Only the newest `history` items per kind are kept.
    """

    def __init__(self, history: int = 4) -> None:
        if history < 1:
            raise StageError(f"history must be >= 1, got {history}")
        self._history = history
        self._items: dict[str, dict[str, list[ControlItem]]] = {}
        self._events: dict[str, asyncio.Event] = {}

    def open(self, session_id: str) -> None:
        self._items.setdefault(session_id, {})

    def publish(self, session_id: str, item: ControlItem) -> None:
        kinds = self._items.get(session_id)
        if kinds is None:
            raise ProtocolError(f"control item {item.kind!r} for session {session_id!r}, which is not open here")
        lst = kinds.setdefault(item.kind, [])
        lst.append(item)
        lst.sort(key=lambda c: c.apply_from_block)
        del lst[: -self._history]
        ev = self._events.pop(session_id, None)
        if ev is not None:
            ev.set()  # wake every waiter; each re-checks its own condition

    def latest(self, session_id: str, kind: str, *, for_block: Optional[int] = None) -> Optional[ControlItem]:
        for item in reversed(self._items.get(session_id, {}).get(kind, [])):
            if for_block is None or item.apply_from_block <= for_block:
                return item
        return None

    async def wait_for(self, session_id: str, kind: str, *, for_block: int, timeout_s: float = 60.0) -> ControlItem:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            if session_id not in self._items:
                raise ProtocolError(f"session {session_id!r} is not open on this control board")
            found = self.latest(session_id, kind, for_block=for_block)
            if found is not None:
                return found
            ev = self._events.setdefault(session_id, asyncio.Event())
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise ControlTimeoutError(f"no {kind!r} control item applicable to block {for_block} arrived within {timeout_s:g}s")
            await wait_event(ev, remaining)

    def close(self, session_id: str) -> None:
        self._items.pop(session_id, None)
        ev = self._events.pop(session_id, None)
        if ev is not None:
            ev.set()  # waiters re-check and raise "not open"

    def sessions(self) -> list[str]:
        return list(self._items)


# --------------------------------------------------------------------------------------- caller


class PipelineSession:
    """One open session, seen from the caller: send blocks, read results in order.

    Read concurrently with sending: queues are bounded at every hop, so a caller that only sends
    eventually blocks in `send` until it reads (that is the back-pressure).
    """

    def __init__(self, session_id: str, route: Sequence[str], hops: Sequence[str], call: grpc.aio.StreamStreamCall) -> None:
        self.session_id = session_id
        self.route = tuple(route)
        self.hops = tuple(hops)
        self._call = call
        self._ended = False  # we sent end-of-stream
        self._finished = False  # terminal item received or session closed
        self._error: Optional[PipelineError] = None

    @property
    def finished(self) -> bool:
        return self._finished

    async def send(self, item: BlockItem) -> None:
        """Send one block; blocks while the pipeline is full."""
        if self._error is not None:
            raise self._error
        if self._ended or self._finished:
            raise ProtocolError(f"session {self.session_id!r}: send after end/close")
        stamps = list(item.stamps) + [HopStamp("client", 0, 0, now_ns())]
        msg = pb.StageMessage(block=block_to_proto(self.session_id, BlockItem(item.block_index, item.tensors, item.pts_ms, item.metadata, stamps)))
        try:
            await self._call.write(msg)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            if self._error is not None:
                raise self._error from exc
            raise PipelineError(ErrorCode.UNAVAILABLE, f"stream to {self.route[0]} closed: {exc}", session_id=self.session_id,
                                lost_hop=self.route[0]) from exc

    async def end(self, reason: str = "") -> None:
        """Half-close: no more blocks; results of blocks in flight still arrive, then None."""
        if self._ended or self._finished:
            return
        self._ended = True
        try:
            await self._call.write(pb.StageMessage(end=pb.EndOfStream(session_id=self.session_id, reason=reason)))
            await self._call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the stream already ended; receive() reports why

    async def receive(self) -> Optional[Item]:
        """Next result block or control item, in order; None after the tail's end-of-stream.

        Raises `PipelineError` when any hop failed (after every result produced before the failure).
        """
        if self._error is not None:
            raise self._error
        if self._finished:
            return None
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            self._finished = True
            code = ErrorCode.DEADLINE_EXCEEDED if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else ErrorCode.UNAVAILABLE
            self._error = PipelineError(code, f"stream to {self.route[0]} broke: {exc.code().name} {exc.details()}",
                                        session_id=self.session_id, lost_hop=self.route[0])
            raise self._error from exc
        except asyncio.CancelledError:
            raise
        if msg is grpc.aio.EOF:
            self._finished = True
            self._error = PipelineError(ErrorCode.UNAVAILABLE, f"{self.route[0]} closed the stream without end-of-stream",
                                        session_id=self.session_id, lost_hop=self.route[0])
            raise self._error
        kind = message_kind(msg)
        if kind == "block":
            return block_from_proto(msg.block)
        if kind == "control":
            return control_from_proto(msg.control)
        self._finished = True
        if kind == "end":
            return None
        if kind == "error":
            self._error = PipelineError.from_proto(msg.error)
            raise self._error
        self._error = PipelineError(ErrorCode.PROTOCOL, f"unexpected {kind!r} item from {self.route[0]}", session_id=self.session_id)
        raise self._error

    async def __aiter__(self) -> AsyncIterator[Item]:
        while True:
            item = await self.receive()
            if item is None:
                return
            yield item

    async def close(self) -> None:
        """Abort (if still running): cancelling the stream frees the session's state at every hop."""
        self._finished = True
        self._call.cancel()

    async def __aenter__(self) -> "PipelineSession":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_pipe(
    channel: grpc.aio.Channel,
    session_id: str,
    route: Sequence[str],
    config: bytes,
    timeout_s: float,
    *,
    raw_responses: bool = False,
) -> tuple[grpc.aio.StreamStreamCall, list[str]]:
    """Open a Pipe on `channel` (the first hop) for `route[1:]`; return the call and hop names.

    With `raw_responses` the call yields serialized messages (bytes), which a relaying hop
    forwards without parsing. Raises `PipelineError` carrying the failing hop's error when the
    chain cannot open.
    """
    deserializer = None if raw_responses else pb.StageMessage.FromString
    call = channel.stream_stream(PIPE_METHOD, request_serializer=serialize_message, response_deserializer=deserializer)()
    target = route[0] if route else "?"
    async def handshake() -> Any:
        await call.write(pb.StageMessage(open=pb.Open(session_id=session_id, route=list(route[1:]), config=config)))
        return await call.read()

    try:
        # The write is bounded too: it waits for the stream to start on a connection every session shares.
        first = await wait_for(handshake(), timeout_s)
    except asyncio.TimeoutError:
        call.cancel()
        raise PipelineError(ErrorCode.DEADLINE_EXCEEDED, f"{target} did not acknowledge the open within {timeout_s:g}s", session_id=session_id) from None
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
        call.cancel()
        detail = f"{exc.code().name} {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        raise PipelineError(ErrorCode.UNAVAILABLE, f"cannot open a pipe to {target}: {detail}", session_id=session_id,
                            lost_hop=target) from exc
    except BaseException:
        call.cancel()
        raise
    if first is grpc.aio.EOF:
        call.cancel()
        raise PipelineError(ErrorCode.UNAVAILABLE, f"{target} closed the stream during open", session_id=session_id,
                            lost_hop=target)
    if isinstance(first, bytes):
        first = pb.StageMessage.FromString(first)
    kind = message_kind(first)
    if kind == "opened":
        return call, list(first.opened.hops)
    call.cancel()
    if kind == "error":
        raise PipelineError.from_proto(first.error)
    raise PipelineError(ErrorCode.PROTOCOL, f"{target} answered the open with {kind!r}", session_id=session_id)


class ChannelPool:
    """One gRPC channel per next-hop address, shared by every session that goes there (one HTTP/2 stream each).
    Bound to the event loop that uses it, like grpc.aio channels."""

    def __init__(self, options: TransportOptions) -> None:
        self.options = options
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = grpc.aio.insecure_channel(address, options=self.options.channel_options())
            self._channels[address] = ch
        return ch

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()


class PipelineClient:
    """Caller side of the data plane (the gateway): opens sessions on a route of hop addresses."""

    def __init__(self, options: Optional[TransportOptions] = None) -> None:
        self.options = options or TransportOptions()
        self._channels = ChannelPool(self.options)

    async def open(self, session_id: str, route: Sequence[str], config: bytes = b"", *, timeout_s: Optional[float] = None) -> PipelineSession:
        """Open `session_id` on `route` (hop addresses, head first); returns once every hop is ready."""
        validate_session_id(session_id)
        route = list(route)
        if not route:
            raise ProtocolError("route must list at least one hop address")
        for addr in route:
            if not isinstance(addr, str) or ":" not in addr:
                raise ProtocolError(f"hop address {addr!r} is not host:port")
        if not isinstance(config, (bytes, bytearray)):
            raise ProtocolError(f"config must be bytes, got {type(config).__name__}")
        call, hops = await open_pipe(self._channels.get(route[0]), session_id, route, bytes(config), timeout_s or self.options.open_timeout_s)
        return PipelineSession(session_id, route, hops, call)

    async def close(self) -> None:
        await self._channels.close()

    async def __aenter__(self) -> "PipelineClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
