"""Typed errors of the AvatarServe SDK.

Every gRPC failure surfaces as a subclass of :class:`AvatarServeError` chosen from the status
code, keeping the server's message. Local input problems (a bad WAV, a non-image file) raise the
same classes (mostly :class:`InvalidArgument`) before anything is sent.
"""

from __future__ import annotations

from typing import Any

import grpc

RETRY_AFTER_METADATA_KEY = "retry-after-ms"


class AvatarServeError(Exception):
    """Base class of every error raised by the SDK.

    Attributes:
        code: the gRPC status code, or None for purely local errors.
        details: the server's (or SDK's) message, without decoration.
    """

    default_code: grpc.StatusCode | None = None

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None) -> None:
        self.details = details
        self.code = code if code is not None else self.default_code
        super().__init__(details)

    def __str__(self) -> str:
        if self.code is None:
            return self.details
        return f"{self.code.name}: {self.details}"


class InvalidArgument(AvatarServeError, ValueError):
    """The request was malformed: bad image, bad audio format, bad option value."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class SessionNotFound(AvatarServeError):
    """The session id is unknown to the server (or the Serve application does not exist)."""

    default_code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(AvatarServeError):
    """The caller is known but not allowed: a revoked API key, or a session token that does not match the
    session."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(PermissionDenied):
    """CreateSession without an API key, or with one the server does not know: pass ``api_key=`` or set
    AVATARSERVE_API_KEY. (A PermissionDenied too, so code catching that keeps working.)"""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class CapacityExhausted(AvatarServeError):
    """No capacity right now. ``retry_after_s`` is the server's hint (None if it gave none)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(details, code=code)
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        base = super().__str__()
        if self.retry_after_s is None:
            return base
        return f"{base} (retry after {self.retry_after_s:.3f} s)"


class FailedPrecondition(AvatarServeError):
    """The session is in the wrong state (stream already open, session closed or failed)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(AvatarServeError):
    """The server cannot be reached or is draining; retrying later may succeed."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(AvatarServeError):
    """The call's deadline passed before the server answered."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(AvatarServeError):
    """The call was cancelled (by this client or by the server)."""

    default_code = grpc.StatusCode.CANCELLED


class ServerError(AvatarServeError):
    """Any other status (INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS, ...)."""


class ProtocolError(AvatarServeError):
    """The server sent something this SDK cannot interpret (e.g. an undecodable frame)."""


class MediaError(AvatarServeError):
    """Local media handling failed (decoding frames, writing an MP4)."""


class MissingDependency(AvatarServeError, ImportError):
    """A feature needs an optional package that is not installed (the message names the extra)."""

    def __init__(self, module: str, extra: str, feature: str) -> None:
        super().__init__(f"{feature} needs the Python package {module!r}, which is not installed; "
                         f"install it with: pip install 'avatarserve-client[{extra}]'")
        self.name = module
        self.extra = extra


_CODE_TO_CLASS: dict[grpc.StatusCode, type[AvatarServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: SessionNotFound,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def _retry_after_s(trailing: Any) -> float | None:
    """Parse `retry-after-ms` from trailing metadata (sync tuples or aio Metadata)."""
    if not trailing:
        return None
    for item in trailing:
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        if key.lower() != RETRY_AFTER_METADATA_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        try:
            millis = float(value)
        except ValueError:
            return None  # a malformed hint is no hint
        return max(millis, 0.0) / 1000.0
    return None


def from_rpc_error(err: grpc.RpcError) -> AvatarServeError:
    """Translate a failed gRPC call (sync or grpc.aio) into the matching typed error."""
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        return ServerError(f"gRPC call failed without a status: {err!r}")
    details_fn = getattr(err, "details", None)
    details = (details_fn() if callable(details_fn) else None) or "(no message from server)"
    cls = _CODE_TO_CLASS.get(code, ServerError)
    if cls is CapacityExhausted:
        trailing_fn = getattr(err, "trailing_metadata", None)
        trailing = trailing_fn() if callable(trailing_fn) else None
        return CapacityExhausted(details, code=code, retry_after_s=_retry_after_s(trailing))
    return cls(details, code=code)
