"""The public API's one error type, and how every error of the layers below maps onto a gRPC status."""

from __future__ import annotations

from typing import Any, Dict, Optional

import grpc

from avatarserve.serve.control.redis_client import RedisUnavailableError
from avatarserve.serve.dataplane.transport import ErrorCode, PipelineError, StageError

__all__ = ["ApiError", "StreamFailed", "apply_to_context", "from_pipeline_error", "from_redis_unavailable",
           "from_stage_error", "stage_error_of"]


class ApiError(Exception):
    """Ends an RPC with `code` (a grpc.StatusCode), `message` and optional trailing metadata."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing = dict(trailing or {})


class StreamFailed(RuntimeError):
    """Raised after the status was set on the Serve gRPC context: a streaming method's status only reaches the
    client through an exception raised after setting the code (returning would end the call OK)."""


def apply_to_context(ctx: Any, err: ApiError) -> None:
    if ctx is None:
        raise err
    ctx.set_code(err.code)
    ctx.set_details(err.message)
    if err.trailing:
        ctx.set_trailing_metadata(list(err.trailing.items()))


_WIRE_TO_GRPC = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def from_pipeline_error(exc: PipelineError) -> ApiError:
    return ApiError(_WIRE_TO_GRPC.get(exc.code, grpc.StatusCode.INTERNAL), f"pipeline error: {exc.message}")


def stage_error_of(exc: BaseException) -> Optional[StageError]:
    """The typed stage error behind `exc`: itself, or the cause of a Ray task error raised by a Serve handle call."""
    if isinstance(exc, StageError):
        return exc
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, StageError) else None


def from_stage_error(err: StageError, what: str) -> ApiError:
    code = grpc.StatusCode.INVALID_ARGUMENT if err.code == ErrorCode.INVALID_ARGUMENT else grpc.StatusCode.UNAVAILABLE
    return ApiError(code, f"{what}: {err}")


def from_redis_unavailable(exc: RedisUnavailableError, retry_after_ms: int) -> ApiError:
    """Redis (session store, replica registry) unreachable -> UNAVAILABLE with a `retry-after-ms` hint
    (`app.timeouts.redis.retry_after_ms`). Streams already open go on (control/live_sessions.py)."""
    return ApiError(grpc.StatusCode.UNAVAILABLE,
                    "the session store (Redis) is unreachable; sessions cannot be created, read, closed or opened "
                    f"until it is back: retry after {retry_after_ms} ms ({_cause(exc)})",
                    {"retry-after-ms": str(int(retry_after_ms))})


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    lines = [l.strip() for l in str(cause).strip().splitlines() if l.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"
