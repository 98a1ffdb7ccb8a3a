"""The public API: `Gateway` (servicer.py) implements avatarserve.v1.AvatarService behind Serve's gRPC proxy,
`StreamController` (stream_controller.py) runs one open stream on the audio clock, and every error leaves through
`ApiError` (errors.py), the one type mapped to a gRPC status."""
