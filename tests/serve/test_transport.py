"""Data-plane tests without Ray: several StageHosts in-process on loopback, synthetic handlers."""

from __future__ import annotations

import asyncio
import time

import grpc.aio
import numpy as np
import pytest
import torch

from tests.support.synthetic import SINK_KIND, SyntheticSessionConfig
from avatarserve.serve.dataplane.transport import (
    BlockItem,
    ControlBoard,
    ControlItem,
    ControlTimeoutError,
    ErrorCode,
    PipelineClient,
    PipelineError,
    PipelineSession,
    ProtocolError,
    TensorCodecError,
    WireTensor,
    block_from_proto,
    block_to_proto,
    message_kind,
    open_pipe,
)
from avatarserve.stage.v1 import stage_pb2 as pb

from tests.conftest import ChainFactory, free_port

LATENT_SHAPE = (16, 3, 48, 88)  # 14B model block latent: bf16, 405,504 bytes


def latent(seed: int) -> WireTensor:
    g = torch.Generator().manual_seed(seed)
    return WireTensor.from_torch(torch.randn(LATENT_SHAPE, generator=g).to(torch.bfloat16))


def block(i: int, lat: WireTensor) -> BlockItem:
    return BlockItem(block_index=i, tensors={"latent": lat}, pts_ms=480 * i)


async def run_session(session: PipelineSession, blocks: list[BlockItem]) -> list:
    """Send all blocks (then end) while reading everything; return received items."""

    async def produce() -> None:
        for b in blocks:
            await session.send(b)
        await session.end()

    producer = asyncio.create_task(produce())
    items = [item async for item in session]
    await producer
    return items


# ------------------------------------------------------------------------------------ codec


def _address(raw: bytes) -> int:
    return np.frombuffer(raw, dtype=np.uint8).ctypes.data


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.uint8, np.bool_, np.int8])
def test_numpy_roundtrip_is_zero_copy(dtype: type) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    wt = WireTensor.from_numpy(arr)
    back = wt.numpy()
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert back.ctypes.data == _address(wt.data)  # a view of the received bytes, no copy
    assert not back.flags.writeable


def test_bf16_latent_roundtrip_through_proto() -> None:
    t = torch.randn(LATENT_SHAPE).to(torch.bfloat16)
    wt = WireTensor.from_torch(t)
    assert wt.dtype == "bfloat16" and wt.nbytes == 405_504
    msg = pb.StageMessage(block=block_to_proto("s", BlockItem(7, {"latent": wt, "audio": np.ones((2, 5), np.float32)}, pts_ms=3360, metadata={"k": "v"})))
    item = block_from_proto(pb.StageMessage.FromString(msg.SerializeToString()).block)
    assert item.block_index == 7 and item.pts_ms == 3360 and item.metadata == {"k": "v"}
    back = item.tensor("latent").torch()
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)
    assert back.data_ptr() == _address(item.tensor("latent").data)
    np.testing.assert_array_equal(item.tensor("audio").numpy(), np.ones((2, 5), np.float32))
    with pytest.raises(TensorCodecError, match="bfloat16 has no numpy dtype"):
        item.tensor("latent").numpy()


def test_non_contiguous_and_big_endian_inputs_are_normalized() -> None:
    arr = np.arange(12, dtype=">f4").reshape(3, 4).T
    wt = WireTensor.from_numpy(arr)
    np.testing.assert_array_equal(wt.numpy(), arr.astype("<f4"))
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T
    assert torch.equal(WireTensor.from_torch(t).torch(), t)


def test_tensor_validation_errors() -> None:
    with pytest.raises(TensorCodecError, match=r"needs 8 bytes, got 7"):
        WireTensor("float32", (2,), b"\0" * 7)
    with pytest.raises(TensorCodecError, match="unsupported dtype 'complex64'"):
        WireTensor("complex64", (1,), b"\0" * 8)
    with pytest.raises(TensorCodecError, match="non-negative"):
        WireTensor("uint8", (-1,), b"")
    with pytest.raises(TensorCodecError, match="unsupported numpy dtype complex64"):
        WireTensor.from_numpy(np.zeros(2, np.complex64))
    with pytest.raises(TensorCodecError, match="cannot encode list"):
        WireTensor.of([1, 2])
    with pytest.raises(TensorCodecError, match="has no tensor 'audio'"):
        BlockItem(0, {"latent": latent(0)}).tensor("audio")
    dup = pb.Block(session_id="s", tensors=[pb.Tensor(name="x", dtype="uint8", shape=[1], data=b"a")] * 2)
    with pytest.raises(TensorCodecError, match="appears twice"):
        block_from_proto(dup)


def test_message_kind_reads_serialized_bytes() -> None:
    for msg, kind in [
        (pb.StageMessage(block=pb.Block(session_id="s")), "block"),
        (pb.StageMessage(control=pb.Control(kind="k")), "control"),
        (pb.StageMessage(end=pb.EndOfStream()), "end"),
        (pb.StageMessage(error=pb.Error(code=5)), "error"),
    ]:
        assert message_kind(msg.SerializeToString()) == kind == message_kind(msg)
    with pytest.raises(ProtocolError):
        message_kind(b"")
    with pytest.raises(ProtocolError):
        message_kind(pb.StageMessage())


async def test_control_board_waits_deterministically() -> None:
    board = ControlBoard()
    board.open("s")
    waiter = asyncio.create_task(board.wait_for("s", SINK_KIND, for_block=5, timeout_s=5))
    await asyncio.sleep(0.01)
    board.publish("s", ControlItem(SINK_KIND, apply_from_block=9, metadata={"v": "late"}))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # an update for block 9 does not apply to block 5
    board.publish("s", ControlItem(SINK_KIND, apply_from_block=4, metadata={"v": "ok"}))
    assert (await waiter).metadata == {"v": "ok"}
    assert board.latest("s", SINK_KIND, for_block=10).metadata == {"v": "late"}
    with pytest.raises(ControlTimeoutError):
        await board.wait_for("s", "other", for_block=0, timeout_s=0.05)
    board.close("s")
    with pytest.raises(ProtocolError, match="not open"):
        board.publish("s", ControlItem(SINK_KIND))


# ------------------------------------------------------------------------------------ chain


async def test_order_route_and_payload(synthetic_chain: ChainFactory) -> None:
    chain = await synthetic_chain(5, hold_s=0.002)
    lats = [latent(i) for i in range(20)]
    async with PipelineClient() as client:
        session = await client.open("s-order", chain.route)
        assert session.hops == ("stage0", "stage1", "stage2", "stage3", "stage4")
        items = await run_session(session, [block(i, lats[i]) for i in range(20)])
    assert [it.block_index for it in items] == list(range(20))
    for i, it in enumerate(items):
        assert isinstance(it, BlockItem)
        assert it.metadata["trace"] == "stage0,stage1,stage2,stage3,stage4"
        assert it.pts_ms == 480 * i
        assert it.tensor("latent") == lats[i]
        assert [s.hop for s in it.stamps] == ["client", "stage0", "stage1", "stage2", "stage3", "stage4"]
        ends = [s.end_unix_ns for s in it.stamps]
        assert ends == sorted(ends)
    await chain.wait_closed()  # end-of-stream frees every hop
    assert [h.sessions_closed for h in chain.hosts] == [1] * 5


async def test_pipelining_overlaps_stages(synthetic_chain: ChainFactory) -> None:
    hold, n_blocks, n_stages = 0.05, 20, 5
    chain = await synthetic_chain(n_stages, hold_s=hold)
    lat = latent(0)
    async with PipelineClient() as client:
        session = await client.open("s-pipe", chain.route)
        t0 = time.perf_counter()
        items = await run_session(session, [block(i, lat) for i in range(n_blocks)])
        elapsed = time.perf_counter() - t0
    assert len(items) == n_blocks
    ideal = (n_blocks + n_stages - 1) * hold  # 1.2 s
    sequential = n_blocks * n_stages * hold  # 5.0 s
    assert elapsed >= ideal * 0.95  # nothing can beat the bottleneck stage
    assert elapsed < 0.5 * sequential, f"{elapsed:.2f}s: stages did not overlap (ideal {ideal:.2f}s)"


async def test_backpressure_is_bounded_and_isolated(synthetic_chain: ChainFactory) -> None:
    q = 2
    chain = await synthetic_chain(5, hold_s=0.0, queue_size=q)
    lat = latent(1)
    total = 300
    async with PipelineClient() as client:
        stalled = await client.open("s-stalled", chain.route)
        sent = 0

        async def produce() -> None:
            nonlocal sent
            for i in range(total):
                await stalled.send(block(i, lat))
                sent += 1
            await stalled.end()

        producer = asyncio.create_task(produce())
        # Nobody reads `stalled`: the producer must block after a bounded number of blocks.
        prev = -1
        for _ in range(100):
            await asyncio.sleep(0.1)
            if sent == prev:
                break
            prev = sent
        await asyncio.sleep(0.3)
        assert not producer.done(), "producer never blocked"
        assert sent == prev, "producer kept sending while nobody read"
        # Every queue of the stalled session holds at most queue_size items at every hop.
        for host in chain.hosts:
            st = host.stats()["sessions"]["s-stalled"]
            assert max(st["in_queue"], st["down_queue"], st["up_queue"]) <= q, (host.name, st)
        # What a stalled session holds: per hop 3 queues x q + 4 items in hand (worker, sender,
        # relay, writer) = 10, plus per stream (5 down, 5 up) one pending write + a 1 MiB window
        # (~3 latents) = 4: 5*10 + 10*4 = 90. Allow 1.3x; unbounded queues would take all 300.
        assert sent <= 120, f"{sent} blocks accepted by a pipeline nobody reads"

        # Another session on the same hops is not held up by the stalled one.
        other = await client.open("s-other", chain.route)
        got = await asyncio.wait_for(run_session(other, [block(i, lat) for i in range(5)]), 10)
        assert [it.block_index for it in got] == list(range(5))

        # Resume reading: everything arrives, in order.
        items = await asyncio.wait_for(_collect(stalled), 30)
        await producer
    assert [it.block_index for it in items] == list(range(total))
    await chain.wait_closed()


async def _collect(session: PipelineSession) -> list:
    return [item async for item in session]


async def test_upstream_control_items_reach_every_upstream_handler(synthetic_chain: ChainFactory) -> None:
    chain = await synthetic_chain(5, hold_s=0.005, roles=["consumer", "consumer", "consumer", "publisher", "none"])
    lats = [latent(10 + i) for i in range(8)]
    cfg = SyntheticSessionConfig(sink_from_block=3).to_bytes()
    async with PipelineClient() as client:
        session = await client.open("s-sink", chain.route, cfg)
        items = await run_session(session, [block(i, lats[i]) for i in range(8)])
    controls = [it for it in items if isinstance(it, ControlItem)]
    blocks = [it for it in items if isinstance(it, BlockItem)]
    assert [b.block_index for b in blocks] == list(range(8))
    assert len(controls) == 1
    ctl = controls[0]
    assert (ctl.kind, ctl.apply_from_block, ctl.origin) == (SINK_KIND, 3, "stage3")
    assert WireTensor.of(ctl.tensors["latent"]) == lats[2]  # published after block N-1 = 2
    sink_tags = [f"sink@stage{k}" for k in range(4)]
    for b in blocks:
        applied = {t: b.metadata.get(t) for t in sink_tags}
        if b.block_index < 3:
            assert applied == dict.fromkeys(sink_tags), b.metadata
        else:  # stages 0..3 all applied the update before processing blocks >= 3
            assert applied == dict.fromkeys(sink_tags, "stage3@2"), b.metadata
        assert "sink@stage4" not in b.metadata
    # Delivered to each upstream handler exactly once; never to the hop downstream of the publisher.
    assert [h.board_deliveries for h in chain.handlers] == [1, 1, 1, 0, 0]
    await chain.wait_closed()


async def test_handler_error_closes_only_its_session(synthetic_chain: ChainFactory) -> None:
    chain = await synthetic_chain(5, hold_s=0.01)
    lat = latent(2)
    failing = SyntheticSessionConfig(fail_at={"stage2": 4}).to_bytes()
    async with PipelineClient() as client:
        bad = await client.open("s-bad", chain.route, failing)
        good = await client.open("s-good", chain.route)

        async def produce_bad() -> None:
            try:
                for i in range(10):
                    await bad.send(block(i, lat))
                await bad.end()
            except PipelineError:
                pass  # the stream ended under us: expected once stage2 failed

        async def read_bad() -> tuple[list[int], PipelineError]:
            seen = []
            with pytest.raises(PipelineError) as err:
                async for it in bad:
                    seen.append(it.block_index)
            return seen, err.value

        producer = asyncio.create_task(produce_bad())
        (seen, error), good_items = await asyncio.gather(read_bad(), run_session(good, [block(i, lat) for i in range(10)]))
        await producer
    # Every block that passed stage2 before the failure is delivered, then the typed error.
    assert seen == [0, 1, 2, 3]
    assert error.code == ErrorCode.HANDLER_FAILED and error.origin == "stage2" and error.session_id == "s-bad"
    assert "injected failure at stage2, block 4" in error.message
    with pytest.raises(PipelineError):
        await bad.send(block(11, lat))
    assert [it.block_index for it in good_items] == list(range(10))
    assert all(it.metadata["trace"].count("stage") == 5 for it in good_items)
    await chain.wait_closed()


async def test_close_frees_state_at_every_hop(synthetic_chain: ChainFactory) -> None:
    chain = await synthetic_chain(5, hold_s=0.02)
    lat = latent(3)
    async with PipelineClient() as client:
        session = await client.open("s-close", chain.route)
        for i in range(4):
            await session.send(block(i, lat))
        first = await session.receive()
        assert first.block_index == 0
        assert chain.live_sessions() == [1] * 5
        assert all("s-close" in h.sessions for h in chain.handlers)
        await session.close()  # abort mid-stream
        await chain.wait_closed("s-close")
        assert all(not h.sessions for h in chain.handlers)
        # The same id can be opened again right away.
        again = await client.open("s-close", chain.route)
        items = await run_session(again, [block(0, lat)])
        assert [it.block_index for it in items] == [0]
    await chain.wait_closed()


async def test_open_errors_are_typed(synthetic_chain: ChainFactory) -> None:
    chain = await synthetic_chain(3)
    dead = f"127.0.0.1:{free_port()}"
    async with PipelineClient() as client:
        with pytest.raises(PipelineError) as err:
            await client.open("s-dead", [chain.route[0], chain.route[1], dead], timeout_s=5)
        assert err.value.code == ErrorCode.UNAVAILABLE and err.value.origin == "stage1"
        assert dead in err.value.message and err.value.lost_hop == dead
        await chain.wait_closed("s-dead")

        with pytest.raises(PipelineError) as err:
            await client.open("s-cfg", chain.route, b"{not json")
        assert err.value.code == ErrorCode.INVALID_ARGUMENT and err.value.origin == "stage0"
        assert "not JSON" in err.value.message

        # A second open of a live session supersedes the first (only the stream-lock holder opens pipes; the
        # first caller is gone): the old pipe ends at the hop it shares with the new one, the new one works.
        old = await client.open("s-dup", chain.route)
        new = await client.open("s-dup", chain.route[1:])
        with pytest.raises(PipelineError) as err:
            while await old.receive() is not None:
                pass
        assert err.value.code == ErrorCode.UNAVAILABLE and err.value.origin == "stage1"
        assert "superseded" in err.value.message and not err.value.lost_hop
        await new.send(BlockItem(0, {"latents": latent(0)}))
        await new.end()
        assert [item.block_index async for item in new] == [0]
        await old.close()

        with pytest.raises(ProtocolError, match="non-empty"):
            await client.open("", chain.route)
        with pytest.raises(ProtocolError, match="host:port"):
            await client.open("s", ["nowhere"])
    await chain.wait_closed()


async def test_malformed_block_is_rejected_after_earlier_blocks(synthetic_chain: ChainFactory) -> None:
    chain = await synthetic_chain(2)
    lat = latent(4)
    channel = grpc.aio.insecure_channel(chain.route[0])
    try:
        call, hops = await open_pipe(channel, "s-raw", chain.route, b"", 5.0)
        assert hops == ["stage0", "stage1"]
        await call.write(pb.StageMessage(block=block_to_proto("s-raw", block(0, lat))))
        bad = pb.Block(session_id="s-raw", block_index=1, tensors=[pb.Tensor(name="latent", dtype="bfloat16", shape=[16, 3, 48, 88], data=b"\0" * 10)])
        await call.write(pb.StageMessage(block=bad))
        first = await call.read()
        assert first.block.block_index == 0
        err = (await call.read()).error
        assert (err.code, err.origin) == (ErrorCode.INVALID_ARGUMENT, "stage0")
        assert "needs 405504 bytes, got 10" in err.message
        call.cancel()

        call, _ = await open_pipe(channel, "s-raw2", chain.route, b"", 5.0)
        await call.write(pb.StageMessage(block=block_to_proto("someone-else", block(0, lat))))
        err = (await call.read()).error
        assert err.code == ErrorCode.PROTOCOL and "someone-else" in err.message
        call.cancel()
    finally:
        await channel.close()
    await chain.wait_closed()


async def test_losing_a_hop_reports_unavailable_and_frees_the_rest(synthetic_chain: ChainFactory) -> None:
    chain = await synthetic_chain(3, hold_s=0.01)
    lat = latent(5)
    route = chain.route
    async with PipelineClient() as client:
        session = await client.open("s-lost", route)
        for i in range(3):
            await session.send(block(i, lat))
        assert (await session.receive()).block_index == 0
        await chain.hosts[1].stop(grace_s=0.1)  # the replica of stage1 goes away
        with pytest.raises(PipelineError) as err:
            while await session.receive() is not None:
                pass
    assert err.value.code == ErrorCode.UNAVAILABLE and err.value.origin == "stage0"
    assert route[1] in err.value.message
    await chain.wait_closed("s-lost")


async def test_background_host_runs_on_its_own_thread() -> None:
    from avatarserve.serve.dataplane.stage_host import BackgroundStageHost, StageHostConfig
    from tests.support.synthetic import SyntheticStage

    bg = BackgroundStageHost(lambda: SyntheticStage(0.0, name="bg"), StageHostConfig(name="bg"))
    address = await asyncio.to_thread(bg.start)
    try:
        assert bg.alive and address.startswith("127.0.0.1:")
        async with PipelineClient() as client:
            session = await client.open("s-bg", [address])
            items = await run_session(session, [block(i, latent(6)) for i in range(3)])
        assert [it.metadata["trace"] for it in items] == ["bg"] * 3
        for _ in range(100):  # the hop frees the session just after sending end-of-stream
            stats = await asyncio.to_thread(bg.stats)
            if stats["sessions_closed"]:
                break
            await asyncio.sleep(0.02)
        assert (stats["sessions_opened"], stats["sessions_closed"], stats["live_sessions"]) == (1, 1, 0)
    finally:
        await asyncio.to_thread(bg.stop)
    assert not bg.alive


async def test_background_host_serves_before_its_handler_is_loaded() -> None:
    """Starting has two phases: the server listens at once; the handler loads with no time limit, and until it is
    attached every Pipe is answered UNAVAILABLE (a loading replica is not a failed one)."""
    import threading

    from avatarserve.serve.dataplane.stage_host import BackgroundStageHost, StageHostConfig
    from tests.support.synthetic import SyntheticStage

    loading, release = threading.Event(), threading.Event()

    def slow_factory() -> SyntheticStage:
        loading.set()
        release.wait()  # stands for a model load of any length
        return SyntheticStage(0.0, name="slow")

    bg = BackgroundStageHost(slow_factory, StageHostConfig(name="slow"))
    address = await asyncio.to_thread(bg.start_server, 60.0)
    loader = asyncio.get_running_loop().run_in_executor(None, bg.load_handler)
    try:
        await asyncio.to_thread(loading.wait)
        assert bg.alive and not bg.loaded
        async with PipelineClient() as client:
            with pytest.raises(PipelineError) as err:
                await client.open("s-early", [address])
            assert err.value.code == ErrorCode.UNAVAILABLE and "still loading" in err.value.message
            release.set()
            await loader
            assert bg.loaded
            session = await client.open("s-late", [address])
            items = await run_session(session, [block(i, latent(6)) for i in range(2)])
        assert [it.metadata["trace"] for it in items] == ["slow"] * 2
    finally:
        release.set()
        await asyncio.to_thread(bg.stop)


async def test_a_session_reopens_while_a_hop_is_still_freeing_it() -> None:
    """The caller may see end-of-stream before every hop has freed the session: a new pipe for the same session
    waits for that instead of being refused as a duplicate."""
    from avatarserve.serve.dataplane.stage_host import StageHost, StageHostConfig
    from avatarserve.serve.dataplane.transport import TransportOptions
    from tests.support.synthetic import SyntheticStage

    class SlowClose(SyntheticStage):
        def __init__(self) -> None:
            super().__init__(0.0, name="slow-close")
            self.closing, self.gate = asyncio.Event(), asyncio.Event()

        async def close_session(self, session_id: str) -> None:
            self.closing.set()
            await self.gate.wait()
            await super().close_session(session_id)

    slow = SlowClose()
    hosts = [StageHost(SyntheticStage(0.0, name="first"), StageHostConfig(name="first")),
             StageHost(slow, StageHostConfig(name="slow-close"))]
    route = [await h.start() for h in hosts]
    try:
        async with PipelineClient() as client:
            session = await client.open("s-again", route)
            assert [it.block_index for it in await run_session(session, [block(0, latent(6))])] == [0]
            await slow.closing.wait()  # the caller saw end-of-stream; the last hop is still freeing the session
            reopen = asyncio.create_task(client.open("s-again", route))
            done, _ = await asyncio.wait({reopen}, timeout=1.0)
            assert not done, f"the reopen was answered before the hop freed the session: {reopen.result()!r}" \
                if not reopen.exception() else f"refused: {reopen.exception()}"
            slow.gate.set()
            again = await reopen
            assert [it.block_index for it in await run_session(again, [block(0, latent(6))])] == [0]
    finally:
        slow.gate.set()
        for h in hosts:
            await h.stop(grace_s=0.5)


async def test_a_fixed_port_range_gives_each_host_its_own_port() -> None:
    """Replicas sharing a node and a port range (NetworkPolicy clusters) each bind a different port; gRPC's default
    SO_REUSEPORT would let two servers share one and split its connections. A full range is a clear error."""
    from avatarserve.serve.dataplane.stage_host import StageHost, StageHostConfig
    from avatarserve.serve.dataplane.transport import TransportOptions
    from avatarserve.serve.dataplane.transport import StageError
    from tests.support.synthetic import SyntheticStage

    lo = free_port()
    hosts = []
    try:
        for i in range(2):
            h = StageHost(SyntheticStage(0.0, name=f"r{i}"),
                          StageHostConfig(name=f"r{i}", bind_host="127.0.0.1", port_range=(lo, lo + 1)))
            hosts.append(h)
            await h.start()
        ports = sorted(int(h.address.rsplit(":", 1)[1]) for h in hosts)
        assert ports == [lo, lo + 1]
        third = StageHost(SyntheticStage(0.0, name="r2"),
                          StageHostConfig(name="r2", bind_host="127.0.0.1", port_range=(lo, lo + 1)))
        with pytest.raises(StageError, match=rf"cannot bind 127\.0\.0\.1 on any port in {lo}-{lo + 1}"):
            await third.start()
    finally:
        for h in hosts:
            await h.stop()


async def test_a_caller_gone_while_the_handler_opens_leaves_no_stale_session() -> None:
    from avatarserve.serve.dataplane.stage_host import StageHost, StageHostConfig
    from avatarserve.serve.dataplane.transport import TransportOptions
    """open_session runs on (for model stages) an executor thread that a cancel does not stop: the hop waits for it
    and closes what it created, so the session can be opened again (no ALREADY_EXISTS)."""
    from tests.support.synthetic import SyntheticStage

    gate = asyncio.Event()
    entered = asyncio.Event()

    class SlowOpen(SyntheticStage):
        async def open_session(self, session_id: str, config: bytes) -> None:
            entered.set()
            await asyncio.shield(gate.wait())  # like an executor thread: not stopped by a cancel
            await super().open_session(session_id, config)

    handler = SlowOpen(0.0, name="slow")
    host = StageHost(handler, StageHostConfig(name="slow", transport=TransportOptions(queue_size=2, open_timeout_s=5.0)))
    await host.start()
    try:
        async with PipelineClient(TransportOptions(queue_size=2, open_timeout_s=30.0)) as client:
            opening = asyncio.create_task(client.open("s-slow", [host.address]))
            await asyncio.wait_for(entered.wait(), 30)
            opening.cancel()  # the caller goes away mid-open
            await asyncio.gather(opening, return_exceptions=True)
            gate.set()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while (handler.sessions or host.live_sessions) and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert not handler.sessions and host.live_sessions == 0
            pipe = await client.open("s-slow", [host.address])  # opens again, no stale session
            await pipe.send(BlockItem(0, {"latents": latent(0)}))
            await pipe.end()
            assert [item.block_index async for item in pipe] == [0]
    finally:
        await host.stop(grace_s=0.5)
