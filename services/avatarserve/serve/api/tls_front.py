"""TLS on the public gRPC port: a TLS-terminating forwarding front in front of Ray Serve's gRPC proxy.

Ray Serve 2.60's gRPC proxy cannot serve TLS: `gRPCOptions` has no certificate fields and the proxy binds its port
with `add_insecure_port` (ray/serve/_private/grpc_util.py `start_grpc_server`, default_impl.py
`add_grpc_address`). So `avatarserve up` with `app.tls` set runs this front: a real `grpc.aio` server with
`ssl_server_credentials` that forwards every method of `avatarserve.v1.AvatarService` (unary and bidi streaming)
and `grpc.health.v1.Health/Check` to the proxy as raw bytes (no message is decoded), with the call's metadata
(`application`, `session_id`, `authorization`, ...) and deadline, and passes back the proxy's initial metadata,
status, details and trailing metadata (e.g. `retry-after-ms`). A client that cancels cancels the upstream call.

The Serve proxy itself keeps listening in plaintext; expose only the front's port (on the local cluster the
proxy's port is a random one; on Kubernetes run `avatarserve tls-front` as a sidecar and publish only its port).

    python -m avatarserve.serve.api.tls_front --upstream 127.0.0.1:9000 --cert cert.pem --key key.pem --port 9443
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any, AsyncIterator, List, Optional, Sequence, Tuple

import grpc
import grpc.aio

__all__ = ["TlsFront", "forwarded_methods", "main"]

# Metadata a forwarding hop must not copy (HTTP/2 pseudo-headers and gRPC's own transport headers).
_HOP_HEADERS = ("grpc-", ":")
_HOP_EXACT = {"content-type", "te", "user-agent", "host"}


def _forwardable(md: Optional[Sequence[Tuple[str, Any]]]) -> List[Tuple[str, Any]]:
    return [(k, v) for k, v in (md or ()) if not k.startswith(_HOP_HEADERS) and k.lower() not in _HOP_EXACT]


def forwarded_methods() -> List[Tuple[str, bool, bool]]:
    """(full method path, client streaming, server streaming) of every method the front forwards."""
    from grpc_health.v1 import health_pb2

    from avatarserve_client.v1 import avatar_service_pb2

    out = []
    for svc in (avatar_service_pb2.DESCRIPTOR.services_by_name["AvatarService"],
                health_pb2.DESCRIPTOR.services_by_name["Health"]):
        for m in svc.methods:
            if svc.name == "Health" and m.name != "Check":
                continue  # Serve's proxy answers Check only
            out.append((f"/{svc.full_name}/{m.name}", m.client_streaming, m.server_streaming))
    return out


class TlsFront:
    """A TLS gRPC server on `host:port` forwarding to the plaintext gRPC server at `upstream`."""

    def __init__(self, upstream: str, cert_chain: bytes, private_key: bytes, *, host: str = "0.0.0.0",
                 port: int = 0, max_message_bytes: int = 64 * 1024 * 1024):
        self.upstream = upstream
        self.host = host
        self.port = port
        self._creds = grpc.ssl_server_credentials([(private_key, cert_chain)])
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes)]
        self._opts = opts
        self._server: Optional[grpc.aio.Server] = None
        self._channel: Optional[grpc.aio.Channel] = None

    @classmethod
    def from_files(cls, upstream: str, cert_file: str, key_file: str, **kw: Any) -> "TlsFront":
        return cls(upstream, Path(cert_file).read_bytes(), Path(key_file).read_bytes(), **kw)

    async def start(self) -> int:
        """Start serving; returns the bound port."""
        self._channel = grpc.aio.insecure_channel(self.upstream, options=self._opts)
        self._server = grpc.aio.server(options=self._opts)
        handlers = {}
        for path, cs, ss in forwarded_methods():
            handlers[path] = self._handler(path, cs, ss)
        self._server.add_generic_rpc_handlers((_Routes(handlers),))
        self.port = self._server.add_secure_port(f"{self.host}:{self.port}", self._creds)
        if not self.port:
            raise OSError(f"the TLS front could not bind {self.host}:{self.port}")
        await self._server.start()
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._channel is not None:
            await self._channel.close()

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    # ----- forwarding ------------------------------------------------------------------------------------------
    def _handler(self, path: str, client_streaming: bool, server_streaming: bool) -> grpc.RpcMethodHandler:
        # No (de)serializers: requests and responses pass through as bytes.
        if not client_streaming and not server_streaming:
            return grpc.unary_unary_rpc_method_handler(self._forward_unary(path))
        if not client_streaming:
            return grpc.unary_stream_rpc_method_handler(self._forward_stream(path, False))
        if not server_streaming:
            return grpc.stream_unary_rpc_method_handler(self._forward_unary(path, client_streaming=True))
        return grpc.stream_stream_rpc_method_handler(self._forward_stream(path, True))

    def _call_kwargs(self, context: grpc.aio.ServicerContext) -> dict:
        remaining = context.time_remaining()
        return {"metadata": _forwardable(context.invocation_metadata()),
                "timeout": remaining if remaining is not None and remaining < 1e8 else None}

    def _forward_unary(self, path: str, client_streaming: bool = False):
        factory = self._channel_method(path, client_streaming, False)

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> bytes:
            call = factory()(request, **self._call_kwargs(context))
            try:
                response = await call
            except grpc.aio.AioRpcError as err:
                await _abort_like(context, err)
            except asyncio.CancelledError:
                call.cancel()
                raise
            await _pass_metadata(call, context)
            return response

        return handle

    def _forward_stream(self, path: str, client_streaming: bool):
        factory = self._channel_method(path, client_streaming, True)

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            call = factory()(request, **self._call_kwargs(context))
            try:
                md = await call.initial_metadata()
                if md:
                    await context.send_initial_metadata(_forwardable(md))
                async for response in call:
                    yield response
                trailing = _forwardable(await call.trailing_metadata())
                if trailing:
                    context.set_trailing_metadata(trailing)
            except grpc.aio.AioRpcError as err:
                await _abort_like(context, err)
            finally:
                if not call.done():
                    call.cancel()

        return handle

    def _channel_method(self, path: str, client_streaming: bool, server_streaming: bool):
        def make():
            ch = self._channel
            if client_streaming and server_streaming:
                return ch.stream_stream(path)
            if client_streaming:
                return ch.stream_unary(path)
            if server_streaming:
                return ch.unary_stream(path)
            return ch.unary_unary(path)

        return make


class _Routes(grpc.GenericRpcHandler):
    def __init__(self, handlers: dict):
        self._handlers = handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Optional[grpc.RpcMethodHandler]:
        return self._handlers.get(handler_call_details.method)


async def _pass_metadata(call: Any, context: grpc.aio.ServicerContext) -> None:
    md = _forwardable(await call.initial_metadata())
    if md:
        await context.send_initial_metadata(md)
    trailing = _forwardable(await call.trailing_metadata())
    if trailing:
        context.set_trailing_metadata(trailing)


async def _abort_like(context: grpc.aio.ServicerContext, err: grpc.aio.AioRpcError) -> None:
    """End the front's call with the upstream call's status, details and trailing metadata."""
    await context.abort(err.code(), err.details() or "", trailing_metadata=tuple(_forwardable(err.trailing_metadata())))


async def _serve(args: argparse.Namespace) -> None:
    front = TlsFront.from_files(args.upstream, args.cert, args.key, host=args.host, port=args.port)
    port = await front.start()
    print(f"tls-front listening on {args.host}:{port} -> {args.upstream}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await front.stop(args.grace_s)


def build_parser(prog: str = "avatarserve tls-front") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="TLS-terminating gRPC front for the Serve gRPC proxy")
    p.add_argument("--upstream", required=True, help="plaintext gRPC address of the Serve proxy, HOST:PORT")
    p.add_argument("--cert", required=True, help="PEM certificate chain")
    p.add_argument("--key", required=True, help="PEM private key")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=0, help="port to bind (0: a free one, printed)")
    p.add_argument("--grace-s", type=float, default=5.0, help="on SIGTERM, let calls finish for this long")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = "avatarserve tls-front") -> int:
    asyncio.run(_serve(build_parser(prog).parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m avatarserve.serve.api.tls_front"))
