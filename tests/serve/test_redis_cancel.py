"""Loops stopped by a cancel stop even when a Redis call swallows it.

redis.asyncio can swallow a cancellation that arrives while a command runs: the command returns normally and the task
runs on. The gateway's per-stream sync loop was stopped that way before END_OF_STREAM (`task.cancel(); await task`),
so such a swallow kept the stream from ever ending (the client waited until its deadline, having received DRAINED).
Every loop that is stopped by a cancel checks `cancel_requested()` after its Redis calls.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from avatarserve.serve.control.redis_client import cancel_requested, connect
from avatarserve.serve.control.registry import ReplicaHeartbeat, ReplicaInfo

STOP_S = 10.0  # a stop that has not happened within this is a hang (the loops' own calls take milliseconds)


class _SwallowingCall:
    """A Redis call that swallows a cancel arriving while it runs (what redis.asyncio sometimes does)."""

    def __init__(self) -> None:
        self.in_call = asyncio.Event()  # set while a call runs
        self.swallowed = 0

    async def call(self) -> None:
        self.in_call.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.swallowed += 1
        finally:
            self.in_call.clear()


class _SwallowingRegistry(_SwallowingCall):
    ttl_s = 10.0

    async def heartbeat(self, info: ReplicaInfo):
        await self.call()
        return info, 0


def test_a_heartbeat_whose_redis_call_swallows_the_stop_still_stops():
    async def run():
        registry = _SwallowingRegistry()
        hb = ReplicaHeartbeat(registry, lambda: ReplicaInfo("D", "r1", "127.0.0.1:1"), interval_s=0.01)
        await hb.start()
        await registry.in_call.wait()  # the next beat is inside its Redis call
        await asyncio.wait_for(hb.stop(deregister=False), STOP_S)
        return registry.swallowed

    assert asyncio.run(run()) == 1  # the cancel landed in the call and was swallowed, and the loop still ended


def test_real_redis_calls_cancelled_at_random_moments_always_stop(redis_server):
    """With redis-py's own client against a real redis-server: a loop of script calls that checks
    `cancel_requested()` stops after every cancel, wherever it lands."""
    random.seed(7)

    async def run():
        client = connect(redis_server.url)
        script = client.register_script("redis.call('HINCRBY', KEYS[1], 'n', 1); return 1")
        calls = 0

        async def loop():
            nonlocal calls
            while not cancel_requested():
                await asyncio.sleep(random.random() * 0.002)
                await script(keys=["cancel-test"], args=[])
                calls += 1

        for _ in range(60):
            task = asyncio.get_running_loop().create_task(loop())
            await asyncio.sleep(random.random() * 0.01)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=STOP_S)
            assert done, "a loop kept running after its cancel"
        await client.aclose()
        return calls

    assert asyncio.run(run()) > 0


def test_cancel_requested_outside_and_inside_a_task():
    assert not cancel_requested()  # no task at all

    async def run():
        seen = []

        async def body():
            seen.append(cancel_requested())
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                seen.append(cancel_requested())  # delivered, and not uncancelled: still requested
                raise

        task = asyncio.get_running_loop().create_task(body())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    assert asyncio.run(run()) == [False, True]


class _SwallowingStore(_SwallowingCall):
    final = None  # fields of the final flush (finish)

    async def sync_stream(self, sid, *, deltas, fields, idle_deadline_ms):
        if "state" not in fields:
            self.final = dict(fields)
        else:
            await self.call()
        return ""


def test_a_stream_whose_sync_call_swallows_the_stop_still_ends():
    """The gateway's end of a stream stops its sync loop before END_OF_STREAM goes out: a swallowed cancel there kept
    streams from ever ending (seen: DRAINED delivered, END_OF_STREAM never, the client at its deadline)."""
    from types import SimpleNamespace

    from avatarserve.serve.api.servicer import Gateway, _StreamObserver
    from avatarserve.serve.api.stream_controller import Counters

    gw = Gateway({"redis_url": "redis://127.0.0.1:1", "timeouts": {"stream_sync_s": 0.01}})
    gw.metrics = None
    store = _SwallowingStore()
    observer = _StreamObserver(gw, "s1", store)
    observer.ctl = SimpleNamespace(counters=Counters(), next_session_block=2, speaking=False, end_reason="closed",
                                   last_audio_wall_ms=0)

    async def run():
        await observer.start()
        await store.in_call.wait()  # the sync loop is inside its Redis call
        await asyncio.wait_for(observer.finish(True), STOP_S)

    asyncio.run(run())
    assert store.swallowed == 1 and store.final == {"next_block": 2}
