"""Typed errors of the streaming engine. The serving layer maps them onto gRPC status codes."""


class EngineError(Exception):
    """Base class of engine errors."""


class SessionNotFound(EngineError):
    """No session with this id lives in this runner."""


class SessionExists(EngineError):
    """A session with this id already lives in this runner."""


class InvalidInput(EngineError):
    """Bad data from a client: image, audio, prompt, options."""


class BlockOrderError(EngineError):
    """A block arrived out of order for its session."""


class SinkNotReady(EngineError):
    """A block needs the adaptive-sink latent, which has not arrived yet."""
