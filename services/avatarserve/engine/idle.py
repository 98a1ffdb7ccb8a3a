"""When a block counts as idle (silence): one definition for the engine's audio runner and the gateway's feeder."""

from __future__ import annotations

# RMS of a block's PCM (float in [-1, 1]) below which the block is idle: the avatar listens instead of speaking.
IDLE_RMS = 1e-3


def is_idle(rms: float) -> bool:
    return rms < IDLE_RMS
