"""The Ray Serve internals AvatarServe touches, in one place, checked against the Ray version they were written for.

`ray[serve]` is pinned in pyproject.toml; these helpers fail with a clear message (instead of an AttributeError deep
in a replica) when the installed Ray differs.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

__all__ = ["RAY_VERSION", "RayCompatError", "check_ray_version", "deploy_apps", "in_serve_replica", "replica_log_file",
           "replica_stopping", "start_serve"]

RAY_VERSION = "2.60.0"
SERVE_START_ATTEMPTS = 5  # `start_serve`: how many times Serve may give up on its late proxies before we do

log = logging.getLogger(__name__)


class RayCompatError(RuntimeError):
    """The installed Ray does not offer what this module was written against."""


def check_ray_version() -> None:
    import ray

    if ray.__version__ != RAY_VERSION:
        raise RayCompatError(f"AvatarServe drives Ray Serve internals written for ray=={RAY_VERSION}; installed is "
                             f"ray=={ray.__version__} (install the version pinned in pyproject.toml)")


def start_serve(**options: Any) -> None:
    """`serve.start(**options)` that survives a slow machine.

    Serve waits a fixed 60 s for its proxy actors (`HTTP_PROXY_TIMEOUT`, not configurable) and kills them when they
    are late, which a busy machine makes happen (a proxy process importing Ray Serve on two loaded cores). The
    controller is up by then and starts the proxies again on its own, so asking again is all it takes; the caller
    waits for the gRPC port to answer afterwards (`ops/launcher.py wait_grpc_healthy`).
    """
    import ray.exceptions
    from ray import serve

    for attempt in range(1, SERVE_START_ATTEMPTS + 1):
        try:
            serve.start(**options)
            return
        except (ray.exceptions.ActorDiedError, ray.exceptions.GetTimeoutError) as exc:
            if attempt == SERVE_START_ATTEMPTS:
                raise
            log.warning("Serve gave up on its proxy after its fixed 60 s wait (a busy machine); asking again "
                        "(attempt %d of %d): %s", attempt + 1, SERVE_START_ATTEMPTS, str(exc).splitlines()[0])


def deploy_apps(schema: Any) -> None:
    """Apply a declarative Serve config (`ServeDeploySchema`) on the running Serve instance.

    The public entry points of the declarative path are the CLI and the dashboard REST API (`serve deploy`); both end
    in this controller call, which we make directly so that tests and the launcher need no dashboard.
    """
    check_ray_version()
    from ray.serve.context import _get_global_client

    _get_global_client().deploy_apps(schema)


def in_serve_replica() -> bool:
    """Is this code running inside a Serve replica?"""
    try:
        from ray.serve import context
    except ImportError:
        return False
    check_ray_version()
    return context._get_internal_replica_context() is not None


def serve_app_name() -> Optional[str]:
    """The Serve application this replica belongs to (None outside a replica). It is the name the app was deployed
    under, which need not be the config's `app.name` (e.g. `serve.run(app, name=...)`)."""
    try:
        from ray.serve import context
    except ImportError:
        return None
    ctx = context._get_internal_replica_context()
    return ctx.replica_id.deployment_id.app_name if ctx is not None else None


def replica_stopping() -> Optional[bool]:
    """Has Serve begun stopping this replica (its graceful shutdown, which calls `__del__` only once no request is
    ongoing)? None outside a replica or when this Ray keeps the flag elsewhere.

    Serve has no public hook at the start of a replica's shutdown: it waits for ongoing requests, then calls
    `__del__`. A gateway's streams are requests that last as long as their sessions, so it must notice the start
    itself. The replica object sets `_shutting_down` first thing; the replica context reaches it through the
    handle-registration callback, a closure over the replica (ray 2.60: `ReplicaBase._set_internal_replica_context`).
    """
    try:
        from ray.serve import context
    except ImportError:
        return None
    ctx = context._get_internal_replica_context()
    callback = getattr(ctx, "_handle_registration_callback", None) if ctx is not None else None
    for cell in getattr(callback, "__closure__", None) or ():
        try:
            flag = getattr(cell.cell_contents, "_shutting_down", None)
        except ValueError:  # an empty cell
            continue
        if isinstance(flag, bool):
            return flag
    return None


def replica_log_file() -> Optional[str]:
    """The file this Serve replica logs to (Serve's replica logger writes through a buffering handler)."""
    for handler in logging.getLogger("ray.serve").handlers:
        target = getattr(handler, "target", None) or handler
        path = getattr(target, "baseFilename", None)
        if path:
            return str(path)
    return None
