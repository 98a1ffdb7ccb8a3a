"""The toy "talking cartoon face" world that AvatarServe's embedded default model is trained on.

Everything is procedural and deterministic from a seed (no downloads): cartoon identities rendered
with numpy, speech from the espeak-ng binary, a mouth that follows the speech envelope, small head
sway and blinks. See `world.make_clip`, `world.make_stream` and `dataset.write_dataset`.
"""

from avatarserve.toy.errors import DatasetError, EspeakNotFoundError, SpeechSynthesisError, ToyWorldError
from avatarserve.toy.faces import FPS, HAIR_STYLES, Identity, render, sample_identity
from avatarserve.toy.speech import SAMPLE_RATE, VoiceProfile, sample_voice
from avatarserve.toy.world import SAMPLES_PER_FRAME, Clip, StreamChunk, ToyStream, make_clip, make_stream

__all__ = [
    "FPS", "SAMPLE_RATE", "SAMPLES_PER_FRAME", "HAIR_STYLES",
    "Clip", "StreamChunk", "ToyStream", "Identity", "VoiceProfile",
    "make_clip", "make_stream", "render", "sample_identity", "sample_voice",
    "ToyWorldError", "SpeechSynthesisError", "EspeakNotFoundError", "DatasetError",
]
