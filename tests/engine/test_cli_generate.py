"""`avatarserve generate` writes a playable mp4: 25 fps, the audio track, frames = audio rounded up to blocks."""

import json
import math
import subprocess
import sys

import av

from avatarserve.toy.demo import write_demo_inputs


def test_generate_tiny_mp4(tmp_path):
    demo = write_demo_inputs(str(tmp_path), seconds=2.0)
    out = tmp_path / "out.mp4"
    res = subprocess.run([sys.executable, "-m", "avatarserve.cli", "generate", "--config", "tiny", "--image",
                          demo["image"], "--audio", demo["audio"], "--out", str(out), "--seed", "3"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    blocks = math.ceil(2.0 / 0.48)
    assert summary["blocks"] == blocks and summary["frames"] == 12 * blocks
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert v.average_rate == 25 and v.codec_context.name == "h264"
        assert (v.codec_context.width, v.codec_context.height) == (64, 64)
        assert sum(1 for _ in c.decode(video=0)) == 12 * blocks
    with av.open(str(out)) as c:
        a = c.streams.audio[0]
        assert a.rate == 16000 or a.codec_context.sample_rate == 16000
        samples = sum(f.samples for f in c.decode(audio=0))
        assert abs(samples / 16000 - 2.0) < 0.1


def test_generate_reports_bad_image(tmp_path):
    demo = write_demo_inputs(str(tmp_path), seconds=0.5)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    res = subprocess.run([sys.executable, "-m", "avatarserve.cli", "generate", "--image", str(bad), "--audio",
                          demo["audio"], "--out", str(tmp_path / "o.mp4")], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "cannot decode reference image" in res.stderr
