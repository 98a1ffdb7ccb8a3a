"""Handler factories that stand for a slow model load (weights read from a slow disk) or a broken one, for
start-up tests.

Used through the app config's `handlers:` key, e.g. `handlers: {audio: "tests.support.slow_handlers:slow_audio_encoder"}`;
the Ray workers must be able to import `tests` (PYTHONPATH = the repository root). The delay is read from
AVATARSERVE_TEST_LOAD_DELAY_S (default 90 s), which the workers inherit from the process that started Ray.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping


def slow_audio_encoder(config: Mapping[str, Any]):
    time.sleep(float(os.environ.get("AVATARSERVE_TEST_LOAD_DELAY_S", "90")))
    from avatarserve.serve.dataplane.handlers import audio_encoder

    return audio_encoder(config)


def broken_vae_decoder(config: Mapping[str, Any]):
    raise RuntimeError("weights file vae.safetensors is truncated (test: a replica that cannot load)")
