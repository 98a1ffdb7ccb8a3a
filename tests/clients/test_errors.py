from __future__ import annotations

import grpc
import pytest

from avatarserve_client import errors as E


class _RpcError(grpc.RpcError):
    """The interface grpc's failed-call objects expose (sync and aio)."""

    def __init__(self, code, details, trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, E.InvalidArgument),
    (grpc.StatusCode.OUT_OF_RANGE, E.InvalidArgument),
    (grpc.StatusCode.NOT_FOUND, E.SessionNotFound),
    (grpc.StatusCode.PERMISSION_DENIED, E.PermissionDenied),
    (grpc.StatusCode.UNAUTHENTICATED, E.Unauthenticated),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, E.CapacityExhausted),
    (grpc.StatusCode.FAILED_PRECONDITION, E.FailedPrecondition),
    (grpc.StatusCode.ABORTED, E.FailedPrecondition),
    (grpc.StatusCode.UNAVAILABLE, E.Unavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, E.DeadlineExceeded),
    (grpc.StatusCode.CANCELLED, E.Cancelled),
    (grpc.StatusCode.INTERNAL, E.ServerError),
    (grpc.StatusCode.UNIMPLEMENTED, E.ServerError),
])
def test_status_code_maps_to_typed_error_keeping_message(code, cls) -> None:
    err = E.from_rpc_error(_RpcError(code, "what went wrong"))
    assert type(err) is cls
    assert isinstance(err, E.AvatarServeError)
    assert err.code is code
    assert err.details == "what went wrong"
    assert str(err).startswith(f"{code.name}: what went wrong")


def test_invalid_argument_is_also_a_value_error() -> None:
    assert isinstance(E.from_rpc_error(_RpcError(grpc.StatusCode.INVALID_ARGUMENT, "x")), ValueError)


@pytest.mark.parametrize("trailing, expected", [
    ((("retry-after-ms", "2500"),), 2.5),
    ((("other", "1"), ("Retry-After-Ms", b"40")), 0.04),  # aio may give bytes, keys any case
    ((("retry-after-ms", "soon"),), None),                 # malformed hint -> no hint
    ((("retry-after-ms", "-5"),), 0.0),
    ((), None),
    (None, None),
])
def test_capacity_error_carries_retry_hint(trailing, expected) -> None:
    err = E.from_rpc_error(_RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", trailing))
    assert isinstance(err, E.CapacityExhausted)
    assert err.retry_after_s == expected
    if expected is not None:
        assert "retry after" in str(err)


def test_aio_metadata_objects_are_understood() -> None:
    md = grpc.aio.Metadata(("retry-after-ms", "125"))
    err = E.from_rpc_error(_RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", md))
    assert err.retry_after_s == pytest.approx(0.125)


def test_missing_details_get_a_placeholder() -> None:
    err = E.from_rpc_error(_RpcError(grpc.StatusCode.UNAVAILABLE, None))
    assert isinstance(err, E.Unavailable) and err.details == "(no message from server)"


def test_local_errors_have_no_code_unless_typed() -> None:
    assert str(E.MediaError("disk full")) == "disk full"
    assert E.InvalidArgument("bad").code is grpc.StatusCode.INVALID_ARGUMENT
