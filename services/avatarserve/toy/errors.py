"""Typed errors of the toy "talking cartoon face" world."""

from __future__ import annotations


class ToyWorldError(ValueError):
    """Base class: a toy-world request or file was invalid (bad seed, duration, size, dataset...)."""


class SpeechSynthesisError(ToyWorldError):
    """espeak-ng failed to produce audio for an utterance."""


class EspeakNotFoundError(SpeechSynthesisError):
    """The espeak-ng binary is not installed (or not on PATH / at $AVATARSERVE_ESPEAK)."""


class DatasetError(ToyWorldError):
    """A toy dataset directory, manifest or clip file is missing, malformed or corrupted."""
