"""`forward_blocks`: the blocks of several sessions at one step in one forward, each over its own KV cache and at its
own block position, give what `forward_block` gives per session (float round-off), and leave every cache as the
one-by-one run leaves it."""

import pytest
import torch

from avatarserve.model.config import TINY
from avatarserve.model.rope import sink_temporal_index
from avatarserve.model.transformer import BlockRequest, CausalS2VTransformer, ModelInputError, SinkInputs

CFG = TINY.model
ST = TINY.stream
LH, LW = ST.latent_height, ST.latent_width
F = ST.latent_frames_per_block
WINDOW = 4
TOL = 2e-5  # fp32 round-off: batched matmuls sum in another order


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalS2VTransformer(CFG).randomize_for_tests(0).eval()


class _Session:
    """One session's inputs (its own reference, text of its own length, latents, audio) and cache."""

    def __init__(self, model, seed: int, text_len: int, blocks: int):
        g = torch.Generator().manual_seed(seed)
        self.sink = SinkInputs(torch.randn(1, 16, 1, LH, LW, generator=g), torch.randn(1, 16, 19, LH, LW, generator=g))
        self.context = torch.randn(1, text_len, CFG.text_dim, generator=g)
        self.latents = torch.randn(1, 16, blocks * F, LH, LW, generator=g)
        self.audio = torch.randn(1, CFG.audio_num_layers, CFG.audio_dim, blocks * 4 * F, generator=g)
        self.t = torch.rand(1, generator=g) * 1000  # one stage: one timestep for all its blocks
        self.cache = model.new_cache(LH, LW, F, WINDOW)
        model.prefill_sink(self.cache, self.sink, self.context)
        self.text = model.embed_text(self.context)

    def request(self, model, b: int, write: bool = True) -> BlockRequest:
        return BlockRequest(cache=self.cache, latents=self.latents[:, :, b * F:(b + 1) * F], timestep=self.t,
                            audio=model.encode_audio(self.audio[..., b * 4 * F:(b + 1) * 4 * F], F), text=self.text,
                            block_index=b, sink_index=sink_temporal_index(30, b * F, 10), write=write)

    def one(self, model, b: int, write: bool = True) -> torch.Tensor:
        r = self.request(model, b, write)
        return model.forward_block(r.cache, r.latents, r.timestep, r.audio, None, b, r.sink_index, write=write,
                                   text=r.text)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("text_lens", [(5, 5, 5), (5, 7, 3)], ids=["same-text-length", "text-lengths-differ"])
def test_batched_blocks_equal_one_by_one_and_leave_the_same_caches(model, text_lens):
    blocks = 9
    # Each session is at its own place in its stream when the batch starts: block 0, block 2, block 5 (its ring
    # has wrapped: window 4).
    starts = [0, 2, 5]
    alone = [_Session(model, 10 + i, n, blocks + 5) for i, n in enumerate(text_lens)]
    batched = [_Session(model, 10 + i, n, blocks + 5) for i, n in enumerate(text_lens)]
    for s_alone, s_batch, start in zip(alone, batched, starts):
        for b in range(start):
            s_alone.one(model, b)
            s_batch.one(model, b)
    worst = 0.0
    for k in range(blocks - 5):
        idx = [start + k for start in starts]
        expected = [s.one(model, b) for s, b in zip(alone, idx)]
        got = model.forward_blocks([s.request(model, b) for s, b in zip(batched, idx)])
        assert got.shape == (3, 16, F, LH, LW)
        for i in range(3):
            worst = max(worst, _max_diff(got[i:i + 1], expected[i]))
    print(f"batched vs one-by-one max abs diff: {worst:.3g}")
    assert worst <= TOL, worst
    for s_alone, s_batch in zip(alone, batched):
        assert s_batch.cache.blocks_written == s_alone.cache.blocks_written
        for la, lb in zip(s_alone.cache.layers, s_batch.cache.layers):
            assert _max_diff(la.k, lb.k) <= TOL and _max_diff(la.v, lb.v) <= TOL


def test_a_read_only_row_leaves_its_cache_untouched_while_the_others_write(model):
    a, b = _Session(model, 1, 5, 4), _Session(model, 2, 5, 4)
    a.one(model, 0)
    b.one(model, 0)
    before = [layer.k.clone() for layer in a.cache.layers]
    expected_b = _Session(model, 2, 5, 4)
    expected_b.one(model, 0)
    want_b = expected_b.one(model, 1)
    want_a = a.one(model, 1, write=False)
    got = model.forward_blocks([a.request(model, 1, write=False), b.request(model, 1)])
    assert _max_diff(got[:1], want_a) <= TOL and _max_diff(got[1:], want_b) <= TOL
    assert a.cache.blocks_written == 1 and b.cache.blocks_written == 2
    assert all(torch.equal(k, layer.k) for k, layer in zip(before, a.cache.layers))


def test_bad_batches_are_refused_with_a_model_input_error(model):
    a, b = _Session(model, 1, 5, 2), _Session(model, 2, 5, 2)
    with pytest.raises(ModelInputError, match="at least one"):
        model.forward_blocks([])
    with pytest.raises(ModelInputError, match="share a KV cache"):
        model.forward_blocks([a.request(model, 0), a.request(model, 0)])
    other = a.request(model, 0)
    other.latents = torch.randn(1, 16, F, LH, LW + 2)
    with pytest.raises(ModelInputError, match="one shape"):
        model.forward_blocks([other, b.request(model, 0)])
    two = b.request(model, 0)
    two.latents = torch.randn(2, 16, F, LH, LW)
    with pytest.raises(ModelInputError, match=r"\[1, 16, F, h, w\]"):
        model.forward_blocks([two])
    # nothing was written by the refused batches
    assert a.cache.blocks_written == 0 and b.cache.blocks_written == 0
