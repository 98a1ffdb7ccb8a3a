"""The data plane: blocks of one session flow through long-lived gRPC pipes between stage replicas. `transport`
(wire items, codec, pipe client, channel pool), `stage_host` (the gRPC server in a replica), `stages` (stage specs,
handler construction), `handlers` (the engine runners behind the pipes), `media` (JPEG / H.264 encoding)."""
