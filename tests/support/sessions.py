"""Small session state for tests that store sessions in a real Redis."""

from __future__ import annotations

import torch

from avatarserve.engine.sink import SinkState


def tiny_sink(aas: bool = False) -> SinkState:
    """A session's sink state with tiny, seeded latents (and an adaptive sink latent when `aas`)."""
    g = torch.Generator().manual_seed(0)
    return SinkState(reference=torch.randn(1, 4, 1, 2, 2, generator=g), motion=torch.randn(1, 4, 1, 2, 2, generator=g),
                     text=torch.randn(1, 3, 8, generator=g), seed=7,
                     aas_latent=torch.randn(1, 4, 1, 2, 2, generator=g) if aas else None)
