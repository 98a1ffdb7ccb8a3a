"""A denoise stage replica's handler batches the blocks of different sessions that meet in its queue into one
forward, and hands each session its own result (real handler, real tiny model, real redis-server for the sinks)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from avatarserve.engine.bundle import build_bundle
from avatarserve.engine.runners import AudioEncoderRunner, DecoderRunner, StageRunner
from avatarserve.serve.config import RedisTimeouts
from avatarserve.serve.control.session_store import SessionStore
from avatarserve.serve.dataplane.handlers import DenoiseStageHandler, block_deadline
from avatarserve.serve.dataplane.transport import DEADLINE_KEY, BlockItem

SESSIONS = 3
TOL = 2e-5
WAIT_S = 120.0


def _config(redis_url: str, max_batch: int) -> dict:
    return {"name": "DenoiseStage0", "model": {"config": "tiny", "seed": 0}, "redis_url": redis_url,
            "namespace": "hbatch:", "session_ttl_s": 60.0, "redis": RedisTimeouts().model_dump(),
            "torch_threads": 1, "step": 0, "aas_wait_s": 5.0, "max_batch": max_batch, "utilization": 0.9,
            "batch_linger_s": 0.0}


async def test_blocks_of_different_sessions_share_one_forward_and_each_gets_its_own_result(redis_server):
    torch.set_num_threads(1)
    bundle = build_bundle("tiny", seed=0)
    st = bundle.stream
    audio = AudioEncoderRunner(bundle.audio, st)
    decoder = DecoderRunner(bundle.vae, st, bundle.model_config.motion_frames)
    reference = StageRunner(0, bundle.transformer, bundle.schedule, st)
    rng = np.random.default_rng(3)
    handler = DenoiseStageHandler(_config(redis_server.url, max_batch=4))
    store = SessionStore.from_url(redis_server.url, namespace="hbatch:", ttl_s=60.0)
    try:
        items, expected = {}, {}
        for i in range(SESSIONS):
            sid = f"hb-{i}-{time.monotonic_ns()}"
            face = (rng.random((st.height, st.width, 3)) * 255).astype(np.uint8)
            sink = decoder.prepare_sink(face, bundle.encode_prompt(f"person {i}"), seed=i)
            await store.create_session(sid, sink, width=st.width, height=st.height)
            await handler.open_session(sid, b"{}")
            audio.create(sid)
            audio.push(sid, (0.2 * rng.standard_normal(st.samples_per_block)).astype(np.float32))
            payload = audio.next_block(sid)
            reference.create(sid, sink)
            expected[sid] = reference.step(payload).latents
            # later sessions are due first: the batch runs in deadline order
            items[sid] = BlockItem(block_index=0, pts_ms=0, tensors={"audio": payload.audio.numpy()},
                                   metadata={DEADLINE_KEY: str(int((time.time() + 10 - i) * 1000))})

        # Hold the compute thread while the three blocks arrive, so they meet in the queue.
        release, holding = threading.Event(), threading.Event()
        handler.scheduler.call(lambda: (holding.set(), release.wait(WAIT_S)))
        assert await asyncio.to_thread(holding.wait, WAIT_S)
        tasks = {sid: asyncio.ensure_future(handler.process(sid, item)) for sid, item in items.items()}
        while handler.scheduler.queued() < SESSIONS and not any(t.done() for t in tasks.values()):
            await asyncio.sleep(0.01)  # the handlers' submissions reach the queue (no compute runs meanwhile)
        release.set()
        results = {sid: await asyncio.wait_for(task, WAIT_S) for sid, task in tasks.items()}

        assert set(handler.scheduler.costs.snapshot()) == {SESSIONS}  # one forward of three blocks
        for sid, out in results.items():
            latents = out[0].tensor("latents").torch()
            assert (latents - expected[sid]).abs().max().item() <= TOL, sid
        # each session's own: no two results equal
        got = [results[sid][0].tensor("latents").torch() for sid in items]
        assert all((got[i] - got[j]).abs().max().item() > 1e-3 for i in range(SESSIONS) for j in range(i + 1, SESSIONS))
        assert handler.realtime_capacity() is not None
    finally:
        handler.shutdown()
        await store.close()


def test_block_deadline_reads_the_gateway_stamp_and_falls_back_to_now():
    stamped = BlockItem(block_index=0, pts_ms=0, tensors={}, metadata={DEADLINE_KEY: "1700000000123"})
    assert block_deadline(stamped) == pytest.approx(1700000000.123)
    for bad in ({}, {DEADLINE_KEY: "soon"}, {DEADLINE_KEY: "nan"}, {DEADLINE_KEY: "inf"}):
        t0 = time.time()
        assert t0 <= block_deadline(BlockItem(block_index=0, pts_ms=0, tensors={}, metadata=bad)) <= time.time()


@pytest.mark.parametrize("kind", ["audio", "denoise0", "denoise_last", "vae"])
def test_a_replica_measures_its_costs_on_synthetic_sessions_before_any_real_one(kind, redis_server):
    """What `scheduling.admit_by: measured` starts from: the stage's batch timed at 1 and max_batch sessions, and no
    synthetic session left behind."""
    from avatarserve.serve.dataplane.handlers import AudioEncoderHandler, VaeDecoderHandler

    torch.set_num_threads(1)
    config = _config(redis_server.url, max_batch=3)
    if kind == "audio":
        handler = AudioEncoderHandler({**config, "name": "AudioEncoder", "step": None})
    elif kind == "vae":
        handler = VaeDecoderHandler({**config, "name": "VaeDecoder", "step": None})
    else:
        last = build_bundle("tiny", seed=0).stream.num_steps - 1
        handler = DenoiseStageHandler({**config, "step": 0 if kind == "denoise0" else last})
    try:
        assert handler.realtime_capacity() is None
        handler.measure_costs()
        costs = handler.scheduler.costs.snapshot()
        assert set(costs) == {1, 3} and all(c["count"] == 1 and c["seconds"] > 0 for c in costs.values()), costs
        assert handler.realtime_capacity() is not None
        assert len(handler.runner.sessions) == 0 and handler.live_sessions() == 0
        assert handler.scheduler.blocks_done == 0  # not counted as served blocks (nor their deadlines)
    finally:
        handler.shutdown()
