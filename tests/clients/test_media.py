from __future__ import annotations

import av
import numpy as np
import pytest

from avatarserve_client import MediaError, Mp4Writer, VideoBlock, decode_h264, write_mp4
from avatarserve_client.media import video_block_from_proto
from avatarserve_client.v1 import avatar_service_pb2 as pb

from .avatar_test_server import encode_h264
from .conftest import tone

W, H = 64, 48


def _block(k: int, num_frames: int = 12, pts_ms: int | None = None) -> VideoBlock:
    frames = [np.full((H, W, 3), ((k * 40) % 256, i * 20, 90), np.uint8) for i in range(num_frames)]
    return VideoBlock(block_index=k, pts_ms=480 * k if pts_ms is None else pts_ms, duration_ms=480,
                      frames=frames, h264=None, is_idle=False, width=W, height=H,
                      num_frames=num_frames)


def _probe(path):
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], (c.streams.audio[0] if c.streams.audio else None)
        info = {
            "rate": v.average_rate, "codec": v.codec_context.name, "pix_fmt": v.codec_context.pix_fmt,
            "size": (v.codec_context.width, v.codec_context.height),
            "audio_codec": a.codec_context.name if a else None,
            "audio_rate": a.sample_rate if a else None,
            "audio_s": float(a.duration * a.time_base) if a else None,
        }
        frames = [(f.pts * f.time_base, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    return info, frames


def test_write_mp4_roundtrip_25fps_frames_and_audio(tmp_path) -> None:
    blocks = [_block(k) for k in range(5)]  # 60 frames = 2.4 s
    audio = tone(2400)
    out = tmp_path / "out.mp4"
    assert write_mp4(out, blocks, audio) == 60
    info, frames = _probe(out)
    assert info["rate"] == 25 and info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["size"] == (W, H)
    assert len(frames) == 60
    assert [float(t) for t, _ in frames] == pytest.approx([i / 25 for i in range(60)])
    # Colours survive encoding and frames stay in order.
    for k in range(5):
        for i in (0, 11):
            px = frames[12 * k + i][1][H // 2, W // 2].astype(int)
            assert np.abs(px - [(k * 40) % 256, i * 20, 90]).max() <= 6
    assert info["audio_codec"] == "aac" and info["audio_rate"] == 16000
    assert info["audio_s"] == pytest.approx(2.4, abs=0.065)  # within one AAC frame


def test_short_first_block_is_end_aligned(tmp_path) -> None:
    blocks = [_block(0, num_frames=9), _block(1)]
    assert blocks[0].frame_pts_ms(0) == 120.0
    assert write_mp4(tmp_path / "a.mp4", blocks, tone(960)) == 21
    _, frames = _probe(tmp_path / "a.mp4")
    assert [round(float(t) * 25) for t, _ in frames] == list(range(3, 24))


def test_write_mp4_without_audio(tmp_path) -> None:
    write_mp4(tmp_path / "v.mp4", [_block(0)], None)
    info, frames = _probe(tmp_path / "v.mp4")
    assert info["audio_codec"] is None and len(frames) == 12


def test_out_of_order_or_duplicate_blocks_are_rejected(tmp_path) -> None:
    with pytest.raises(MediaError, match="not after the previous frame"):
        write_mp4(tmp_path / "x.mp4", [_block(1), _block(0)], None)
    with pytest.raises(MediaError, match="not after the previous frame"):
        write_mp4(tmp_path / "y.mp4", [_block(0), _block(0)], None)


def test_write_mp4_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(MediaError, match="no video frames"):
        write_mp4(tmp_path / "e.mp4", [], None)
    odd = _block(0)
    odd.frames = [np.zeros((H, W + 1, 3), np.uint8)] * 12
    with pytest.raises(MediaError, match="even"):
        write_mp4(tmp_path / "o.mp4", [odd], None)
    bad = _block(1)
    bad.frames = [np.zeros((H * 2, W, 3), np.uint8)] * 12
    with pytest.raises(MediaError, match="size changed"):
        write_mp4(tmp_path / "s.mp4", [_block(0), bad], None)
    undecoded = _block(0)
    undecoded.frames = []
    with pytest.raises(MediaError, match="no decoded frames"):
        write_mp4(tmp_path / "u.mp4", [undecoded], None)
    with pytest.raises(Exception, match="1-D int16"):
        Mp4Writer(tmp_path / "z.mp4", audio_pcm=np.zeros((2, 2), np.int16))


def test_h264_block_roundtrip_and_proto_decoding() -> None:
    src = [np.full((H, W, 3), (10 * i, 128, 200), np.uint8) for i in range(12)]
    data = encode_h264(src)
    frames = decode_h264(data)
    assert len(frames) == 12
    for s, f in zip(src, frames):
        assert np.abs(f.astype(int) - s.astype(int)).max() <= 6
    msg = pb.VideoChunk(block_index=3, pts_ms=1440, duration_ms=480, h264=data, width=W, height=H,
                        num_frames=12)
    block = video_block_from_proto(msg, fps=25, received_at=0.0)
    assert block.h264 == data and len(block.frames) == 12 and block.jpeg_frames == []
    msg.num_frames = 11
    with pytest.raises(Exception, match="num_frames is 11 but 12 frames decoded"):
        video_block_from_proto(msg, fps=25, received_at=0.0)


def test_undecodable_payloads_raise_protocol_error() -> None:
    from avatarserve_client import ProtocolError

    with pytest.raises(ProtocolError, match="JPEG"):
        video_block_from_proto(pb.VideoChunk(jpeg_frames=[b"\xff\xd8garbage"], num_frames=1,
                                             width=2, height=2), fps=25, received_at=0)
