"""StreamingVAE: bit-exact streaming decode, per-session state isolation, encode, loading."""

from __future__ import annotations

import copy
import inspect
import threading
from typing import Dict, List

import pytest
import torch

import diffusers
from diffusers.models.autoencoders import autoencoder_kl_wan as wan_vae_module

from avatarserve.model.config import TINY, StreamConfig
from avatarserve.model.vae import (
    PINNED_DIFFUSERS_VERSION,
    WAN21_LATENTS_MEAN,
    StreamingVAE,
    VaeCheckpointError,
    VaeDecodeState,
    VaeShapeError,
    VaeStateError,
    check_diffusers_compatibility,
    convert_original_vae_state_dict,
    tiny_vae,
)


@pytest.fixture(scope="module")
def vae() -> StreamingVAE:
    return tiny_vae(seed=0)


def _latents(n: int, seed: int, h: int = 8, w: int = 8, b: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, n, h, w, generator=g)


# ---- pin guard --------------------------------------------------------------------------------------


def test_pin_guard_private_internals_unchanged() -> None:
    """Fails loudly when a diffusers upgrade changes what StreamingVAE drives (see model/vae.py)."""
    assert diffusers.__version__ == PINNED_DIFFUSERS_VERSION
    check_diffusers_compatibility()
    params = tuple(inspect.signature(wan_vae_module.WanDecoder3d.forward).parameters)
    assert params == ("self", "x", "feat_cache", "feat_idx", "first_chunk")
    assert tuple(inspect.signature(wan_vae_module.WanEncoder3d.forward).parameters) == (
        "self", "x", "feat_cache", "feat_idx")
    assert wan_vae_module.CACHE_T == 2
    model = tiny_vae().vae
    for attr in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        assert isinstance(getattr(model, attr), torch.nn.Module), attr
    # The reason this module exists: public decode() restarts causality on every call.
    z = _latents(7, seed=1)
    chunks = [model.decode(z[:, :, a:b]).sample for a, b in ((0, 1), (1, 4), (4, 7))]
    assert sum(c.shape[2] for c in chunks) == 19  # not 25


def test_geometry_matches_stream_config(vae: StreamingVAE) -> None:
    cfg: StreamConfig = TINY.stream
    assert vae.latent_channels == 16
    assert vae.temporal_stride == cfg.vae_temporal_stride == 4
    assert vae.spatial_stride == cfg.vae_spatial_stride == 8
    assert vae.num_output_frames(3, first_chunk=True) == 9
    assert vae.num_output_frames(3, first_chunk=False) == cfg.frames_per_block == 12


# ---- streaming decode -------------------------------------------------------------------------------


def test_stream_chunks_equal_full_decode_bit_exact(vae: StreamingVAE) -> None:
    z = _latents(7, seed=2)
    full = vae.decode_full(z)
    assert full.shape == (1, 3, 25, 64, 64)
    # decode_full is the public decode of the de-normalized latents
    assert torch.equal(full, vae.vae.decode(vae.denormalize(z)).sample)
    state = vae.new_decode_state()
    outs = [vae.decode_stream(state, z[:, :, a:b]) for a, b in ((0, 1), (1, 4), (4, 7))]
    assert [o.shape[2] for o in outs] == [1, 12, 12]
    assert torch.equal(torch.cat(outs, dim=2), full)
    assert state.latent_frames == 7 and state.started


def test_first_block_frame_counts(vae: StreamingVAE) -> None:
    state = vae.new_decode_state()
    assert vae.decode_stream(state, _latents(3, seed=3)).shape[2] == 9  # 1 + 4*(3-1)
    assert vae.decode_stream(state, _latents(3, seed=4)).shape[2] == 12
    state.reset()
    assert not state.started
    assert vae.decode_stream(state, _latents(3, seed=5)).shape[2] == 9


def test_interleaved_sessions_do_not_interfere(vae: StreamingVAE) -> None:
    za, zb = _latents(6, seed=6), _latents(6, seed=7)
    alone_a, alone_b = vae.decode_full(za), vae.decode_full(zb)
    sa, sb = vae.new_decode_state(), vae.new_decode_state()
    outs_a: List[torch.Tensor] = []
    outs_b: List[torch.Tensor] = []
    for a, b in ((0, 3), (3, 6)):
        outs_a.append(vae.decode_stream(sa, za[:, :, a:b]))
        outs_b.append(vae.decode_stream(sb, zb[:, :, a:b]))
        vae.vae.decode(vae.denormalize(zb[:, :, :2]))  # public API in between must not matter either
    assert torch.equal(torch.cat(outs_a, 2), alone_a)
    assert torch.equal(torch.cat(outs_b, 2), alone_b)


def test_sessions_on_threads_match_sequential(vae: StreamingVAE) -> None:
    zs = [_latents(6, seed=10 + i) for i in range(3)]
    expected = [vae.decode_full(z) for z in zs]
    results: Dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        st = vae.new_decode_state()
        results[i] = torch.cat([vae.decode_stream(st, zs[i][:, :, a:b]) for a, b in ((0, 3), (3, 6))], 2)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        assert torch.equal(results[i], expected[i])


def test_batched_stream_equals_per_sample(vae: StreamingVAE) -> None:
    z = torch.cat([_latents(4, seed=20), _latents(4, seed=21)], dim=0)
    both = vae.decode_full(z)
    for i in range(2):
        assert torch.allclose(both[i: i + 1], vae.decode_full(z[i: i + 1]), atol=1e-5)


def test_streams_decoded_together_equal_each_alone_and_go_on_alone(vae: StreamingVAE) -> None:
    """decode_stream_many joins streams under way into one batch (a fresh stream, or one of another size, goes
    alone) and splits their caches back: each stream's frames equal its own decode up to float round-off, also
    when it goes on alone afterwards."""
    zs = [_latents(9, seed=30 + i) for i in range(3)] + [_latents(9, seed=33, h=12, w=8)]
    expected = [vae.decode_full(z) for z in zs]
    states = [vae.new_decode_state() for _ in zs]
    got: List[List[torch.Tensor]] = [[] for _ in zs]
    late = 2  # stream 2 starts one chunk later: fresh while the others are under way
    batches: List[int] = []  # rows of each decoder call
    hook = vae.vae.decoder.register_forward_pre_hook(lambda _m, args, kwargs: batches.append(args[0].shape[0]),
                                                     with_kwargs=True)
    try:
        for c, (a, b) in enumerate(((0, 3), (3, 6), (6, 9))):
            members = [i for i in range(len(zs)) if not (i == late and c == 0)]
            outs = vae.decode_stream_many([states[i] for i in members], [zs[i][:, :, a:b] for i in members])
            for i, out in zip(members, outs):
                got[i].append(out)
    finally:
        hook.remove()
    # per latent frame: chunk 0: 0, 1, 3 alone (fresh); chunk 1: 0+1 joined, 2 (fresh) and 3 (other size) alone;
    # chunk 2: 0+1+2 joined, 3 alone
    assert sorted(batches) == [1] * (3 * 3 + 2 * 3 + 1 * 3) + [2] * 3 + [3] * 3, batches
    got[late].append(vae.decode_stream(states[late], _latents(3, seed=99)))  # goes on alone
    first = vae.decode_full(zs[late][:, :, 3:9])
    for i in (0, 1, 3):
        assert torch.allclose(torch.cat(got[i], 2), expected[i], atol=1e-5), i
    assert torch.allclose(torch.cat(got[late][:2], 2), first, atol=1e-5)
    assert all(t.shape[0] == 1 for t in states[0].feat_cache if isinstance(t, torch.Tensor))
    with pytest.raises(VaeStateError, match="twice"):
        vae.decode_stream_many([states[0], states[0]], [zs[0][:, :, :1], zs[0][:, :, :1]])
    with pytest.raises(VaeShapeError, match="2 streams but 1"):
        vae.decode_stream_many(states[:2], zs[:1])


def test_decode_rejects_bad_inputs(vae: StreamingVAE) -> None:
    state = vae.new_decode_state()
    with pytest.raises(VaeShapeError, match="latents must be"):
        vae.decode_stream(state, torch.zeros(1, 16, 8, 8))
    with pytest.raises(VaeShapeError, match="16"):
        vae.decode_stream(state, torch.zeros(1, 4, 1, 8, 8))
    with pytest.raises(VaeShapeError, match="NaN"):
        vae.decode_stream(state, torch.full((1, 16, 1, 8, 8), float("nan")))
    with pytest.raises(VaeShapeError, match="float"):
        vae.decode_stream(state, torch.zeros(1, 16, 1, 8, 8, dtype=torch.int64))
    assert not state.started  # rejected input left the stream untouched
    vae.decode_stream(state, _latents(1, seed=30))
    with pytest.raises(VaeStateError, match="latent size"):
        vae.decode_stream(state, _latents(1, seed=31, h=4, w=4))
    with pytest.raises(VaeStateError, match="batch"):
        vae.decode_stream(state, _latents(1, seed=32, b=2))
    other = tiny_vae(seed=1)
    with pytest.raises(VaeStateError, match="different StreamingVAE"):
        other.decode_stream(state, _latents(1, seed=33))
    with pytest.raises(VaeStateError):
        vae.decode_stream("not a state", _latents(1, seed=34))  # type: ignore[arg-type]
    assert isinstance(vae.new_decode_state(), VaeDecodeState)


# ---- encode -----------------------------------------------------------------------------------------


def test_encode_shapes_and_parity_with_diffusers(vae: StreamingVAE) -> None:
    g = torch.Generator().manual_seed(40)
    image = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1
    z_img = vae.encode_image(image)
    assert z_img.shape == (2, 16, 1, 8, 6)
    video = torch.rand(1, 3, 13, 32, 32, generator=g) * 2 - 1
    z_vid = vae.encode_video(video)
    assert z_vid.shape == (1, 16, 4, 4, 4)
    ref = vae.vae.encode(video).latent_dist.mean  # posterior mean through the public API
    assert torch.equal(z_vid, vae.normalize(ref))
    # motion latents upstream-style: 73 copies of the reference -> 19 latents
    motion = vae.encode_video(image[:1].unsqueeze(2).expand(1, 3, 73, 64, 48).contiguous())
    assert motion.shape == (1, 16, 19, 8, 6)


def test_cpu_replacements_equal_diffusers_modules_and_one_session_avoids_the_slow_conv(vae: StreamingVAE) -> None:
    """On CPU, StreamingVAE swaps in a faster RMS norm and makes every spatial conv take oneDNN (PyTorch's heuristic
    sends batch-1 convs of these shapes to its reference kernel, 5-6x slower). Same outputs up to float round-off."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm
    from torch.profiler import ProfilerActivity, profile

    from avatarserve.model.vae import _CausalConv3dOneDNN, _RMSNormBySumOfSquares

    swapped = {type(m) for m in vae.vae.modules()}
    assert _CausalConv3dOneDNN in swapped and _RMSNormBySumOfSquares in swapped
    assert WanCausalConv3d not in swapped and WanRMS_norm not in swapped
    plain = copy.deepcopy(vae.vae)
    for m in plain.modules():  # diffusers' own classes again
        if isinstance(m, _CausalConv3dOneDNN):
            m.__class__ = WanCausalConv3d
        elif isinstance(m, _RMSNormBySumOfSquares):
            m.__class__ = WanRMS_norm
    z = _latents(3, seed=41)
    with torch.no_grad():
        ours, theirs = vae.vae.decode(z).sample, plain.decode(z).sample
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        vae.decode_stream(vae.new_decode_state(), z[:, :, :2])
    slow = [e.input_shapes[1] for e in prof.events() if e.name == "aten::slow_conv3d_forward"]
    assert all(shape[-1] == shape[-2] == 1 for shape in slow), slow  # only 1x1 spatial kernels (faster there)
    assert any(e.name == "aten::mkldnn_convolution" for e in prof.events())


def test_normalization_uses_config_statistics() -> None:
    std = [2.0] * 16
    mean = [0.5] * 16
    v = tiny_vae(seed=0, latents_mean=mean, latents_std=std)
    mu = torch.randn(1, 16, 2, 3, 3)
    assert torch.allclose(v.normalize(mu), (mu - 0.5) / 2.0)
    assert torch.allclose(v.denormalize(v.normalize(mu)), mu, atol=1e-6)
    image = torch.zeros(1, 3, 16, 16)
    raw = v.vae.encode(image.unsqueeze(2)).latent_dist.mean
    assert torch.allclose(v.encode_image(image), (raw - 0.5) / 2.0, atol=1e-6)


def test_encode_rejects_bad_inputs(vae: StreamingVAE) -> None:
    with pytest.raises(VaeShapeError, match=r"\[B, 3, H, W\]"):
        vae.encode_image(torch.zeros(3, 64, 64))
    with pytest.raises(VaeShapeError, match="multiples of 8"):
        vae.encode_image(torch.zeros(1, 3, 60, 64))
    with pytest.raises(VaeShapeError, match="1 \\+ 4k"):
        vae.encode_video(torch.zeros(1, 3, 12, 64, 64))
    with pytest.raises(VaeShapeError, match=r"\[-1, 1\]"):
        vae.encode_image(torch.full((1, 3, 16, 16), 255.0))
    with pytest.raises(VaeShapeError, match=r"\[-1, 1\]"):
        vae.encode_image(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(VaeShapeError, match="float"):
        vae.encode_image(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(VaeShapeError, match="3"):
        vae.encode_image(torch.zeros(1, 4, 16, 16))


# ---- loading ----------------------------------------------------------------------------------------


def test_from_pretrained_diffusers_folder(tmp_path, vae: StreamingVAE) -> None:
    vae.vae.save_pretrained(tmp_path / "vae")
    loaded = StreamingVAE.from_pretrained(tmp_path / "vae")
    z = _latents(2, seed=50)
    assert torch.equal(loaded.decode_full(z), vae.decode_full(z))
    half = StreamingVAE.from_pretrained(tmp_path, subfolder="vae", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def _res_block(sd: Dict[str, torch.Tensor], prefix: str, cin: int, cout: int, g: torch.Generator) -> None:
    """Original Wan ResidualBlock tensors: residual = [RMS, SiLU, conv, RMS, SiLU, Dropout, conv]."""
    sd[f"{prefix}.residual.0.gamma"] = torch.randn(cin, 1, 1, 1, generator=g)
    sd[f"{prefix}.residual.2.weight"] = torch.randn(cout, cin, 3, 3, 3, generator=g) * 0.1
    sd[f"{prefix}.residual.2.bias"] = torch.randn(cout, generator=g) * 0.1
    sd[f"{prefix}.residual.3.gamma"] = torch.randn(cout, 1, 1, 1, generator=g)
    sd[f"{prefix}.residual.6.weight"] = torch.randn(cout, cout, 3, 3, 3, generator=g) * 0.1
    sd[f"{prefix}.residual.6.bias"] = torch.randn(cout, generator=g) * 0.1
    if cin != cout:
        sd[f"{prefix}.shortcut.weight"] = torch.randn(cout, cin, 1, 1, 1, generator=g) * 0.1
        sd[f"{prefix}.shortcut.bias"] = torch.randn(cout, generator=g) * 0.1


def _attn_block(sd: Dict[str, torch.Tensor], prefix: str, c: int, g: torch.Generator) -> None:
    sd[f"{prefix}.norm.gamma"] = torch.randn(c, 1, 1, generator=g)
    sd[f"{prefix}.to_qkv.weight"] = torch.randn(3 * c, c, 1, 1, generator=g) * 0.1
    sd[f"{prefix}.to_qkv.bias"] = torch.randn(3 * c, generator=g) * 0.1
    sd[f"{prefix}.proj.weight"] = torch.randn(c, c, 1, 1, generator=g) * 0.1
    sd[f"{prefix}.proj.bias"] = torch.randn(c, generator=g) * 0.1


def _original_wan21_state_dict(dim: int, dim_mult: List[int], nrb: int, z: int = 16,
                               temporal=(False, True, True), seed: int = 0) -> Dict[str, torch.Tensor]:
    """A random state dict laid out like the original Wan2.1 `WanVAE_` (keys and shapes from its
    module structure: flat encoder.downsamples / decoder.upsamples sequences, middle = res/attn/res,
    head = [RMS, SiLU, conv], conv1/conv2 = quant/post-quant)."""
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {}
    dims = [dim * m for m in [1] + dim_mult]
    sd["encoder.conv1.weight"] = torch.randn(dims[0], 3, 3, 3, 3, generator=g) * 0.1
    sd["encoder.conv1.bias"] = torch.randn(dims[0], generator=g) * 0.1
    k = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(nrb):
            _res_block(sd, f"encoder.downsamples.{k}", cin, cout, g)
            cin, k = cout, k + 1
        if i != len(dim_mult) - 1:
            sd[f"encoder.downsamples.{k}.resample.1.weight"] = torch.randn(cout, cout, 3, 3, generator=g) * 0.1
            sd[f"encoder.downsamples.{k}.resample.1.bias"] = torch.randn(cout, generator=g) * 0.1
            if temporal[i]:
                sd[f"encoder.downsamples.{k}.time_conv.weight"] = torch.randn(cout, cout, 3, 1, 1, generator=g) * 0.1
                sd[f"encoder.downsamples.{k}.time_conv.bias"] = torch.randn(cout, generator=g) * 0.1
            k += 1
    top = dims[-1]
    for side, c in (("encoder", top), ("decoder", dim * dim_mult[-1])):
        _res_block(sd, f"{side}.middle.0", c, c, g)
        _attn_block(sd, f"{side}.middle.1", c, g)
        _res_block(sd, f"{side}.middle.2", c, c, g)
    sd["encoder.head.0.gamma"] = torch.randn(top, 1, 1, 1, generator=g)
    sd["encoder.head.2.weight"] = torch.randn(2 * z, top, 3, 3, 3, generator=g) * 0.1
    sd["encoder.head.2.bias"] = torch.randn(2 * z, generator=g) * 0.1
    sd["conv1.weight"] = torch.randn(2 * z, 2 * z, 1, 1, 1, generator=g) * 0.1
    sd["conv1.bias"] = torch.randn(2 * z, generator=g) * 0.1
    sd["conv2.weight"] = torch.randn(z, z, 1, 1, 1, generator=g) * 0.1
    sd["conv2.bias"] = torch.randn(z, generator=g) * 0.1
    ddims = [dim * m for m in [dim_mult[-1]] + dim_mult[::-1]]
    sd["decoder.conv1.weight"] = torch.randn(ddims[0], z, 3, 3, 3, generator=g) * 0.1
    sd["decoder.conv1.bias"] = torch.randn(ddims[0], generator=g) * 0.1
    up_temporal = list(temporal)[::-1]
    k = 0
    for i, (cin, cout) in enumerate(zip(ddims[:-1], ddims[1:])):
        if i > 0:
            cin = cin // 2  # the previous upsampler halves the channels
        for _ in range(nrb + 1):
            _res_block(sd, f"decoder.upsamples.{k}", cin, cout, g)
            cin, k = cout, k + 1
        if i != len(dim_mult) - 1:
            sd[f"decoder.upsamples.{k}.resample.1.weight"] = torch.randn(cout // 2, cout, 3, 3, generator=g) * 0.1
            sd[f"decoder.upsamples.{k}.resample.1.bias"] = torch.randn(cout // 2, generator=g) * 0.1
            if up_temporal[i]:
                sd[f"decoder.upsamples.{k}.time_conv.weight"] = torch.randn(2 * cout, cout, 3, 1, 1, generator=g) * 0.1
                sd[f"decoder.upsamples.{k}.time_conv.bias"] = torch.randn(2 * cout, generator=g) * 0.1
            k += 1
    sd["decoder.head.0.gamma"] = torch.randn(ddims[-1], 1, 1, 1, generator=g)
    sd["decoder.head.2.weight"] = torch.randn(3, ddims[-1], 3, 3, 3, generator=g) * 0.1
    sd["decoder.head.2.bias"] = torch.randn(3, generator=g) * 0.1
    return sd


def test_original_checkpoint_conversion_matches_diffusers_converter() -> None:
    """Our shape-driven converter agrees with diffusers' own (Wan2.1 layout: 2 res blocks, [1,2,4,4])."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd = _original_wan21_state_dict(dim=2, dim_mult=[1, 2, 4, 4], nrb=2)
    ours, config = convert_original_vae_state_dict(sd)
    theirs = convert_wan_vae_to_diffusers(dict(sd))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert config["base_dim"] == 2 and config["dim_mult"] == [1, 2, 4, 4] and config["num_res_blocks"] == 2
    assert config["temperal_downsample"] == [False, True, True] and config["z_dim"] == 16


@pytest.mark.parametrize("dim_mult,nrb", [([1, 1, 1, 1], 1), ([1, 2, 4, 4], 2)])
def test_from_original_pth_round_trip(tmp_path, dim_mult: List[int], nrb: int) -> None:
    sd = _original_wan21_state_dict(dim=4, dim_mult=dim_mult, nrb=nrb, seed=3)
    torch.save(sd, tmp_path / "Wan2.1_VAE.pth")
    v = StreamingVAE.from_pretrained(tmp_path)  # official folder layout: finds Wan2.1_VAE.pth
    cfg = v.vae.config
    assert list(cfg.dim_mult) == dim_mult and cfg.num_res_blocks == nrb and cfg.base_dim == 4
    assert tuple(cfg.latents_mean) == WAN21_LATENTS_MEAN
    params = dict(v.vae.named_parameters())
    # spot checks of the renames
    assert torch.equal(params["post_quant_conv.weight"], sd["conv2.weight"])
    assert torch.equal(params["decoder.conv_in.weight"], sd["decoder.conv1.weight"])
    last_res = f"decoder.upsamples.{nrb}.residual.6.weight"
    assert torch.equal(params[f"decoder.up_blocks.0.resnets.{nrb}.conv2.weight"], sd[last_res])
    assert torch.equal(params["decoder.up_blocks.1.upsamplers.0.resample.1.weight"],
                       sd[f"decoder.upsamples.{2 * nrb + 3}.resample.1.weight"])
    z = _latents(4, seed=60)
    state = v.new_decode_state()
    out = torch.cat([v.decode_stream(state, z[:, :, :1]), v.decode_stream(state, z[:, :, 1:])], 2)
    assert out.shape == (1, 3, 13, 64, 64) and torch.isfinite(out).all()
    assert v.encode_video(out).shape == (1, 16, 4, 8, 8)
    direct = StreamingVAE.from_pretrained(tmp_path / "Wan2.1_VAE.pth", dtype=torch.bfloat16)
    assert direct.dtype == torch.bfloat16


def test_bad_checkpoints_raise_typed_errors(tmp_path) -> None:
    with pytest.raises(VaeCheckpointError, match="does not exist"):
        StreamingVAE.from_pretrained(tmp_path / "missing")
    with pytest.raises(VaeCheckpointError, match="neither"):
        StreamingVAE.from_pretrained(tmp_path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(VaeCheckpointError, match="cannot read"):
        StreamingVAE.from_pretrained(tmp_path / "junk.pth")
    sd = _original_wan21_state_dict(dim=4, dim_mult=[1, 1, 1, 1], nrb=1)
    del sd["conv2.weight"]
    with pytest.raises(VaeCheckpointError, match="conv2.weight"):
        convert_original_vae_state_dict(sd)
    sd = _original_wan21_state_dict(dim=4, dim_mult=[1, 1, 1, 1], nrb=1)
    sd["decoder.upsamples.2.residual.9.weight"] = torch.zeros(1)
    with pytest.raises(VaeCheckpointError, match="unsupported original VAE key"):
        convert_original_vae_state_dict(sd)
    sd = _original_wan21_state_dict(dim=4, dim_mult=[1, 1, 1, 1], nrb=1)
    sd["decoder.conv1.weight"] = torch.zeros(4, 16, 3, 3, 1)
    torch.save(sd, tmp_path / "bad_shape.pth")
    with pytest.raises(VaeCheckpointError, match="shapes"):
        StreamingVAE.from_pretrained(tmp_path / "bad_shape.pth")
    with pytest.raises(TypeError):
        StreamingVAE(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
