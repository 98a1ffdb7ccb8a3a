"""Demo inputs from the toy world: a reference face (PNG) and a speech clip (16 kHz mono WAV).

    python -m avatarserve.toy.demo OUT_DIR [--seconds 8] [--seed 1000001]

Seeds >= 10^6 are held out from training, so the demo shows a face the model never saw. The default person
(1000001) is a typical held-out person for the shipped toy model, a little better than the median (identity drift
0.13 vs 0.18 over the 20 held-out clips of services/avatarserve/weights/toy/quality.json).
"""

from __future__ import annotations

import argparse
import json
import os
import wave

import numpy as np
from PIL import Image

from .world import make_clip

DEMO_SEED = 1_000_001


def write_demo_inputs(out_dir: str, seconds: float = 8.0, seed: int = DEMO_SEED, size: int = 64) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    clip = make_clip(seed, seconds, size=size)
    image_path = os.path.join(out_dir, "demo_face.png")
    audio_path = os.path.join(out_dir, "demo_speech.wav")
    Image.fromarray(clip.reference_image).save(image_path)
    pcm = (np.clip(clip.audio, -1, 1) * 32767).astype("<i2")
    with wave.open(audio_path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return {"image": image_path, "audio": audio_path, "seconds": len(pcm) / 16000, "seed": seed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=DEMO_SEED)
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args(argv)
    print(json.dumps(write_demo_inputs(a.out_dir, a.seconds, a.seed, a.size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
