"""The Gateway deployment: the application's ingress (the public AvatarService over Serve's gRPC proxy, and the ops
page over HTTP at `{route_prefix}/ops/`)."""

from __future__ import annotations

from typing import Any

from avatarserve.serve.api.servicer import Gateway
from avatarserve.serve.config import AppConfig

__all__ = ["GatewayDeployment"]


class GatewayDeployment(Gateway):
    """Gateway as the Serve ingress; the extra handles are bound only so Serve deploys the whole graph."""

    def __init__(self, app: AppConfig, vae_handle: Any, cache_handle: Any, *stage_handles: Any, ops: Any = None):
        super().__init__(app, vae_handle)
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
