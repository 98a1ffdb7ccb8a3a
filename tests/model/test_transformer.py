"""Behaviour of the causal S2V transformer on the tiny config (fp32, CPU, milliseconds)."""

import math

import pytest
import torch

from avatarserve.model.config import LIVEAVATAR_14B, TINY, ConfigError, StreamConfig
from avatarserve.model.kv_cache import CacheError, KVCache
from avatarserve.model.rope import RotaryEmbedding, apply_rotary, motion_grids, noisy_grid, sink_temporal_index
from avatarserve.model.transformer import CausalS2VTransformer, ModelInputError, SinkInputs

CFG = TINY.model
ST = TINY.stream
LH, LW = ST.latent_height, ST.latent_width
F = ST.latent_frames_per_block


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalS2VTransformer(CFG).randomize_for_tests(0).eval()


def _inputs(num_blocks, seed=1):
    g = torch.Generator().manual_seed(seed)
    sink = SinkInputs(torch.randn(1, 16, 1, LH, LW, generator=g), torch.randn(1, 16, 19, LH, LW, generator=g))
    ctx = torch.randn(1, 5, CFG.text_dim, generator=g)
    lat = torch.randn(1, 16, num_blocks * F, LH, LW, generator=g)
    t = torch.rand(1, num_blocks * F, generator=g) * 1000
    aud = torch.randn(1, CFG.audio_num_layers, CFG.audio_dim, num_blocks * 4 * F, generator=g)
    return sink, ctx, lat, t, aud


def _stream(model, cache, sink, ctx, lat, t, aud, write=True, sink_index=30):
    outs = []
    for b in range(lat.shape[2] // F):
        a = model.encode_audio(aud[..., b * 4 * F:(b + 1) * 4 * F], F)
        outs.append(model.forward_block(cache, lat[:, :, b * F:(b + 1) * F], t[:, b * F:(b + 1) * F], a, ctx, b,
                                        sink_index, write=write))
    return torch.cat(outs, dim=2)


def test_cached_blocks_equal_block_causal_masked_forward(model):
    nb, window = 7, 4  # more blocks than the window: exercises ring eviction
    sink, ctx, lat, t, aud = _inputs(nb)
    cache = model.new_cache(LH, LW, F, window)
    model.prefill_sink(cache, sink, ctx)
    cached = _stream(model, cache, sink, ctx, lat, t, aud)
    with torch.no_grad():
        full = model.forward_masked(lat, t, aud, ctx, sink, F, window_blocks=window)
    assert cached.shape == lat.shape
    assert (cached - full).abs().max().item() <= 1e-5
    # and the window matters: without it the last blocks differ
    with torch.no_grad():
        unwindowed = model.forward_masked(lat, t, aud, ctx, sink, F, window_blocks=None)
    assert (unwindowed[:, :, -F:] - full[:, :, -F:]).abs().max().item() > 1e-4


def test_read_only_forward_matches_and_leaves_cache_untouched(model):
    sink, ctx, lat, t, aud = _inputs(6, seed=2)
    cache = model.new_cache(LH, LW, F, 4)
    model.prefill_sink(cache, sink, ctx)
    _stream(model, cache, sink, ctx, lat[:, :, :5 * F], t[:, :5 * F], aud[..., :5 * 4 * F])
    snapshot = [(l.k.clone(), l.v.clone()) for l in cache.layers]
    a = model.encode_audio(aud[..., 5 * 4 * F:], F)
    ro = model.forward_block(cache, lat[:, :, 5 * F:], t[:, 5 * F:], a, ctx, 5, 30, write=False)
    for (k, v), layer in zip(snapshot, cache.layers):
        assert torch.equal(k, layer.k) and torch.equal(v, layer.v)
    assert cache.blocks_written == 5
    rw = model.forward_block(cache, lat[:, :, 5 * F:], t[:, 5 * F:], a, ctx, 5, 30, write=True)
    assert (ro - rw).abs().max().item() <= 1e-6


def test_cache_memory_constant_over_1000_blocks(model):
    sink, ctx, lat, t, aud = _inputs(1, seed=3)
    cache = model.new_cache(LH, LW, F, 4)
    model.prefill_sink(cache, sink, ctx)
    ptrs = [(l.k.data_ptr(), l.v.data_ptr(), l.cond_k.data_ptr()) for l in cache.layers]
    nbytes = cache.nbytes()
    a = model.encode_audio(aud, F)
    text = model.embed_text(ctx)
    for b in range(1000):
        model.forward_block(cache, lat, t, a, ctx, b, sink_temporal_index(30, b * F, 10), text=text)
    assert cache.nbytes() == nbytes
    assert [(l.k.data_ptr(), l.v.data_ptr(), l.cond_k.data_ptr()) for l in cache.layers] == ptrs
    assert cache.blocks_written == 1000
    assert cache.nbytes() == KVCache.bytes_for(num_layers=CFG.num_layers, num_heads=CFG.num_heads,
                                               head_dim=CFG.head_dim, block_tokens=F * 16, window_blocks=4,
                                               cond_tokens=model.sink_token_count(LH, LW), dtype=torch.float32)


def test_block_order_and_sink_are_enforced(model):
    sink, ctx, lat, t, aud = _inputs(1, seed=4)
    cache = model.new_cache(LH, LW, F, 4)
    a = model.encode_audio(aud, F)
    with pytest.raises(CacheError, match="prefill"):
        model.forward_block(cache, lat, t, a, ctx, 0, 30)
    model.prefill_sink(cache, sink, ctx)
    with pytest.raises(CacheError, match="skips ahead"):
        model.forward_block(cache, lat, t, a, ctx, 3, 30)


@pytest.mark.parametrize("bad", [
    torch.zeros(1, 15, 3, 8, 8),  # channels
    torch.zeros(1, 16, 3, 8),  # rank
    torch.full((1, 16, 3, 8, 8), float("nan")),
])
def test_bad_latents_rejected(model, bad):
    sink, ctx, _, t, aud = _inputs(1, seed=5)
    cache = model.new_cache(LH, LW, F, 4)
    model.prefill_sink(cache, sink, ctx)
    with pytest.raises(ModelInputError):
        model.forward_block(cache, bad, t, model.encode_audio(aud, F), ctx, 0, 30)


def test_bad_audio_and_text_rejected(model):
    with pytest.raises(ModelInputError, match="audio features"):
        model.encode_audio(torch.zeros(1, 2, CFG.audio_dim, 12), F)
    with pytest.raises(ModelInputError, match="NaN"):
        model.encode_audio(torch.full((1, CFG.audio_num_layers, CFG.audio_dim, 12), float("nan")), F)
    with pytest.raises(ModelInputError, match="text_len"):
        model.embed_text(torch.zeros(1, CFG.text_len + 1, CFG.text_dim))


def test_audio_tokens_are_per_latent_frame_and_causal(model):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, CFG.audio_num_layers, CFG.audio_dim, 12, generator=g)
    tok = model.encode_audio(feats, F)
    assert tok.local.shape == (1, F, CFG.num_audio_token + 1, CFG.dim)
    assert tok.global_.shape == (1, F, 1, CFG.dim)
    changed = feats.clone()
    changed[..., 8:] += 1.0  # touch only the last latent frame's audio
    tok2 = model.encode_audio(changed, F)
    assert torch.equal(tok.local[:, :2], tok2.local[:, :2])  # earlier frames cannot see later audio
    assert not torch.equal(tok.local[:, 2], tok2.local[:, 2])


def test_audio_injection_changes_only_noisy_tokens_output(model):
    # Different audio for the same block must change the velocity (the audio path is live).
    sink, ctx, lat, t, aud = _inputs(1, seed=6)
    outs = []
    for scale in (1.0, -1.0):
        cache = model.new_cache(LH, LW, F, 4)
        model.prefill_sink(cache, sink, ctx)
        outs.append(model.forward_block(cache, lat, t, model.encode_audio(aud * scale, F), ctx, 0, 30))
    assert (outs[0] - outs[1]).abs().max().item() > 1e-4


def test_rolling_rope_sink_index():
    # 30 + max(0, f - (30 - d))
    assert sink_temporal_index(30, 0, 10) == 30
    assert sink_temporal_index(30, 20, 10) == 30
    assert sink_temporal_index(30, 21, 10) == 31
    assert sink_temporal_index(30, 300, 10) == 310  # d frames ahead of the block
    assert sink_temporal_index(30, 300, 4) == 304
    assert sink_temporal_index(30, 3, 30) == 33


def test_motion_token_grids_match_upstream_layout():
    post, x2, x4 = motion_grids((1, 2, 16), 48, 88)
    assert post.t == (-1,) and post.num_tokens == 1056
    assert x2.t == (-3,) and x2.num_tokens == 264
    assert x4.t == (-19, -14, -9, -4) and x4.num_tokens == 264
    assert x2.h == tuple(int(v) for v in __import__("numpy").linspace(0, 23, 12).astype(int))
    m = None
    with torch.device("meta"):
        m = CausalS2VTransformer(LIVEAVATAR_14B.model)
    assert m.sink_token_count(48, 88) == 2640  # upstream's "2640" at 704x384


def test_rope_positions_do_not_wrap_and_stay_relative():
    rope = RotaryEmbedding(128)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 128, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 128, generator=g, dtype=torch.float64)

    def score(pq, pk):
        fq = rope.freqs([noisy_grid(pq, 1, 1, 1)])
        fk = rope.freqs([noisy_grid(pk, 1, 1, 1)])
        return (apply_rotary(q, fq) * apply_rotary(k, fk)).sum().item()

    base = score(5, 0)
    # upstream's 45,000-entry table wraps after ~2 h; 10^7 latent frames is ~18 days at 6.25 latent fps
    for p in (45_000, 45_000 * 7 + 13, 10_000_000):
        assert math.isclose(score(p + 5, p), base, rel_tol=0, abs_tol=1e-6)
    assert not torch.allclose(rope.freqs([noisy_grid(45_000, 1, 1, 1)]), rope.freqs([noisy_grid(0, 1, 1, 1)]))


def test_resolution_is_free_within_token_budget():
    st = StreamConfig(height=720, width=1280, max_tokens_per_frame=4096)  # upstream crashes here (issue #14)
    assert st.tokens_per_frame == 45 * 80
    with torch.device("meta"):
        m = CausalS2VTransformer(LIVEAVATAR_14B.model)
    assert m.sink_token_count(st.latent_height, st.latent_width) > 3000
    with pytest.raises(ConfigError, match="budget"):
        StreamConfig(height=720, width=1280, max_tokens_per_frame=3000)
    with pytest.raises(ConfigError, match="multiples of 16"):
        StreamConfig(height=100, width=64)


def test_bf16_forward_runs_and_tracks_fp32(model):
    import copy

    sink, ctx, lat, t, aud = _inputs(2, seed=7)
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    outs = []
    for m in (model, m16):
        cache = m.new_cache(LH, LW, F, 4)
        m.prefill_sink(cache, sink, ctx)
        outs.append(_stream(m, cache, sink, ctx, lat, t, aud).float())
    assert outs[1].dtype == torch.float32 and torch.isfinite(outs[1]).all()
    rel = (outs[0] - outs[1]).norm() / outs[0].norm()
    assert rel < 0.05
