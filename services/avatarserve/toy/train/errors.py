"""Errors of the toy-model training code."""

from __future__ import annotations

from ..errors import ToyWorldError


class TrainingError(ToyWorldError):
    """Training cannot proceed: inconsistent work directory, bad recipe, a diverged loss, missing stage output."""
