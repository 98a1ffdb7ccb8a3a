from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_INVALID_ARGUMENT: _ClassVar[ErrorCode]
    ERROR_CODE_PROTOCOL: _ClassVar[ErrorCode]
    ERROR_CODE_ALREADY_EXISTS: _ClassVar[ErrorCode]
    ERROR_CODE_UNAVAILABLE: _ClassVar[ErrorCode]
    ERROR_CODE_HANDLER_FAILED: _ClassVar[ErrorCode]
    ERROR_CODE_RESOURCE_EXHAUSTED: _ClassVar[ErrorCode]
    ERROR_CODE_DEADLINE_EXCEEDED: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_INVALID_ARGUMENT: ErrorCode
ERROR_CODE_PROTOCOL: ErrorCode
ERROR_CODE_ALREADY_EXISTS: ErrorCode
ERROR_CODE_UNAVAILABLE: ErrorCode
ERROR_CODE_HANDLER_FAILED: ErrorCode
ERROR_CODE_RESOURCE_EXHAUSTED: ErrorCode
ERROR_CODE_DEADLINE_EXCEEDED: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class HopStamp(_message.Message):
    __slots__ = ("hop", "recv_unix_ns", "start_unix_ns", "end_unix_ns")
    HOP_FIELD_NUMBER: _ClassVar[int]
    RECV_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    hop: str
    recv_unix_ns: int
    start_unix_ns: int
    end_unix_ns: int
    def __init__(self, hop: _Optional[str] = ..., recv_unix_ns: _Optional[int] = ..., start_unix_ns: _Optional[int] = ..., end_unix_ns: _Optional[int] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("session_id", "route", "config")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    route: _containers.RepeatedScalarFieldContainer[str]
    config: bytes
    def __init__(self, session_id: _Optional[str] = ..., route: _Optional[_Iterable[str]] = ..., config: _Optional[bytes] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "hops")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    hops: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., hops: _Optional[_Iterable[str]] = ...) -> None: ...

class Block(_message.Message):
    __slots__ = ("session_id", "block_index", "pts_ms", "tensors", "metadata", "stamps")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    PTS_MS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    STAMPS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    block_index: int
    pts_ms: int
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    metadata: _containers.ScalarMap[str, str]
    stamps: _containers.RepeatedCompositeFieldContainer[HopStamp]
    def __init__(self, session_id: _Optional[str] = ..., block_index: _Optional[int] = ..., pts_ms: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., stamps: _Optional[_Iterable[_Union[HopStamp, _Mapping]]] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("session_id", "kind", "apply_from_block", "tensors", "metadata", "origin")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    APPLY_FROM_BLOCK_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    kind: str
    apply_from_block: int
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    metadata: _containers.ScalarMap[str, str]
    origin: str
    def __init__(self, session_id: _Optional[str] = ..., kind: _Optional[str] = ..., apply_from_block: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., origin: _Optional[str] = ...) -> None: ...

class EndOfStream(_message.Message):
    __slots__ = ("session_id", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("session_id", "code", "message", "origin", "lost_hop")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    LOST_HOP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    code: ErrorCode
    message: str
    origin: str
    lost_hop: str
    def __init__(self, session_id: _Optional[str] = ..., code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., origin: _Optional[str] = ..., lost_hop: _Optional[str] = ...) -> None: ...

class StageMessage(_message.Message):
    __slots__ = ("open", "opened", "block", "control", "end", "error")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    open: Open
    opened: Opened
    block: Block
    control: Control
    end: EndOfStream
    error: Error
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., opened: _Optional[_Union[Opened, _Mapping]] = ..., block: _Optional[_Union[Block, _Mapping]] = ..., control: _Optional[_Union[Control, _Mapping]] = ..., end: _Optional[_Union[EndOfStream, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
