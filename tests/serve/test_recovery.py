"""`RecoveringPipe`: a stream that loses a hop mid-stream is re-placed, rebuilt by replay and continues, with every
block delivered exactly once, in order (real gRPC stage hosts; the lost hop's server is stopped like a killed
replica)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from avatarserve.serve.dataplane.recovery import RecoveringPipe
from avatarserve.serve.dataplane.stage_host import StageHost, StageHostConfig
from avatarserve.serve.dataplane.transport import (REPLAY_KEY, START_BLOCK_KEY, BlockItem, ErrorCode, PipelineClient,
                                                   PipelineError, TransportOptions)
from tests.conftest import ChainFactory
from tests.support.synthetic import SyntheticStage


class _Recorder(SyntheticStage):
    """A synthetic stage that records the blocks it saw and whether they were replays."""

    def __init__(self, name: str) -> None:
        super().__init__(0.0, name=name)
        self.seen: list[tuple[int, bool]] = []
        self.starts: list[int] = []

    async def open_session(self, session_id: str, config: bytes) -> None:
        await super().open_session(session_id, config)
        self.starts.append(json.loads(config or b"{}").get(START_BLOCK_KEY, 0))

    async def process(self, session_id, item):
        self.seen.append((item.block_index, item.metadata.get(REPLAY_KEY) == "1"))
        return await super().process(session_id, item)


async def _assert_every_hop_freed(handlers: dict, hosts: dict, limit_s: float = 30.0) -> None:
    """Wait (bounded) until no hop holds the session, then check none keeps it parked either."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while any(h.sessions for h in handlers.values()) and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert not any(h.sessions for h in handlers.values())
    assert all(host.parked_sessions == 0 for host in hosts.values())


def _block(b: int) -> BlockItem:
    return BlockItem(block_index=b, pts_ms=b * 480, tensors={"pcm": np.full(8, b, np.float32)})


async def _stream(pipe: RecoveringPipe, blocks: int, on_received, in_flight: int = 3) -> list[int]:
    """Send `blocks` blocks (at most `in_flight`, like the gateway's cap) while receiving; -> indices received."""
    room = asyncio.Semaphore(in_flight)
    got: list[int] = []

    async def send() -> None:
        for b in range(blocks):
            await room.acquire()
            await pipe.send(_block(b))
        await pipe.end("end_of_input")

    sender = asyncio.create_task(send())
    try:
        while (item := await pipe.receive()) is not None:
            if isinstance(item, BlockItem):
                got.append(item.block_index)
                room.release()
                await on_received(item.block_index)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    return got


@pytest.mark.parametrize("replay_blocks", [2, 16, "per-hop"])
async def test_a_lost_hop_is_replaced_and_the_stream_continues_without_losing_a_block(
        synthetic_chain: ChainFactory, replay_blocks: int) -> None:
    chain = await synthetic_chain(3)
    spare_handler = _Recorder("spare")
    spare = StageHost(spare_handler, StageHostConfig(name="spare", transport=TransportOptions(queue_size=2,
                                                                                             open_timeout_s=5.0)))
    spare_address = await spare.start()
    route = list(chain.route)
    lost: list[PipelineError] = []
    try:
        async with PipelineClient(TransportOptions(queue_size=2, open_timeout_s=5.0)) as client:
            async def open_at(start):
                cfg = json.dumps({} if start is None else {START_BLOCK_KEY: start}).encode()
                return await client.open("s-rec", route, cfg)

            async def reroute(err: PipelineError) -> None:
                # Like the gateway: a hop that still serves keeps its place (the caller's own stream can break
                # with the loss further down); the dead one is replaced.
                lost.append(err)
                if err.lost_hop == dead:
                    route[route.index(dead)] = spare.address

            if replay_blocks == "per-hop":  # the gateway's way: depth by the lost replica's role
                depth = {route[1]: 3}
                replay_blocks = 3
                pipe = RecoveringPipe("s-rec", open_at, reroute, replay_blocks=lambda hop: depth.get(hop, 0),
                                      max_replay=16, max_recoveries=2)
            else:
                pipe = RecoveringPipe("s-rec", open_at, reroute, replay_blocks=replay_blocks, max_recoveries=2)
            await pipe.open()

            dead = route[1]

            async def kill_middle_after_block_5(b: int) -> None:
                if b == 5:
                    await chain.hosts[1].stop(grace_s=0)  # the replica's server goes away mid-stream

            got = await _stream(pipe, 20, kill_middle_after_block_5)
            await pipe.close()
    finally:
        await spare.stop(grace_s=0.5)
    assert got == list(range(20))  # every block exactly once, in order
    assert lost and all(e.code == ErrorCode.UNAVAILABLE for e in lost) and route[1] == spare_address
    rec = pipe.recoveries[-1]
    assert rec.reopened_at >= rec.started_at and rec.first_block_at >= rec.reopened_at
    # The new pipe starts `replay_blocks` before the first undelivered block (or at 0) and replays up to it.
    first_undelivered = rec.start_block + rec.replayed
    assert rec.start_block == max(0, first_undelivered - replay_blocks)
    assert spare_handler.starts == [rec.start_block]
    replays = [b for b, replay in spare_handler.seen if replay]
    assert replays == list(range(rec.start_block, first_undelivered))
    assert [b for b, replay in spare_handler.seen if not replay] == list(range(first_undelivered, 20))
    assert 6 <= first_undelivered <= 9  # block 5 was delivered; at most 3 more were in flight


async def test_losses_beyond_the_budget_end_the_stream_with_the_loss(synthetic_chain: ChainFactory) -> None:
    chain = await synthetic_chain(2)
    route = list(chain.route)
    async with PipelineClient(TransportOptions(queue_size=2, open_timeout_s=5.0)) as client:
        async def open_at(start: int):
            return await client.open("s-budget", route, b"{}")

        async def reroute(err: PipelineError) -> None:
            raise AssertionError("no recovery budget: reroute must not be called")

        pipe = await RecoveringPipe("s-budget", open_at, reroute, replay_blocks=4, max_recoveries=0).open()

        async def kill(b: int) -> None:
            if b == 1:
                await chain.hosts[1].stop(grace_s=0)

        with pytest.raises(PipelineError) as err:
            await _stream(pipe, 10, kill)
        assert err.value.lost_hop == route[1]
        await pipe.close()


async def test_the_budget_counts_losses_in_a_row_so_spaced_losses_never_end_the_stream(
        synthetic_chain: ChainFactory) -> None:
    """max_recoveries=2, and the middle hop is lost three times, with video in between: all three are recovered (an
    endless stream must survive losses spread over its life); the count restarts at each recovery's first new
    block. (One loss may take two reopens: when the caller's own write fails first, gRPC ends its call INTERNAL
    before the hop's report of the lost hop is read, so the first reopen still has the dead hop in its route.)"""
    chain = await synthetic_chain(3)
    spares = [StageHost(_Recorder(f"spare{i}"), StageHostConfig(name=f"spare{i}", transport=TransportOptions(
        queue_size=2, open_timeout_s=5.0))) for i in range(3)]
    for spare in spares:
        await spare.start()
    route = list(chain.route)
    try:
        async with PipelineClient(TransportOptions(queue_size=2, open_timeout_s=5.0)) as client:
            async def open_at(start):
                cfg = json.dumps({} if start is None else {START_BLOCK_KEY: start}).encode()
                return await client.open("s-spaced", route, cfg)

            replacements = iter(spares)

            async def reroute(err: PipelineError) -> None:
                if err.lost_hop == route[1]:
                    route[1] = next(replacements).address

            pipe = await RecoveringPipe("s-spaced", open_at, reroute, replay_blocks=2, max_recoveries=2).open()
            middles = iter([chain.hosts[1], *spares])

            async def kill_middle(b: int) -> None:
                if b in (4, 10, 16):
                    await next(middles).stop(grace_s=0)

            got = await _stream(pipe, 24, kill_middle)
            await pipe.close()
        assert got == list(range(24))
        assert len(pipe.recoveries) >= 3 and all(r.first_block_at for r in pipe.recoveries)
        assert route[1] == spares[2].address  # each of the three lost middles was replaced
    finally:
        for spare in spares:
            await spare.stop(grace_s=0.5)


async def test_hops_that_survive_keep_the_session_and_answer_replayed_blocks_from_their_memo() -> None:
    handlers = {n: _Recorder(n) for n in ("a", "b", "c", "d", "spare")}
    hosts = {n: StageHost(h, StageHostConfig(name=n, resume_hold_s=30.0, memo_blocks=24,
                                             transport=TransportOptions(queue_size=2, open_timeout_s=5.0)))
             for n, h in handlers.items()}
    for host in hosts.values():
        await host.start()
    route = [hosts[n].address for n in ("a", "b", "c", "d")]
    b_address = hosts["b"].address
    try:
        async with PipelineClient(TransportOptions(queue_size=2, open_timeout_s=5.0)) as client:
            async def open_at(start):
                cfg = json.dumps({} if start is None else {START_BLOCK_KEY: start}).encode()
                return await client.open("s-keep", route, cfg)

            async def reroute(err: PipelineError) -> None:
                if err.lost_hop == b_address:  # a hop that still serves keeps its place (see above)
                    route[route.index(err.lost_hop)] = hosts["spare"].address

            pipe = await RecoveringPipe("s-keep", open_at, reroute, replay_blocks=4, max_recoveries=3).open()

            async def kill_b(b: int) -> None:
                if b == 9:
                    await hosts["b"].stop(grace_s=0)

            got = await _stream(pipe, 20, kill_b)
            await pipe.close()
        assert got == list(range(20))
        rec = pipe.recoveries[-1]
        # The surviving hops opened the session once and computed every block exactly once: the replayed and
        # resent blocks they had done were answered from their memo.
        for n in ("a", "c", "d"):  # upstream and downstream of the lost hop
            assert handlers[n].starts == [0], n
            assert [b for b, _ in handlers[n].seen] == list(range(20)), (n, handlers[n].seen)
        assert handlers["spare"].starts == [rec.start_block]
        assert [b for b, _ in handlers["spare"].seen] == list(range(rec.start_block, 20))
        # A clean end frees everything: nothing parked, no handler state.
        for n in ("a", "c", "d", "spare"):
            assert hosts[n].parked_sessions == 0 and not handlers[n].sessions, n
    finally:
        for host in hosts.values():
            await host.stop(grace_s=0.5)


async def test_a_broken_pipe_parks_the_session_until_hold_expires() -> None:
    handler = _Recorder("solo")
    host = StageHost(handler, StageHostConfig(name="solo", resume_hold_s=0.2, memo_blocks=4,
                                              transport=TransportOptions(queue_size=2, open_timeout_s=5.0)))
    await host.start()
    try:
        async with PipelineClient(TransportOptions(queue_size=2, open_timeout_s=5.0)) as client:
            pipe = await client.open("s-park", [host.address])
            await pipe.send(_block(0))
            assert isinstance(await pipe.receive(), BlockItem)
            await pipe.close()  # the caller vanishes mid-stream
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while host.parked_sessions == 0 and "s-park" in handler.sessions and loop.time() < deadline:
            await asyncio.sleep(0.01)
        while "s-park" in handler.sessions and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert "s-park" not in handler.sessions and host.parked_sessions == 0 and host.live_sessions == 0
    finally:
        await host.stop(grace_s=0.5)


async def test_closing_a_running_pipe_with_a_drain_frees_every_hop_at_once() -> None:
    handlers = {n: _Recorder(n) for n in ("a", "b", "c")}
    hosts = {n: StageHost(h, StageHostConfig(name=n, resume_hold_s=60.0, memo_blocks=8,
                                             transport=TransportOptions(queue_size=2, open_timeout_s=5.0)))
             for n, h in handlers.items()}
    for host in hosts.values():
        await host.start()
    route = [hosts[n].address for n in ("a", "b", "c")]
    try:
        async with PipelineClient(TransportOptions(queue_size=2, open_timeout_s=5.0)) as client:
            async def open_at(start):
                return await client.open("s-drain", route, b"{}")

            async def reroute(err):
                raise err

            pipe = await RecoveringPipe("s-drain", open_at, reroute, replay_blocks=2, max_recoveries=1).open()
            for b in range(3):
                await pipe.send(_block(b))
            assert (await pipe.receive()).block_index == 0
            await pipe.close(drain_s=30.0)  # two blocks still in flight: they finish, then every hop frees it
        await _assert_every_hop_freed(handlers, hosts)
    finally:
        for host in hosts.values():
            await host.stop(grace_s=0.5)


async def test_a_hop_already_gone_at_open_is_re_placed(synthetic_chain: ChainFactory) -> None:
    chain = await synthetic_chain(3)
    route = list(chain.route)
    gone = route[1]
    await chain.hosts[1].stop(grace_s=0)  # died before the stream opened; the route still names it
    spare = StageHost(SyntheticStage(0.0, name="spare"),
                      StageHostConfig(name="spare", transport=TransportOptions(queue_size=2, open_timeout_s=5.0)))
    await spare.start()
    try:
        async with PipelineClient(TransportOptions(queue_size=2, open_timeout_s=5.0)) as client:
            async def open_at(start):
                return await client.open("s-gone", route, b"{}")

            async def reroute(err: PipelineError) -> None:
                assert err.lost_hop == gone
                route[route.index(gone)] = spare.address

            pipe = await RecoveringPipe("s-gone", open_at, reroute, replay_blocks=2, max_recoveries=1).open()
            got = await _stream(pipe, 4, lambda b: asyncio.sleep(0))
            await pipe.close()
        assert got == [0, 1, 2, 3] and route[1] == spare.address and not pipe.recoveries
    finally:
        await spare.stop(grace_s=0.5)


@pytest.mark.parametrize("in_flight", [3, 1])
async def test_a_stuck_hop_is_detected_and_the_pipe_reopened_on_the_same_route(synthetic_chain: ChainFactory,
                                                                               in_flight: int) -> None:
    """With one block in flight the receive for block 3 starts while the pipe is empty (the next block is sent
    after it): the stall deadline must still start when that block goes in (it once waited forever)."""
    class StuckOnce(SyntheticStage):
        """Never finishes block 3 of the first pipe it serves (a hop that hangs without dying)."""

        def __init__(self) -> None:
            super().__init__(0.0, name="stuck")
            self.opens = 0

        async def open_session(self, session_id: str, config: bytes) -> None:
            self.opens += 1
            await super().open_session(session_id, config)

        async def process(self, session_id, item):
            if self.opens == 1 and item.block_index == 3:
                await asyncio.Event().wait()
            return await super().process(session_id, item)

    chain = await synthetic_chain(1)
    stuck = StuckOnce()
    host = StageHost(stuck, StageHostConfig(name="stuck", drain_timeout_s=1.0,
                                            transport=TransportOptions(queue_size=2, open_timeout_s=5.0)))
    await host.start()
    route = [chain.route[0], host.address]
    try:
        async with PipelineClient(TransportOptions(queue_size=2, open_timeout_s=5.0)) as client:
            async def open_at(start):
                cfg = json.dumps({} if start is None else {START_BLOCK_KEY: start}).encode()
                return await client.open("s-stuck", route, cfg)

            async def reroute(err: PipelineError) -> None:
                raise AssertionError("a stall keeps the route")

            pipe = await RecoveringPipe("s-stuck", open_at, reroute, replay_blocks=8, max_recoveries=1,
                                        stall_s=1.0).open()
            async def at_once(b: int) -> None:  # does not yield: the next receive starts before the next send
                pass

            got = await asyncio.wait_for(_stream(pipe, 8, at_once, in_flight=in_flight), 60)
            await pipe.close()
        assert got == list(range(8))
        assert len(pipe.recoveries) == 1 and pipe.recoveries[0].start_block == 0 and stuck.opens == 2
    finally:
        await host.stop(grace_s=0.5)


async def test_a_drained_close_while_a_receive_is_pending_still_ends_cleanly() -> None:
    """The gateway's controller leaves a receive pending when its stream is cancelled; closing with a drain must
    not cancel the call (which the hops would take for a lost hop and keep the session)."""
    handlers = {n: _Recorder(n) for n in ("a", "b")}
    hosts = {n: StageHost(h, StageHostConfig(name=n, resume_hold_s=60.0, memo_blocks=8,
                                             transport=TransportOptions(queue_size=2, open_timeout_s=5.0)))
             for n, h in handlers.items()}
    for host in hosts.values():
        await host.start()
    try:
        async with PipelineClient(TransportOptions(queue_size=2, open_timeout_s=5.0)) as client:
            async def open_at(start):
                return await client.open("s-pending", [hosts["a"].address, hosts["b"].address], b"{}")

            async def reroute(err):
                raise err

            pipe = await RecoveringPipe("s-pending", open_at, reroute, replay_blocks=2, max_recoveries=1,
                                        stall_s=60.0).open()
            await pipe.send(_block(0))
            assert (await pipe.receive()).block_index == 0
            waiting = asyncio.create_task(pipe.receive())  # nothing in flight: it waits
            await asyncio.sleep(0)
            waiting.cancel()  # the controller is torn down mid-receive
            await asyncio.gather(waiting, return_exceptions=True)
            await pipe.close(drain_s=30.0)
        await _assert_every_hop_freed(handlers, hosts)
    finally:
        for host in hosts.values():
            await host.stop(grace_s=0.5)


async def test_when_every_block_came_back_a_withheld_end_of_stream_ends_the_stream_after_end_wait() -> None:
    """Seen under load: every hop ended the session cleanly, yet the gateway's read of the first hop's call never
    returned the end-of-stream (the stream then hung until the client's deadline). With the input ended and nothing
    in flight, the pipe waits `end_wait_s` for it, then ends by itself; a receive already waiting when the input
    ends gets that deadline too."""
    handlers = {n: _Recorder(n) for n in ("a", "b")}
    hosts = {n: StageHost(h, StageHostConfig(name=n, transport=TransportOptions(queue_size=2, open_timeout_s=5.0)))
             for n, h in handlers.items()}
    for host in hosts.values():
        await host.start()

    class WithheldEnd:
        """The real pipe, except that its end-of-stream never reaches the caller."""

        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        async def receive(self):
            item = await self.inner.receive()
            if item is None:
                await asyncio.Event().wait()
            return item

    try:
        async with PipelineClient(TransportOptions(queue_size=2, open_timeout_s=5.0)) as client:
            async def open_at(start):
                return WithheldEnd(await client.open("s-withheld", [hosts["a"].address, hosts["b"].address], b"{}"))

            async def reroute(err):
                raise err

            pipe = await RecoveringPipe("s-withheld", open_at, reroute, replay_blocks=2, max_recoveries=1,
                                        stall_s=60.0, end_wait_s=0.5).open()
            for b in range(3):
                await pipe.send(_block(b))
            assert [(await pipe.receive()).block_index for _ in range(3)] == [0, 1, 2]
            waiting = asyncio.create_task(pipe.receive())  # nothing in flight, input not ended: no deadline yet
            await asyncio.sleep(0)
            await pipe.end("end_of_input")
            assert await asyncio.wait_for(waiting, 30) is None  # 0.5 s after the end, not the stall's 60 s
            await pipe.close(drain_s=5.0)
        await _assert_every_hop_freed(handlers, hosts)
    finally:
        for host in hosts.values():
            await host.stop(grace_s=0.5)
