"""Shared toy-world clips (generated once per test session; each takes well under a second)."""

from __future__ import annotations

import pytest

from avatarserve.toy import Clip, make_clip
from avatarserve.toy.dataset import HELDOUT_SEED_START


@pytest.fixture(scope="session")
def gt_clip() -> Clip:
    """10 s of a held-out person: the ground truth every metric test starts from."""
    return make_clip(HELDOUT_SEED_START, 10.0)


@pytest.fixture(scope="session")
def other_clip() -> Clip:
    return make_clip(HELDOUT_SEED_START + 1, 10.0)
