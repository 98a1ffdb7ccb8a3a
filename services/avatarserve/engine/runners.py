"""Streaming units that own per-session state. The same runners serve the single-process
`SequentialPipeline` and the distributed Ray Serve deployments (serve/ wraps them; it never redoes model math).

- `AudioEncoderRunner`: live PCM in, per-block wav2vec2 features out (incremental, no lookahead).
- `StageRunner(step)`: one denoising step for one block of one session, with that session's KV cache *at that
  step* (timestep forcing) and its sink (reference / AAS latent, rolling RoPE).
- `DecoderRunner`: reference image -> sink latents, and streaming VAE decode of each finished block.

Every runner keys its state by session id: create, step, close; close frees everything.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..model.config import StreamConfig
from ..model.kv_cache import CacheError, KVCache
from ..model.sampler import FlowMatchSchedule
from ..model.transformer import BlockRequest, CausalS2VTransformer, ModelInputError, SinkInputs
from .errors import BlockOrderError, EngineError, InvalidInput, SessionExists, SessionNotFound
from .idle import is_idle
from .sink import SinkState, block_noise, prepare_sink

# A block whose audio RMS is below this (on [-1, 1] PCM) is reported as idle (made from silence).


@dataclass
class BlockPayload:
    """What crosses a pipeline hop: one block of one session."""

    session_id: str
    block_index: int
    pts_ms: int  # presentation time of the first audio sample this block was made from
    audio: torch.Tensor  # [1, L, C_a, frames_per_block] wav2vec2 features
    latents: Optional[torch.Tensor] = None  # [1, 16, F, h, w]; None until stage 0 draws the noise
    is_idle: bool = False
    steps_done: int = 0


class _Registry:
    """Session-keyed state with clear errors; thread-safe (Serve replicas run steps in executor threads)."""

    def __init__(self, what: str):
        self._what = what
        self._items: Dict[str, object] = {}
        self._lock = threading.Lock()

    def add(self, sid: str, item: object) -> None:
        if not isinstance(sid, str) or not sid:
            raise InvalidInput("session id must be a non-empty string")
        with self._lock:
            if sid in self._items:
                raise SessionExists(f"{self._what}: session {sid!r} already exists")
            self._items[sid] = item

    def get(self, sid: str):
        try:
            return self._items[sid]
        except KeyError:
            raise SessionNotFound(f"{self._what}: no session {sid!r}") from None

    def pop(self, sid: str):
        with self._lock:
            item = self._items.pop(sid, None)
        if item is None:
            raise SessionNotFound(f"{self._what}: no session {sid!r}")
        return item

    def __len__(self) -> int:
        return len(self._items)

    def ids(self):
        return list(self._items)


# ------------------------------------------------------------------------------------------------------------
@dataclass
class _AudioSession:
    state: object
    received: int = 0  # samples pushed (incl. padding)
    next_block: int = 0
    finished: bool = False
    rms: list = field(default_factory=list)


class AudioEncoderRunner:
    def __init__(self, extractor, stream: StreamConfig):
        self.extractor = extractor
        self.stream = stream
        self.sessions = _Registry("audio encoder")

    def create(self, session_id: str, start_block: int = 0) -> None:
        """A new audio stream; `start_block` > 0 rebuilds a session mid-stream: its audio starts at that block's
        first sample (without the left context earlier audio would have given)."""
        _check_start(start_block)
        state = self.extractor.new_stream_state()
        first_sample = start_block * self.stream.samples_per_block
        if first_sample:
            # The audio before the resume point is gone: its left context is silence.
            context = min(state.left_context_samples, first_sample)
            state.buffer = np.zeros(context, dtype=np.float32)
            state.buffer_start = first_sample - context
            state.min_block = start_block
        self.sessions.add(session_id, _AudioSession(state=state, received=first_sample, next_block=start_block))

    def push(self, session_id: str, pcm: np.ndarray) -> int:
        """Append float32 mono PCM at the stream's sample rate; returns the number of complete blocks ready."""
        s: _AudioSession = self.sessions.get(session_id)
        if s.finished:
            raise InvalidInput(f"session {session_id!r}: audio pushed after end of input")
        pcm = np.asarray(pcm)
        if pcm.ndim != 1 or pcm.dtype != np.float32:
            raise InvalidInput(f"audio must be 1-D float32 PCM, got shape {pcm.shape} dtype {pcm.dtype}")
        if not np.isfinite(pcm).all():
            raise InvalidInput("audio contains NaN or inf")
        if pcm.size:
            self.extractor.push(s.state, pcm)
            s.received += pcm.size
        return self.ready_blocks(session_id)

    def push_silence(self, session_id: str, num_samples: int) -> int:
        return self.push(session_id, np.zeros(int(num_samples), dtype=np.float32))

    def finish(self, session_id: str) -> int:
        """End of input: pad the last partial block with silence. Returns the number of blocks ready."""
        s: _AudioSession = self.sessions.get(session_id)
        rem = s.received % self.stream.samples_per_block
        if rem:
            self.push_silence(session_id, self.stream.samples_per_block - rem)
        s.finished = True
        return self.ready_blocks(session_id)

    def ready_blocks(self, session_id: str) -> int:
        s: _AudioSession = self.sessions.get(session_id)
        return s.received // self.stream.samples_per_block - s.next_block

    def next_block(self, session_id: str) -> Optional[BlockPayload]:
        """Features of the next complete block, or None if its audio has not fully arrived."""
        s: _AudioSession = self.sessions.get(session_id)
        if self.ready_blocks(session_id) <= 0:
            return None
        b = s.next_block
        feats = self.extractor.block_features(s.state, b, self.stream.frames_per_block)
        rms = float(self.extractor.block_rms(s.state, b, self.stream.frames_per_block))
        s.next_block += 1
        pts_ms = round(b * self.stream.block_seconds * 1000)
        return BlockPayload(session_id=session_id, block_index=b, pts_ms=pts_ms,
                            audio=feats.unsqueeze(0).float(), is_idle=is_idle(rms))

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id)


# ------------------------------------------------------------------------------------------------------------
@dataclass
class _StageSession:
    cache: KVCache
    sink: SinkState
    text: torch.Tensor  # projected text embeddings [1, text_len, dim]
    next_block: int = 0


def adaptive_sink_latent(stream: StreamConfig, payload: BlockPayload) -> Optional[torch.Tensor]:
    """The adaptive attention sink (AAS): the first latent frame of block 0 after the last denoising step; None for
    any other block or when the adaptive sink is off. The sequential pipeline and the cluster's last stage both take
    it from here, so they stay equal."""
    if payload.block_index != 0 or not stream.adaptive_sink or payload.latents is None:
        return None
    return payload.latents[:, :, :1].contiguous()


class StageRunner:
    """Denoising step `step` of the timestep-forcing pipeline."""

    def __init__(self, step: int, model: CausalS2VTransformer, schedule: FlowMatchSchedule, stream: StreamConfig):
        if not 0 <= step < schedule.num_steps:
            raise ValueError(f"step {step} out of range for a {schedule.num_steps}-step schedule")
        self.step_index = step
        self.model = model
        self.schedule = schedule
        self.stream = stream
        self.sessions = _Registry(f"stage {step}")

    @property
    def is_first(self) -> bool:
        return self.step_index == 0

    @property
    def is_last(self) -> bool:
        return self.step_index == self.schedule.num_steps - 1

    def create(self, session_id: str, sink: SinkState, start_block: int = 0) -> None:
        """A session's state at this step. `start_block` > 0 rebuilds a session mid-stream (a replacement replica):
        its KV window starts empty at that block and fills as blocks arrive."""
        _check_start(start_block)
        st = self.stream
        cache = self.model.new_cache(st.latent_height, st.latent_width, st.latent_frames_per_block, st.window_blocks)
        with torch.no_grad():
            text = self.model.embed_text(sink.text.to(self.model.device))
        sess = _StageSession(cache=cache, sink=sink, text=text, next_block=start_block)
        needs_aas = st.adaptive_sink and start_block >= st.aas_after_blocks and sink.aas_latent is None
        # Without the adaptive-sink latent yet, prefill the reference; `step` re-prefills once it arrives.
        reference, version = (sink.reference, 0) if needs_aas else sink.reference_for_block(start_block, st)
        self._prefill(sess, reference, version=version)
        cache.start_at(start_block)
        self.sessions.add(session_id, sess)

    def _prefill(self, sess: _StageSession, reference: torch.Tensor, version: int) -> None:
        dev, dt = self.model.device, self.model.dtype
        sink_inputs = SinkInputs(reference=reference.to(dev, dt), motion=sess.sink.motion.to(dev, dt))
        self.model.prefill_sink(sess.cache, sink_inputs, sess.sink.text.to(dev), sink_version=version)

    def set_aas_latent(self, session_id: str, latent: torch.Tensor) -> None:
        """Adaptive attention sink: record the first generated latent; the cond cache is re-prefilled lazily
        when the first block that needs it arrives."""
        sess: _StageSession = self.sessions.get(session_id)
        if latent.dim() != 5 or latent.shape[2] != 1:
            raise InvalidInput(f"AAS latent must be [1, 16, 1, h, w], got {tuple(latent.shape)}")
        sess.sink.aas_latent = latent.detach().float().cpu()

    def needs_aas(self, session_id: str, block_index: int) -> bool:
        sess: _StageSession = self.sessions.get(session_id)
        return (self.stream.adaptive_sink and block_index >= self.stream.aas_after_blocks
                and sess.sink.aas_latent is None)

    @torch.no_grad()
    def step(self, payload: BlockPayload) -> BlockPayload:
        result = self.step_many([payload])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.no_grad()
    def step_many(self, payloads: Sequence[BlockPayload]) -> List[Union[BlockPayload, Exception]]:
        """This step for the blocks of several sessions (at most one block each) in ONE forward; result i is
        payload i's block after the step, or the engine error that refused it (the others go on without it)."""
        if len({p.session_id for p in payloads}) != len(payloads):
            raise InvalidInput(f"stage {self.step_index}: one batch holds two blocks of one session")
        results: List[Union[BlockPayload, Exception]] = list(payloads)
        ready = []  # (index, session, payload, request)
        for i, payload in enumerate(payloads):
            try:
                sess, request = self._prepare(payload)
            except (EngineError, CacheError) as exc:
                results[i] = exc if isinstance(exc, EngineError) else InvalidInput(str(exc))
                continue
            ready.append((i, sess, payload, request))
        if not ready:
            return results
        model = self.model
        if len(ready) == 1:
            r = ready[0][3]
            v = model.forward_block(r.cache, r.latents, r.timestep, r.audio, None, r.block_index, r.sink_index,
                                    text=r.text)
        else:
            v = model.forward_blocks([r for _, _, _, r in ready])
        for row, (i, sess, payload, request) in enumerate(ready):
            x_next = self.schedule.step(self.step_index, request.latents, v[row:row + 1])
            sess.next_block = payload.block_index + 1
            results[i] = replace(payload, latents=x_next.detach().to("cpu"), steps_done=self.step_index + 1)
        return results

    def _prepare(self, payload: BlockPayload):
        """Check one block against its session and build its forward request (re-prefilling the sink if needed)."""
        sess: _StageSession = self.sessions.get(payload.session_id)
        b = payload.block_index
        if b != sess.next_block:
            raise BlockOrderError(f"stage {self.step_index}: session {payload.session_id!r} expected block "
                                  f"{sess.next_block}, got {b}")
        if payload.steps_done != self.step_index:
            raise BlockOrderError(f"stage {self.step_index}: block {b} arrives after {payload.steps_done} steps")
        reference, version = sess.sink.reference_for_block(b, self.stream)
        if sess.cache.sink_version != version:
            self._prefill(sess, reference, version)
        model = self.model
        if payload.latents is None:
            if not self.is_first:
                raise InvalidInput(f"stage {self.step_index}: block {b} has no latents")
            x = block_noise(sess.sink.seed, b, (1,) + self.stream.latent_shape(model.config.in_dim), model.dtype)
        else:
            x = payload.latents
        x = x.to(model.device, model.dtype)
        try:
            # The audio encoder may run on another device / dtype (serve config `model.roles`).
            audio = model.encode_audio(payload.audio.to(model.device, model.dtype), self.stream.latent_frames_per_block)
        except ModelInputError as exc:
            raise InvalidInput(str(exc)) from exc
        t = torch.full((1,), self.schedule.timestep(self.step_index), device=model.device)
        return sess, BlockRequest(cache=sess.cache, latents=x, timestep=t, audio=audio, text=sess.text,
                                  block_index=b, sink_index=sess.sink.sink_index(b, self.step_index, self.stream))

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id)


# ------------------------------------------------------------------------------------------------------------
@dataclass
class _DecoderSession:
    state: object
    next_block: int = 0


class DecoderRunner:
    """Streaming VAE: decodes each finished block into uint8 RGB frames; also prepares sinks."""

    def __init__(self, vae, stream: StreamConfig, motion_frames: int, warmup_latents: int = 7):
        self.vae = vae
        self.stream = stream
        self.motion_frames = motion_frames
        self.warmup_latents = warmup_latents
        self.sessions = _Registry("decoder")

    def prepare_sink(self, image, text: torch.Tensor, seed: int) -> SinkState:
        return prepare_sink(self.vae, image, text, seed, self.stream, self.motion_frames)

    @torch.no_grad()
    def create(self, session_id: str, sink: SinkState, start_block: int = 0) -> None:
        """A decode stream; `start_block` > 0 rebuilds one mid-stream (warmed on the reference like a new one; the
        blocks replayed before the resume point bring its causal cache up to date)."""
        _check_start(start_block)
        state = self.vae.new_decode_state()
        # Warm the causal decoder on the reference's motion latents (as upstream does before block 0), so
        # block 0 is decoded as a continuation and yields the full 4 frames per latent.
        if self.warmup_latents > 0:
            self.vae.decode_stream(state, sink.motion[:, :, : self.warmup_latents])
        self.sessions.add(session_id, _DecoderSession(state=state, next_block=start_block))

    @torch.no_grad()
    def decode(self, payload: BlockPayload) -> np.ndarray:
        """-> frames uint8 [frames_per_block, H, W, 3]."""
        result = self.decode_many([payload])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.no_grad()
    def decode_many(self, payloads: Sequence[BlockPayload]) -> List[Union[np.ndarray, Exception]]:
        """One block each of several sessions, decoded as one batch where their streams allow
        (`StreamingVAE.decode_stream_many`); result i is payload i's frames or the engine error that refused it."""
        if len({p.session_id for p in payloads}) != len(payloads):
            raise InvalidInput("decoder: one batch holds two blocks of one session")
        results: List[Union[np.ndarray, Exception]] = list(payloads)
        ready = []
        for i, payload in enumerate(payloads):
            try:
                sess: _DecoderSession = self.sessions.get(payload.session_id)
                if payload.block_index != sess.next_block:
                    raise BlockOrderError(f"decoder: session {payload.session_id!r} expected block "
                                          f"{sess.next_block}, got {payload.block_index}")
                if payload.latents is None:
                    raise InvalidInput("decoder: block has no latents")
            except EngineError as exc:
                results[i] = exc
                continue
            ready.append((i, sess, payload))
        if not ready:
            return results
        frames = self.vae.decode_stream_many([sess.state for _, sess, _ in ready],
                                             [p.latents for _, _, p in ready])  # each [1, 3, T, H, W] in [-1, 1]
        for (i, sess, _), f in zip(ready, frames):
            sess.next_block += 1
            results[i] = to_uint8_frames(f)
        return results

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id)


def _check_start(start_block: int) -> None:
    if not isinstance(start_block, int) or isinstance(start_block, bool) or start_block < 0:
        raise InvalidInput(f"start_block must be an int >= 0, got {start_block!r}")


def to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 (round half to even, deterministic)."""
    x = ((frames[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()
