"""The one way replicas connect to Redis, the one error an unreachable Redis raises, and outage bookkeeping.

- `connect()` builds a `redis.asyncio` client with named timeouts (`app.timeouts.redis`): a connect timeout, a
  per-command timeout, TCP keepalive, and ONE immediate retry on a connection error. The retry is what makes the
  client recover the moment Redis is back: after a Redis restart every pooled connection is a dead socket, and
  without a retry each of them fails one command ("Connection closed by server") before it reconnects.
  Its connections never drop a cancel: redis.asyncio sends a command under Python 3.11's `asyncio.wait_for`, which
  returns normally when the cancel and the send's completion meet in one loop turn (serve/cancel_safe.py); the
  connection raises that cancel again (measured before: about one cancel in ten of a loop of script calls ran on).
- `translate_unavailable()` is a class decorator for the Redis-owning layers (control/session_store.py,
  control/registry.py): every public coroutine method re-raises redis' ConnectionError / TimeoutError (and the
  OSErrors under them) as that layer's subclass of `RedisUnavailableError`, once, here. Everything above catches one
  typed error; serve/api/errors.py maps it to UNAVAILABLE with a `retry-after-ms` hint.
- `RedisOutage` tracks one component's view of Redis (up / down since when) and logs an outage once when it starts
  and once when it ends, never per failed call.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from typing import Any, Callable, Optional, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from avatarserve.serve.cancel_safe import cancels_of_current_task
from avatarserve.serve.config import RedisTimeouts

__all__ = ["RECONNECT_BACKOFF_S", "RedisOutage", "RedisUnavailableError", "connect", "is_unavailable",
           "translate_unavailable"]

log = logging.getLogger(__name__)

# Pause before the one retry of a command that failed on a dead connection (the retry reconnects).
RECONNECT_BACKOFF_S = 0.01

# What "Redis is unreachable" looks like from redis-py: refused/reset/closed connections, timeouts, a server still
# loading its data set (BusyLoadingError is a ConnectionError), and the raw socket errors under them.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError)


class RedisUnavailableError(Exception):
    """Redis is unreachable (down, restarting, loading its data, or cut off). Retry later: nothing was changed, or a
    write may or may not have happened (as with any lost reply)."""


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, (RedisUnavailableError, *_UNAVAILABLE))


def connect(url: str, options: Optional[RedisTimeouts] = None, *, decode_responses: bool = False) -> aioredis.Redis:
    """A `redis.asyncio` client for `url` with the timeouts of `options` (default: `RedisTimeouts()`)."""
    o = options or RedisTimeouts()
    client = aioredis.Redis.from_url(
        url, decode_responses=decode_responses, socket_connect_timeout=o.connect_s, socket_timeout=o.call_s,
        socket_keepalive=True, retry=Retry(ConstantBackoff(RECONNECT_BACKOFF_S), 1),
        retry_on_error=[RedisConnectionError])
    pool = client.connection_pool  # connects lazily: no connection of the original class exists yet
    pool.connection_class = cancel_safe_connection(pool.connection_class)
    return client


@functools.lru_cache(maxsize=None)
def cancel_safe_connection(base: type) -> type:
    """`base` (the connection class the URL's scheme chose: TCP, TLS or a Unix socket) whose sends never drop a cancel.

    Every command, pipeline and pub/sub message goes out through `send_packed_command`. When a cancel of the calling
    task arrived during the send and the send still returned, the cancel is raised here; the connection is closed
    first, because the command's reply is still unread (the next user would read it as theirs). As with any cancel
    during a command, the command may or may not have run."""

    class CancelSafe(base):  # type: ignore[misc, valid-type]
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            cancels = cancels_of_current_task()
            await super().send_packed_command(command, check_health)
            if cancels_of_current_task() > cancels:
                await self.disconnect(nowait=True)
                raise asyncio.CancelledError()

    CancelSafe.__name__ = CancelSafe.__qualname__ = f"CancelSafe{base.__name__}"
    return CancelSafe


E = TypeVar("E", bound=RedisUnavailableError)
C = TypeVar("C")


def translate_unavailable(error: type[E]) -> Callable[[C], C]:
    """Class decorator: public coroutine methods raise `error` (chained) instead of redis' connection errors."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def method(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except _UNAVAILABLE as exc:
                raise error(f"Redis is unreachable: {type(exc).__name__}: {exc}") from exc

        return method

    def decorate(cls: C) -> C:
        for name, fn in list(vars(cls).items()):
            if not name.startswith("_") and inspect.iscoroutinefunction(fn):
                setattr(cls, name, wrap(fn))
        return cls

    return decorate


class RedisOutage:
    """One component's view of Redis: `failed()` on an unreachable Redis, `recovered()` when a call succeeds again.
    Logs once per outage (its start and its end, with how many calls failed), never per call."""

    def __init__(self, who: str, *, consequence: str = "") -> None:
        self.who = who
        self.consequence = consequence
        self.down_since: Optional[float] = None  # time.monotonic() of the first failure of the current outage
        self.failed_calls = 0
        self.outages = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, exc: BaseException) -> bool:
        """Record a failed call; True (and one warning) when it starts an outage."""
        self.failed_calls += 1
        if self.down_since is not None:
            return False
        self.down_since = time.monotonic()
        self.outages += 1
        log.warning("%s: Redis is unreachable (%s)%s; further Redis errors are not logged until it is back",
                    self.who, _short(exc), f"; {self.consequence}" if self.consequence else "")
        return True

    def recovered(self) -> Optional[float]:
        """Record a successful call; the outage's length in seconds (and one info line) when it ends one."""
        if self.down_since is None:
            return None
        took = time.monotonic() - self.down_since
        log.warning("%s: Redis is reachable again after %.1f s (%d call(s) failed meanwhile)", self.who, took,
                    self.failed_calls)
        self.down_since = None
        self.failed_calls = 0
        return took


def _short(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, RedisUnavailableError) and exc.__cause__ is not None else exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"
