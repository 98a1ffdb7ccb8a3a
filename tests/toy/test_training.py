"""Training code of the embedded `toy` model: the pieces that must be exact, the smoke run, the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avatarserve.engine.bundle import build_bundle
from avatarserve.engine.pipeline import SequentialPipeline
from avatarserve.engine.sink import prepare_sink
from avatarserve.model.config import TINY, TOY
from avatarserve.model.logmel import LogMelFrontEnd
from avatarserve.model.sampler import FlowMatchSchedule
from avatarserve.model.transformer import CausalS2VTransformer, SinkInputs
from avatarserve.model.vae import tiny_vae
from avatarserve.toy import make_clip
from avatarserve.toy.train import TrainingError
from avatarserve.toy.train.data import Batch, DitData, encode_clips, sample_batch
from avatarserve.toy.train.dit import dmd_direction, rollout
from avatarserve.toy.train.recipe import FULL, Stage2Recipe

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "services" / "avatarserve" / "weights" / "toy"


def _tiny_batch(num_blocks: int, seed: int = 0) -> Batch:
    cfg, st = TINY.model, TINY.stream
    g = torch.Generator().manual_seed(seed)
    f, lh, lw = st.latent_frames_per_block, st.latent_height, st.latent_width
    return Batch(
        x0=torch.randn(1, 16, num_blocks * f, lh, lw, generator=g),
        audio=torch.randn(1, cfg.audio_num_layers, cfg.audio_dim, num_blocks * 4 * f, generator=g),
        reference=torch.randn(1, 16, 1, lh, lw, generator=g),
        motion=torch.randn(1, 16, cfg.motion_latent_frames, lh, lw, generator=g),
        text=torch.cat([torch.randn(1, 5, cfg.text_dim, generator=g), torch.zeros(1, cfg.text_len - 5, cfg.text_dim)], 1),
        first_block=0, sink_index=st.sink_base_index)


def test_timestep_forcing_rollout_equals_the_streaming_pipeline() -> None:
    """4 masked forwards with every frame at t_k == streaming block by block with one noisy KV cache per step."""
    cfg, st = TINY.model, TINY.stream
    model = CausalS2VTransformer(cfg).randomize_for_tests(3).eval()
    sched = FlowMatchSchedule.create(st.num_steps, st.shift)
    nb, f = 6, st.latent_frames_per_block  # more blocks than the 4-block window
    b = _tiny_batch(nb)
    noise = torch.randn(b.x0.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rolled = rollout(model, b, st, sched, noise, exit_step=sched.num_steps - 1, grad=False)
    caches = []
    for _ in range(sched.num_steps):
        c = model.new_cache(st.latent_height, st.latent_width, f, st.window_blocks)
        model.prefill_sink(c, SinkInputs(b.reference, b.motion), b.text)
        caches.append(c)
    streamed = []
    for blk in range(nb):
        x = noise[:, :, blk * f:(blk + 1) * f]
        audio = model.encode_audio(b.audio[..., blk * 4 * f:(blk + 1) * 4 * f], f)
        for k in range(sched.num_steps):
            v = model.forward_block(caches[k], x, torch.tensor([sched.timestep(k)]), audio, b.text, blk,
                                    st.sink_base_index)
            x = sched.step(k, x, v)
        streamed.append(x)
    assert (torch.cat(streamed, 2) - rolled).abs().max().item() < 1e-4


def test_rollout_gradient_flows_only_through_the_exit_step() -> None:
    cfg, st = TINY.model, TINY.stream
    model = CausalS2VTransformer(cfg).randomize_for_tests(4)
    sched = FlowMatchSchedule.create(st.num_steps, st.shift)
    b = _tiny_batch(2)
    x0 = rollout(model, b, st, sched, torch.randn(b.x0.shape), exit_step=2, grad=True)
    assert x0.requires_grad
    x0.square().mean().backward()
    assert model.head.head.weight.grad is not None and model.head.head.weight.grad.abs().sum() > 0


def test_dmd_direction_vanishes_when_fake_equals_real() -> None:
    cfg, st = TINY.model, TINY.stream
    model = CausalS2VTransformer(cfg).randomize_for_tests(5).eval()
    b = _tiny_batch(2)
    direction, gap = dmd_direction(model, model, b.x0, b, torch.Generator().manual_seed(0), st,
                                   Stage2Recipe(guidance=1.0))
    assert gap == 0.0 and direction.abs().max().item() == 0.0
    other = CausalS2VTransformer(cfg).randomize_for_tests(6).eval()
    direction, gap = dmd_direction(model, other, b.x0, b, torch.Generator().manual_seed(0), st,
                                   Stage2Recipe(guidance=2.0))
    assert gap > 0 and torch.isfinite(direction).all()


def test_encode_clips_gives_the_sink_latents_of_prepare_sink() -> None:
    vae = tiny_vae(0)
    clip = make_clip(7, 0.32)  # 8 frames
    ref, motion, lat = encode_clips(vae, clip.frames[None], clip.reference_image[None])
    sink = prepare_sink(vae, clip.reference_image, torch.zeros(1, 1, 32), 0, TOY.stream, TOY.model.motion_frames)
    assert torch.allclose(ref, sink.reference, atol=1e-5)
    assert torch.allclose(motion, sink.motion, atol=1e-5)
    assert lat.shape == (1, 16, 2, 8, 8)
    with pytest.raises(TrainingError):
        encode_clips(vae, clip.frames[None, :6], clip.reference_image[None])


def test_sample_batch_windows_and_rolling_rope_placement() -> None:
    n, t_lat, f = 3, 12, 3
    data = DitData(latents=torch.arange(n * 16 * t_lat * 4, dtype=torch.float32).view(n, 16, t_lat, 2, 2),
                   audio=torch.randn(n, 1, 8, 4 * t_lat), reference=torch.randn(n, 16, 1, 2, 2),
                   motion=torch.randn(n, 16, 19, 2, 2), texts=torch.randn(4, 16, 32))
    for seed in range(20):
        b = sample_batch(data, torch.Generator().manual_seed(seed), 5, 2, f, 0.5, 0.5, 0.3, 100)
        assert b.x0.shape == (5, 16, 6, 2, 2) and b.audio.shape == (5, 1, 8, 24)
        assert 0 <= b.first_block <= 100
        last = (b.first_block + 1) * f
        assert 30 + max(0, last - 26) <= b.sink_index <= 30 + max(0, last)  # d in [4, 30] ahead of the last block
        # windows are whole blocks of one clip, in order
        starts = b.x0[:, 0, :, 0, 0]
        assert torch.all(starts[:, 1:] - starts[:, :-1] == 4)
    with pytest.raises(TrainingError):
        sample_batch(data, torch.Generator(), 1, 5, f, 0, 0, 0, 0)


@pytest.mark.slow
def test_smoke_training_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_toy", ROOT / "scripts" / "train_toy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]) == 0
    log = (tmp_path / "work" / "train.log").read_text()
    for stage in ("vae step", "vae decoder step", "stage1 step", "stage2[dmd] step", "== export"):
        assert stage in log
    bundle = build_bundle("toy", checkpoint=str(tmp_path / "out"))
    assert isinstance(bundle.audio, LogMelFrontEnd) and bundle.transformer.config == TOY.model
    clip = make_clip(10**6, 0.48)
    blocks = SequentialPipeline(bundle).generate(clip.reference_image, clip.audio)
    assert len(blocks) == 1 and blocks[0].frames.shape == (12, 64, 64, 3)


def test_shipped_toy_weights_load_by_default() -> None:
    assert (SHIPPED / "config.json").is_file(), "the toy checkpoint must ship in the package"
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total < 16 * 2**20
    bundle = build_bundle("toy")
    assert isinstance(bundle.audio, LogMelFrontEnd)
    assert bundle.transformer.config == TOY.model
    assert bundle.vae.spatial_stride == 8 and bundle.vae.temporal_stride == 4
    meta = json.loads((SHIPPED / "train_recipe.json").read_text())
    assert meta["recipe"]["stage1"]["steps"] == FULL.stage1.steps
    # trained, not the zero-initialised head of a fresh model
    assert bundle.transformer.head.head.weight.abs().sum() > 0


def test_single_frame_conv_shortcut_equals_the_causal_conv3d() -> None:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    from avatarserve.toy.train.recipe import VaeRecipe
    from avatarserve.toy.train.vae import build_vae, single_frame_convs

    vae = build_vae(VaeRecipe(base_dim=4, decoder_base_dim=4))
    with torch.no_grad():  # non-zero past taps: the shortcut must not depend on the inflated init
        for m in vae.modules():
            if isinstance(m, WanCausalConv3d):
                m.weight.add_(0.01)
    x = torch.rand(2, 3, 1, 32, 32) * 2 - 1

    def run():
        vae.zero_grad()
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        y.square().mean().backward()
        return y.detach(), vae.encoder.conv_in.weight.grad.clone()

    y_ref, g_ref = run()
    original = WanCausalConv3d.forward
    with single_frame_convs():
        assert WanCausalConv3d.forward is not original
        y_fast, g_fast = run()
    assert WanCausalConv3d.forward is original
    assert torch.allclose(y_fast, y_ref, atol=1e-5) and torch.allclose(g_fast, g_ref, atol=1e-5)
    # Clips: the first frame (no cache yet) may take the shortcut, later frames with caches the normal path.
    clip = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        a = vae.decode(vae.encode(clip).latent_dist.mean).sample
        with single_frame_convs():
            b = vae.decode(vae.encode(clip).latent_dist.mean).sample
    assert torch.allclose(a, b, atol=1e-5)
