"""Pipecat integration: AvatarServe's live avatar as a Pipecat video service.

    from avatarserve_client.pipecat import AvatarServeVideoService

    pipeline = Pipeline([transport.input(), stt, user_aggregator, llm, tts,
                         AvatarServeVideoService(address="localhost:9000", image="face.png"),
                         transport.output(), assistant_aggregator])

Needs the `pipecat` extra (``pip install 'avatarserve-client[pipecat]'``).
"""

from .video import AvatarServeVideoService, AvatarServeVideoSettings

__all__ = ["AvatarServeVideoService", "AvatarServeVideoSettings"]
