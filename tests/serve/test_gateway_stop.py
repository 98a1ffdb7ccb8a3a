"""A gateway replica that is being stopped drains its own streams and refuses new work (the cluster test is
tests/integration/test_gateway_stop.py); `replica_stopping` outside a Serve replica knows nothing."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from avatarserve.serve.api.errors import ApiError
from avatarserve.serve.api.servicer import Gateway
from avatarserve.serve.ray_compat import replica_stopping


class _Controller:
    def __init__(self) -> None:
        self.ends = []

    def request_end(self, code: str, *, drain: bool = False) -> None:
        self.ends.append((code, drain))


class _Store:
    async def draining_ms(self) -> int:
        return 0


def _gateway(probe=None) -> Gateway:
    return Gateway({"redis_url": "redis://127.0.0.1:1", "retry_after_ms": 1500,
                    "timeouts": {"stop_poll_s": 0.01}}, stop_probe=probe)


def test_stop_streams_drains_every_open_stream_with_server_draining():
    gw = _gateway()
    a, b = _Controller(), _Controller()
    gw._streams = {"s1": (a, None), "s2": (b, None)}
    assert gw.stop_streams() == 2
    assert a.ends == b.ends == [("server_draining", True)]  # drain: what the client sent is delivered first
    assert gw.stopping


def test_a_stopping_gateway_refuses_new_streams_and_sessions_with_a_retry_hint():
    gw = _gateway()
    asyncio.run(gw._refuse_while_draining(_Store()))  # not stopping: nothing to refuse
    gw.stop_streams()
    with pytest.raises(ApiError) as refused:
        asyncio.run(gw._refuse_while_draining(_Store()))
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert refused.value.trailing == {"retry-after-ms": "1500"}


def test_the_watch_drains_once_the_probe_says_stopping_and_survives_a_failing_probe():
    answers = iter([RuntimeError("controller unreachable"), False, True])
    stopped = asyncio.Event()
    ctl = _Controller()

    def probe():
        answer = next(answers, True)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def run():
        gw = _gateway(probe)
        gw._streams = {"s1": (ctl, None)}
        real_stop = gw.stop_streams

        def stop_streams():
            n = real_stop()
            stopped.set()
            return n
        gw.stop_streams = stop_streams
        watch = asyncio.create_task(gw._watch_stop())
        await stopped.wait()
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        return gw

    gw = asyncio.run(run())
    assert gw.stopping and ctl.ends[0] == ("server_draining", True)


def test_replica_stopping_outside_a_replica_is_unknown():
    assert replica_stopping() is None


class _Context:
    def __init__(self) -> None:
        self.code = None
        self.details = ""

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, md) -> None:
        pass


def test_a_stream_whose_first_message_never_arrives_ends_unavailable_after_hello_s():
    from avatarserve.serve.api.errors import StreamFailed

    gw = Gateway({"redis_url": "redis://127.0.0.1:1", "timeouts": {"hello_s": 0.2}})
    gw._clients = lambda: (None, None, None)  # nothing past the Hello is reached
    fetches = []

    class _Silent:  # a request stream whose first message never comes (the proxy's fetch never returns)
        def __aiter__(self):
            return self

        async def __anext__(self):
            fetch = asyncio.get_running_loop().create_future()
            fetches.append(fetch)
            return await fetch

    async def run():
        ctx = _Context()
        with pytest.raises(StreamFailed):
            async for _ in gw.StreamSession(_Silent(), ctx):
                pass
        return ctx

    ctx = asyncio.run(asyncio.wait_for(run(), 30))  # a hang guard: the stream itself ends after 0.2 s
    assert ctx.code == grpc.StatusCode.UNAVAILABLE and "Hello" in ctx.details and "0.2 s" in ctx.details
    assert len(fetches) == 1 and fetches[0].cancelled()  # the pending fetch was given up, not left behind
