"""The session's stream lock (one open stream per session) is freed however a stream ends, also when the client
cancels while the gateway is taking the lock.

Found by tests/integration/test_fuzz.py in a full run: a stream cancelled 7 ms after it started (Serve logged CANCELLED)
left its session locked, and every later stream of the session got FAILED_PRECONDITION "a stream is already open" for
the 30 s the test waits (the lock's TTL is the session's, 1 h by default). Redis had set the lock, but the cancel
reached the gateway before the reply did, so the stream never recorded that it held it."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from avatarserve.serve.api.errors import ApiError
from avatarserve.serve.api.servicer import Gateway
from avatarserve_client.v1 import avatar_service_pb2 as pb
from tests.support.sessions import tiny_sink


class _Requests:
    """The client's side of a stream: the Hello, then nothing (it is about to cancel)."""

    def __init__(self, hello: pb.ClientMessage) -> None:
        self.hello = hello
        self.sent = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.sent:
            self.sent = True
            return self.hello
        await asyncio.Event().wait()


async def _gateway_with_session(redis_server, ns: str) -> tuple[Gateway, str, str]:
    gw = Gateway({"redis_url": redis_server.url, "namespace": ns, "auth": {"mode": "disabled"}})
    _, store, _ = gw._clients()
    sid = uuid.uuid4().hex
    token = await store.create_session(sid, tiny_sink(), width=64, height=64, options={"idle_timeout_s": 3600})
    return gw, sid, token


async def _lock_value(redis_server, ns: str, sid: str):
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        return await r.get(f"{ns}streamlock:{sid}")
    finally:
        await r.aclose()


@pytest.mark.parametrize("reply", ["lost", "refused"])
async def test_a_stream_cancelled_while_taking_the_lock_leaves_the_session_free(redis_server, redis_namespace,
                                                                                 reply: str) -> None:
    """`lost`: Redis set the lock but the cancel arrives before its reply. `refused`: another stream of the session
    (here: on the same gateway replica) holds the lock; the cancelled attempt must not free that stream's lock."""
    gw, sid, token = await _gateway_with_session(redis_server, redis_namespace)
    _, store, _ = gw._clients()
    if reply == "refused":
        other = f"{gw.replica_id}/other-stream"
        assert await store.acquire_stream_lock(sid, other)
    asked = asyncio.Event()
    take_lock = store.acquire_stream_lock

    async def reply_never_arrives(*args, **kwargs):
        await take_lock(*args, **kwargs)  # Redis has answered (set the lock, or refused it) ...
        asked.set()
        await asyncio.Event().wait()  # ... but the stream is cancelled before the answer reaches it

    store.acquire_stream_lock = reply_never_arrives
    hello = pb.ClientMessage(hello=pb.Hello(session_id=sid, session_token=token))
    stream = gw.StreamSession(_Requests(hello))
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.wait_for(asked.wait(), 60)
    first.cancel()  # what Serve does when the client cancels the call
    with pytest.raises(asyncio.CancelledError):
        await first
    store.acquire_stream_lock = take_lock

    if reply == "lost":
        assert await _lock_value(redis_server, redis_namespace, sid) is None
        assert await store.acquire_stream_lock(sid, "the next stream")  # the session can stream again at once
    else:
        assert (await _lock_value(redis_server, redis_namespace, sid)).decode() == other


async def test_each_stream_holds_the_lock_under_its_own_name(redis_server, redis_namespace) -> None:
    """The lock's value names the stream, not only the gateway replica: releasing what one stream may hold can never
    free the lock of another stream on the same replica. (These streams end at once: the session has no route.)"""
    gw, sid, token = await _gateway_with_session(redis_server, redis_namespace)
    _, store, _ = gw._clients()
    names = []
    take_lock = store.acquire_stream_lock

    async def record(sid_, owner):
        names.append(owner)
        return await take_lock(sid_, owner)

    store.acquire_stream_lock = record
    for _ in range(2):
        hello = pb.ClientMessage(hello=pb.Hello(session_id=sid, session_token=token))
        with pytest.raises(ApiError, match="no pipeline route"):  # (without a gRPC context the error is raised)
            await gw.StreamSession(_Requests(hello)).__anext__()
        assert await _lock_value(redis_server, redis_namespace, sid) is None
    assert len(set(names)) == 2 and all(n.startswith(gw.replica_id + "/") for n in names)
