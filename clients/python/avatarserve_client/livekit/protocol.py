"""LiveKit's avatar data-stream protocol, as livekit-agents defines it (verified against 1.8.9).

The agent (``DataStreamAudioOutput``) and the avatar worker (``DataStreamAudioReceiver``) talk inside the room:

* agent -> worker: each utterance is one LiveKit byte stream on topic ``lk.audio_stream``, addressed to the worker,
  with the attributes ``sample_rate`` and ``num_channels``; its bytes are interleaved s16le PCM and closing the
  stream ends the utterance;
* agent -> worker: RPC ``lk.clear_buffer`` (empty payload) stops playback at once (the worker answers ``"ok"``);
* worker -> agent: RPC ``lk.playback_started`` (empty payload) when an utterance starts playing, and
  ``lk.playback_finished`` with the JSON ``{"playback_position": seconds, "interrupted": bool}`` when it has
  played out or was cut by ``lk.clear_buffer``; exactly one per utterance;
* the worker joins with the participant attribute ``lk.publish_on_behalf`` = the agent's identity (set in its
  token) and publishes a camera video track and a microphone audio track.

These are our own copies; tests/integration/test_livekit_adapter.py reads the installed livekit-agents and checks
that they are equal.
"""

from __future__ import annotations

AUDIO_STREAM_TOPIC = "lk.audio_stream"
RPC_CLEAR_BUFFER = "lk.clear_buffer"
RPC_PLAYBACK_STARTED = "lk.playback_started"
RPC_PLAYBACK_FINISHED = "lk.playback_finished"

# byte-stream attributes of an utterance
ATTR_SAMPLE_RATE = "sample_rate"
ATTR_NUM_CHANNELS = "num_channels"

# participant attribute of the avatar worker: the identity of the agent it publishes for
ATTRIBUTE_PUBLISH_ON_BEHALF = "lk.publish_on_behalf"

# keys of the lk.playback_finished JSON payload
KEY_PLAYBACK_POSITION = "playback_position"
KEY_INTERRUPTED = "interrupted"

# The livekit-agents versions this adapter was verified against (see clients/python/pyproject.toml, extra `livekit`).
VERIFIED_LIVEKIT_AGENTS = ">=1.8.9,<1.9"
