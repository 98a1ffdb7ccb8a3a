"""The asyncio SDK against the same real grpc.aio AvatarService."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from avatarserve_client.v1 import avatar_service_pb2 as pb
from avatarserve_client import (INTERRUPT, AsyncAvatarClient, CapacityExhausted, EventKind,
                                FailedPrecondition, PermissionDenied, SessionNotFound, SessionState,
                                StatusEvent, VideoBlock, chunk_pcm, silence)

from .avatar_test_server import block_colour
from .conftest import tone


@pytest.fixture
async def aclient(server):
    async with AsyncAvatarClient(server.address, timeout=5, application="avatar") as c:
        yield c


async def test_async_stream_order_idle_and_events(server, aclient, png_bytes) -> None:
    audio = np.concatenate([tone(480), silence(480), tone(480)])
    async with aclient.session(png_bytes, formats=("jpeg", "h264")) as s:
        items = [i async for i in s.stream(chunk_pcm(audio), include_events=True)]
        info = await s.info()
    blocks = [i for i in items if isinstance(i, VideoBlock)]
    assert [(b.block_index, b.pts_ms, b.is_idle) for b in blocks] == [(0, 0, False), (1, 480, True),
                                                                      (2, 960, False)]
    for b in blocks:
        assert b.h264 is not None and len(b.jpeg_frames) == 12
        px = b.frames[5][12, 16].astype(int)
        assert np.abs(px - [block_colour(b.block_index), 200 if b.is_idle else 50, 100]).max() <= 8
    kinds = [i.kind for i in items if isinstance(i, StatusEvent)]
    assert kinds == [EventKind.STARTED, EventKind.SPEAKING, EventKind.IDLE, EventKind.SPEAKING,
                     EventKind.DRAINED, EventKind.END_OF_STREAM]
    assert info.counters.blocks_delivered == 3 and info.counters.idle_blocks_delivered == 1
    assert server.service.sessions[s.session_id].state == pb.SESSION_STATE_CLOSED
    assert s.stats.ttff_s is not None


async def test_async_stream_refused_before_its_first_reply_is_retried(server, aclient, png_bytes) -> None:
    server.reset(unavailable_streams=1)  # the first attempt ends UNAVAILABLE right after its Hello
    async with aclient.session(png_bytes) as s:
        blocks = [b async for b in s.stream(chunk_pcm(tone(960)))]
    assert [b.block_index for b in blocks] == [0, 1]
    assert len(server.service.stream_attempts) == 2


async def test_async_in_band_interrupt_and_async_audio_source(server, aclient, png_bytes) -> None:
    speech = chunk_pcm(tone(720), chunk_ms=240)

    async def source():
        for c in speech:
            yield c
        yield INTERRUPT
        yield pb.AudioChunk(seq=7, pts_ms=1200, pcm=tone(480).tobytes())

    async with aclient.session(png_bytes) as s:
        blocks = [b async for b in s.stream(source())]
    # [480, 720) discarded; silence fills 720..1200; the tone fills 1200..1680.
    assert [(b.block_index, b.pts_ms, b.is_idle) for b in blocks] == [(0, 0, False), (1, 720, True),
                                                                      (2, 1200, False)]
    assert [e.kind for e in s.events].count(EventKind.INTERRUPTED) == 1


async def test_async_out_of_band_interrupt_and_end_of_input(server, aclient, png_bytes) -> None:
    async with aclient.session(png_bytes) as s:
        seen = []
        async for item in s.stream([tone(480)], end_of_input=False, include_events=True):
            seen.append(item)
            if isinstance(item, VideoBlock):
                assert await s.interrupt() == 0
                await s.end_of_input()
    kinds = [i.kind for i in seen if isinstance(i, StatusEvent)]
    assert kinds[-4:] == [EventKind.INTERRUPTED, EventKind.IDLE, EventKind.DRAINED,
                         EventKind.END_OF_STREAM]


async def test_async_realtime_pacing(server, aclient, png_bytes) -> None:
    async with aclient.session(png_bytes) as s:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        blocks = [b async for b in s.stream(chunk_pcm(tone(480), chunk_ms=120), realtime=True)]
        elapsed = loop.time() - t0
    assert len(blocks) == 1
    assert elapsed >= 0.36 - 0.01  # the last chunk (pts 360 ms) was not sent early


async def test_async_error_codes(server, aclient, png_bytes) -> None:
    with pytest.raises(SessionNotFound):
        await aclient.get_session("missing", "t")
    handle = await aclient.create_session(png_bytes)
    with pytest.raises(PermissionDenied):
        await aclient.get_session(handle.session_id, "bad")
    async with aclient.attach(handle) as s:
        assert (await s.info()).state is SessionState.CREATED
    with pytest.raises(FailedPrecondition, match="CLOSED"):
        async for _ in aclient.attach(handle).stream([tone(40)]):
            pass
    server.reset(max_sessions=0, retry_after_ms=250)
    with pytest.raises(CapacityExhausted) as ei:
        async with aclient.session(png_bytes):
            pass
    assert ei.value.retry_after_s == 0.25


async def test_async_feeder_error_surfaces(server, aclient, png_bytes) -> None:
    def bad_source():
        yield tone(40)
        raise RuntimeError("microphone unplugged")

    async with aclient.session(png_bytes) as s:
        with pytest.raises(RuntimeError, match="microphone unplugged"):
            async for _ in s.stream(bad_source()):
                pass
