"""Closing a session frees what it held: 100 sessions opened, stepped and closed leave no per-session object alive at
any runner, and the process's resident memory returns to its level after the first sessions (allocator pools stay,
sessions do not accumulate)."""

import gc
import os
import weakref

import numpy as np
import psutil

from avatarserve.engine.pipeline import SequentialPipeline

from .conftest import speech_like

SESSIONS = 100
WARM = 5  # sessions before the baseline: allocator pools and caches reach their working size
MAX_GROWTH_BYTES = 16 * 1024 * 1024  # vs one tiny session's KV caches (4 x 178 kB): a leak of 100 would show


def _one_session(pipe: SequentialPipeline, sid: str, seed: int, refs: list) -> None:
    st = pipe.stream
    rng = np.random.default_rng(seed)
    face = (rng.random((st.height, st.width, 3)) * 255).astype(np.uint8)
    sink = pipe.decoder.prepare_sink(face, pipe.bundle.encode_prompt("a person talking"), seed)
    pipe.audio.create(sid)
    for stage in pipe.stages:
        stage.create(sid, sink)
        refs.append(weakref.ref(stage.sessions.get(sid).cache))
    pipe.decoder.create(sid, sink)
    refs.append(weakref.ref(pipe.decoder.sessions.get(sid)))
    pipe.audio.push(sid, speech_like(st.block_seconds, seed=seed))  # one block: every cache written
    while (payload := pipe.audio.next_block(sid)) is not None:
        pipe.run_block(payload)
    for runner in (pipe.audio, *pipe.stages, pipe.decoder):
        runner.close(sid)


def test_open_and_close_100_sessions_frees_their_state(tiny_bundle):
    pipe = SequentialPipeline(tiny_bundle)
    proc = psutil.Process(os.getpid())
    refs: list = []
    for i in range(WARM):
        _one_session(pipe, f"warm-{i}", i, refs)
    gc.collect()
    baseline = proc.memory_info().rss
    for i in range(SESSIONS):
        _one_session(pipe, f"s-{i}", 1000 + i, refs)
    gc.collect()
    growth = proc.memory_info().rss - baseline
    alive = sum(1 for r in refs if r() is not None)
    print(f"{SESSIONS} sessions: RSS {baseline / 2**20:.1f} MiB -> {(baseline + growth) / 2**20:.1f} MiB, "
          f"per-session objects alive {alive} of {len(refs)}")
    assert alive == 0
    assert all(len(r.sessions) == 0 for r in (pipe.audio, *pipe.stages, pipe.decoder))
    assert growth <= MAX_GROWTH_BYTES, growth
