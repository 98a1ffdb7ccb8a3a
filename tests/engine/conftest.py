import numpy as np
import pytest

from avatarserve.engine.bundle import build_bundle


@pytest.fixture(scope="session")
def tiny_bundle():
    return build_bundle("tiny", seed=0)


@pytest.fixture(scope="session")
def face_png():
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    arr = (rng.random((72, 96, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def speech_like(seconds: float, seed: int = 0, sr: int = 16000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    env = (np.sin(2 * np.pi * 3.0 * t) > 0).astype(np.float32)
    return (0.3 * env * np.sin(2 * np.pi * (150 + 50 * rng.random()) * t) + 0.01 * rng.standard_normal(n)).astype(np.float32)
