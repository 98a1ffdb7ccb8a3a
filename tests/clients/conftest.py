from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from .avatar_test_server import DeterministicAvatarService, ServerThread


@pytest.fixture(scope="session")
def _server_thread() -> Iterator[ServerThread]:
    thread = ServerThread(DeterministicAvatarService()).start()
    yield thread
    thread.stop()


@pytest.fixture
def server(_server_thread: ServerThread) -> ServerThread:
    """The in-process AvatarService, with fresh state for each test."""
    _server_thread.reset()
    return _server_thread


@pytest.fixture
def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 30, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def tone(ms: float, freq: float = 220.0, amplitude: float = 0.3, sample_rate: int = 16000) -> np.ndarray:
    n = int(round(ms * sample_rate / 1000))
    t = np.arange(n) / sample_rate
    return np.round(amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
