"""Encoding of decoded blocks for the wire: JPEG per frame, H.264 (Annex-B, one GOP) per block."""

from __future__ import annotations

import io
from fractions import Fraction
from typing import List

import numpy as np
from PIL import Image


def encode_jpeg_frames(frames: np.ndarray, quality: int = 85) -> List[bytes]:
    """frames [T, H, W, 3] uint8 -> one baseline JPEG per frame (deterministic for the same pixels)."""
    out = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=int(quality), optimize=False, subsampling=2)
        out.append(buf.getvalue())
    return out


def encode_h264_block(frames: np.ndarray, fps: int = 25, crf: int = 23) -> bytes:
    """frames [T, H, W, 3] uint8 -> H.264 Annex-B bytes, one closed GOP starting with an IDR frame (with
    SPS/PPS), so every block decodes on its own and a player can join at any block."""
    import av

    t, h, w, _ = frames.shape
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height = w, h
    codec.pix_fmt = "yuv420p"
    codec.time_base = Fraction(1, fps)
    codec.framerate = Fraction(fps, 1)
    codec.gop_size = t
    codec.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": str(crf), "bframes": "0",
                     "annexb": "1", "repeat-headers": "1"}
    out = bytearray()
    for i, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24").reformat(format="yuv420p")
        vf.pts = i
        for pkt in codec.encode(vf):
            out += bytes(pkt)
    for pkt in codec.encode(None):
        out += bytes(pkt)
    return bytes(out)
