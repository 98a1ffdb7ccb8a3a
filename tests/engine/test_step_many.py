"""`StageRunner.step_many`: one step for the blocks of several sessions in one forward equals `step` per session
(float round-off), at every denoising step, through the adaptive-sink re-prefill; a refused block fails alone."""

import numpy as np
import pytest

from avatarserve.engine.errors import BlockOrderError, InvalidInput
from avatarserve.engine.runners import AudioEncoderRunner, DecoderRunner, StageRunner, adaptive_sink_latent

from .conftest import speech_like

TOL = 2e-5


def _runners(bundle):
    st = bundle.stream
    stages = [StageRunner(k, bundle.transformer, bundle.schedule, st) for k in range(st.num_steps)]
    return AudioEncoderRunner(bundle.audio, st), stages, DecoderRunner(bundle.vae, st, bundle.model_config.motion_frames)


def _sessions(bundle, audio_runner, stages, decoder, n, blocks, tag):
    """n sessions with their own faces, prompts and speech; -> {sid: [audio payloads]}."""
    rng = np.random.default_rng(7)
    st = bundle.stream
    out = {}
    for i in range(n):
        sid = f"{tag}{i}"
        face = (rng.random((st.height, st.width, 3)) * 255).astype(np.uint8)
        sink = decoder.prepare_sink(face, bundle.encode_prompt(["a person talking", "a woman speaking", "hi"][i % 3]),
                                    seed=i)
        audio_runner.create(sid)
        for stage in stages:
            stage.create(sid, sink)
        audio_runner.push(sid, speech_like(blocks * st.block_seconds + 0.1, seed=i))
        out[sid] = [audio_runner.next_block(sid) for _ in range(blocks)]
    return out


def test_batched_steps_equal_one_by_one_at_every_step(tiny_bundle):
    blocks, n = 3, 3
    audio_a, stages_a, dec_a = _runners(tiny_bundle)
    audio_b, stages_b, dec_b = _runners(tiny_bundle)
    one = _sessions(tiny_bundle, audio_a, stages_a, dec_a, n, blocks, "s")
    many = _sessions(tiny_bundle, audio_b, stages_b, dec_b, n, blocks, "s")
    worst = 0.0
    for b in range(blocks):
        alone = [one[sid][b] for sid in one]
        batch = [many[sid][b] for sid in many]
        for k, (sa, sb) in enumerate(zip(stages_a, stages_b)):
            alone = [sa.step(p) for p in alone]
            batch = sb.step_many(batch)
            for pa, pb in zip(alone, batch):
                assert not isinstance(pb, Exception), pb
                assert pb.steps_done == k + 1 and pb.block_index == b
                worst = max(worst, (pa.latents - pb.latents).abs().max().item())
            if b == 0 and sa.is_last:  # the adaptive sink: every stage re-prefills from block 1 on
                for sid, pa, pb in zip(one, alone, batch):
                    for s_a, s_b in zip(stages_a, stages_b):
                        s_a.set_aas_latent(sid, adaptive_sink_latent(tiny_bundle.stream, pa))
                        s_b.set_aas_latent(sid, adaptive_sink_latent(tiny_bundle.stream, pb))
    print(f"step_many vs step: max abs latent difference {worst:.3g}")
    assert worst <= TOL


def test_a_refused_block_fails_alone(tiny_bundle):
    audio, stages, dec = _runners(tiny_bundle)
    sess = _sessions(tiny_bundle, audio, stages, dec, 3, 2, "r")
    a, b, c = (sess[sid] for sid in sess)
    out_of_order = b[1]  # block 1 before block 0
    results = stages[0].step_many([a[0], out_of_order, c[0]])
    assert isinstance(results[1], BlockOrderError)
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
    # the refused session is untouched: its block 0 still goes through
    assert stages[0].step_many([b[0]])[0].block_index == 0
    with pytest.raises(InvalidInput, match="two blocks of one session"):
        stages[0].step_many([a[1], a[1]])
    assert stages[0].step(a[1]).block_index == 1  # and the refused batch changed nothing for the others


def test_sequential_pipeline_runs_sessions_in_lockstep_like_one_by_one(tiny_bundle):
    """`SequentialPipeline.run_blocks` (the bench's machine limit) gives each session what `run_block` gives it."""
    from avatarserve.engine.pipeline import SequentialPipeline

    def start(pipe, sid, seed):
        rng = np.random.default_rng(seed)
        st = pipe.stream
        face = (rng.random((st.height, st.width, 3)) * 255).astype(np.uint8)
        sink = pipe.decoder.prepare_sink(face, tiny_bundle.encode_prompt("a person talking"), seed)
        pipe.audio.create(sid)
        for stage in pipe.stages:
            stage.create(sid, sink)
        pipe.decoder.create(sid, sink)
        pipe.audio.push(sid, speech_like(6 * st.block_seconds + 0.1, seed=seed))

    alone, lockstep = SequentialPipeline(tiny_bundle), SequentialPipeline(tiny_bundle)
    sids = ["p0", "p1"]
    for i, sid in enumerate(sids):
        start(alone, sid, i)
        start(lockstep, sid, i)
    for _ in range(6):  # through the adaptive sink (blocks >= aas_after_blocks)
        expected = [alone.run_block(alone.audio.next_block(sid)) for sid in sids]
        got = lockstep.run_blocks([lockstep.audio.next_block(sid) for sid in sids])
        for e, g in zip(expected, got):
            assert g.block_index == e.block_index
            assert (g.latents - e.latents).abs().max().item() <= TOL
            assert np.abs(g.frames.astype(np.int16) - e.frames.astype(np.int16)).max() <= 1
