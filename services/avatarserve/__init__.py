"""AvatarServe: real-time, audio-driven avatar video serving for Live Avatar.

Layers import one way: clients -> serve -> engine -> model. This top-level module stays
light (no torch, no Ray) so that generated protocol modules and the CLI import quickly.
"""

__version__ = "0.1.0"
