"""How the public AvatarService is registered on Ray Serve's gRPC proxy: request parsing that never raises.

Serve's proxy (ray/serve/_private/grpc_util.py, `gRPCGenericServer._override_method_handler`) keeps each method's
`request_deserializer` from the servicer adder and lets grpcio parse the request bytes before Serve sees them. The
generated adder uses `Message.FromString`, so a corrupt request raises inside grpcio, which answers UNKNOWN
("Unexpected <class 'google.protobuf.message.DecodeError'>") on unary calls; on a stream the proxy's
`receive_grpc_messages` swallows the error and reports the stream as cancelled, which the gateway saw as an empty
stream. The adder here registers the same methods (taken from the proto's service descriptor) with deserializers
that return a `MalformedMessage` instead of raising: it reaches the gateway replica like any request (pickled by
the proxy), and the gateway answers INVALID_ARGUMENT naming what did not parse.

Serve config: `grpc_servicer_functions: ["avatarserve.serve.api.grpc_service.add_AvatarServiceServicer_to_server",
...]` (builder.AVATAR_SERVICER). This module stays light (grpc + the generated messages): the proxy imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import grpc
from avatarserve_client.v1 import avatar_service_pb2 as pb

__all__ = ["MalformedMessage", "add_AvatarServiceServicer_to_server", "add_HealthServicer_to_server",
           "tolerant_deserializer"]

SERVICE = pb.DESCRIPTOR.services_by_name["AvatarService"]


@dataclass(frozen=True)
class MalformedMessage:
    """Request bytes that do not parse as the method's request message (stands in for the request)."""

    type_name: str
    error: str
    size: int

    def __str__(self) -> str:
        return f"{self.size} bytes do not parse as {self.type_name} ({self.error})"


def tolerant_deserializer(message_cls: Any) -> Callable[[bytes], Any]:
    """`message_cls.FromString`, returning a MalformedMessage instead of raising."""
    name = message_cls.DESCRIPTOR.full_name

    def parse(raw: bytes) -> Any:
        try:
            return message_cls.FromString(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends: the client sent bytes that are not the message
            return MalformedMessage(name, str(exc) or type(exc).__name__, len(raw))

    return parse


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(servicer: Any, service: Any = SERVICE, messages: Any = pb) -> dict:
    """One handler per method of `service` (a service descriptor whose messages live in module `messages`), as the
    generated adder builds them, but with tolerant request deserializers."""
    handlers = {}
    for m in service.methods:
        factory = _HANDLER_FACTORIES[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = factory(getattr(servicer, m.name),
                                   request_deserializer=tolerant_deserializer(getattr(messages, m.input_type.name)),
                                   response_serializer=getattr(messages, m.output_type.name).SerializeToString)
    return handlers


def _add(server: Any, service: Any, handlers: dict) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    add_registered = getattr(server, "add_registered_method_handlers", None)
    if add_registered is not None:
        add_registered(service.full_name, handlers)


def add_AvatarServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 - grpc's naming
    _add(server, SERVICE, method_handlers(servicer))


def add_HealthServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 - grpc's naming
    """grpc.health.v1.Health (Check; Watch as the stock adder registers it) with tolerant request parsing, so a
    corrupt health request is INVALID_ARGUMENT too, not grpcio's UNKNOWN."""
    from grpc_health.v1 import health_pb2

    service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    _add(server, service, method_handlers(servicer, service, health_pb2))
