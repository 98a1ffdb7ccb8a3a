"""Timeouts that never drop a cancellation, and the check for a cancellation that something else dropped.

Python 3.11's `asyncio.wait_for` drops a cancellation that arrives in the same loop turn as the awaited result: it
returns the result and the cancelled task runs on (CPython gh-86296, fixed in 3.12 by rebuilding `wait_for` on
`asyncio.timeout`). redis.asyncio sends every command under `wait_for` (its socket timeout), which is how a stream's
stop could be lost and the stream stay open forever. The project's own code therefore never calls `asyncio.wait_for`:

- `wait_for(awaitable, seconds)`: the same bound, built on `asyncio.timeout`, which cancels the work and raises
  TimeoutError on expiry and lets an outside cancel through. (This and `Task.cancelling()` are why the project
  needs Python 3.11.)
- `cancel_requested()`: has the current task been cancelled without the CancelledError having ended it? Loops that
  are stopped by a cancel check it after calls into libraries (a second line of defence where a library drops one).
- control/redis_client.py wraps redis.asyncio's connections so that a cancel dropped inside a command is raised
  again when the command returns.
- Waiting on an `asyncio.Event` with a bound: `avatarserve_client._streaming.wait_event` (shared with the SDK, which
  still runs on Python 3.10).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Optional, TypeVar

__all__ = ["cancel_requested", "cancels_of_current_task", "wait_for"]

T = TypeVar("T")


async def wait_for(awaitable: Awaitable[T], seconds: Optional[float]) -> T:
    """`await awaitable`, cancelled with TimeoutError after `seconds` (None: no bound). Unlike Python 3.11's
    `asyncio.wait_for`, a cancel of the caller that arrives together with the result is raised, not dropped."""
    async with asyncio.timeout(seconds):
        return await awaitable


def cancels_of_current_task() -> int:
    """How many cancellations of the current task are pending (`Task.cancelling()`); 0 outside a task."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running event loop: no task to stop
        return 0
    return task.cancelling() if task is not None else 0


def cancel_requested() -> bool:
    """Has the current task been asked to stop (`Task.cancel()`) without the CancelledError having ended it?"""
    return cancels_of_current_task() > 0
