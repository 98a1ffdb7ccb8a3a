"""The Gateway deployment: the application's ingress (the public AvatarService over Serve's gRPC proxy, and the ops
page over HTTP at `{route_prefix}/ops/`)."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List

from avatarserve.serve.api.servicer import Gateway
from avatarserve.serve.config import AppConfig

__all__ = ["GatewayDeployment"]


class GatewayDeployment(Gateway):
    """Gateway as the Serve ingress; the extra handles are bound only so Serve deploys the whole graph."""

    def __init__(self, app: AppConfig, vae_handle: Any, cache_handle: Any, *stage_handles: Any, ops: Any = None):
        from avatarserve.serve.ray_compat import replica_stopping

        # Serve stops a gateway (scale-down, a redeploy, serve.delete) only once no request is ongoing, and a stream
        # is one for as long as its session lasts: the replica watches for the stop's start and drains its streams.
        super().__init__(app, vae_handle, stop_probe=replica_stopping)
        self.cache = cache_handle
        self.stage_handles = stage_handles
        self.ops = ops

    async def __call__(self, request: Any) -> Any:
        """HTTP on the application's route prefix: the ops dashboard under `{route_prefix}/ops/`."""
        from starlette.responses import PlainTextResponse, Response

        path = request.url.path
        at = path.find("/ops")
        if self.ops is None or at < 0 or path[at + 4:at + 5] not in ("", "/"):
            return PlainTextResponse("not found: the ops dashboard is at <route_prefix>/ops/ (when ops.enabled)",
                                     status_code=404)
        status, media_type, body = await self.ops.handle.remote(path[at + 4:])
        return Response(body, status_code=status, media_type=media_type)

    async def debug_tasks(self) -> List[Dict[str, Any]]:
        """Every asyncio task of this replica's event loop with the chain of awaits it is suspended in (through a
        Serve handle: what a stream that does not move is waiting for)."""
        return [{"name": task.get_name(), "awaiting": _await_chain(task)} for task in asyncio.all_tasks()]


def _await_chain(task: "asyncio.Task") -> List[str]:
    """file:line function of each coroutine the task waits in, outermost first."""
    chain: List[str] = []
    obj: Any = task.get_coro()
    while obj is not None and len(chain) < 40:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None) or getattr(obj, "ag_frame", None)
        if frame is not None:
            chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        nxt = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None) or getattr(obj, "ag_await", None)
        if nxt is None and chain:
            chain.append(f"waits on {type(obj).__name__}" if frame is None else f"waits on {obj!r:.200}")
        obj = nxt
    return chain
