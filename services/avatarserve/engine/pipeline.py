"""Single-process streaming: the runners chained in order. This is the single-device mode and the reference
output that every distributed path must reproduce."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from .bundle import ModelBundle
from .runners import AudioEncoderRunner, BlockPayload, DecoderRunner, StageRunner, adaptive_sink_latent


@dataclass
class VideoBlock:
    block_index: int
    pts_ms: int
    frames: np.ndarray  # [frames_per_block, H, W, 3] uint8
    is_idle: bool
    latents: Optional[torch.Tensor] = None  # final clean latent [1, 16, F, h, w]


class SequentialPipeline:
    def __init__(self, bundle: ModelBundle):
        self.bundle = bundle
        st = bundle.stream
        self.stream = st
        self.audio = AudioEncoderRunner(bundle.audio, st)
        self.stages = [StageRunner(k, bundle.transformer, bundle.schedule, st) for k in range(bundle.schedule.num_steps)]
        self.decoder = DecoderRunner(bundle.vae, st, bundle.model_config.motion_frames)

    def stream_blocks(self, image, audio_chunks: Iterable[np.ndarray], prompt: str = "", seed: int = 0,
                      text: Optional[torch.Tensor] = None, session_id: Optional[str] = None) -> Iterator[VideoBlock]:
        """Generate video blocks as audio arrives. `audio_chunks` yields float32 mono PCM at the stream's sample
        rate; at the end the last partial block is padded with silence, so the output covers the audio rounded up
        to whole blocks."""
        sid = session_id or uuid.uuid4().hex
        if text is None:
            text = self.bundle.encode_prompt(prompt)
        sink = self.decoder.prepare_sink(image, text, seed)
        created: List = []
        try:
            self.audio.create(sid)
            created.append(self.audio)
            for stage in self.stages:
                stage.create(sid, sink)
                created.append(stage)
            self.decoder.create(sid, sink)
            created.append(self.decoder)
            for chunk in audio_chunks:
                self.audio.push(sid, np.asarray(chunk, dtype=np.float32))
                yield from self._drain(sid)
            self.audio.finish(sid)
            yield from self._drain(sid)
        finally:
            for runner in created:
                runner.close(sid)

    def _drain(self, sid: str) -> Iterator[VideoBlock]:
        while True:
            payload = self.audio.next_block(sid)
            if payload is None:
                return
            yield self.run_block(payload)

    def run_block(self, payload: BlockPayload) -> VideoBlock:
        return self.run_blocks([payload])[0]

    def run_blocks(self, payloads: Sequence[BlockPayload]) -> List[VideoBlock]:
        """One block each of several sessions: every denoising step runs them in one forward (`step_many`), and the
        VAE decodes them as one batch (`decode_many`). With one payload this is the plain sequential pipeline."""
        for stage in self.stages:
            stepped = stage.step_many(payloads)
            failed = next((r for r in stepped if isinstance(r, Exception)), None)
            if failed is not None:
                raise failed
            payloads = stepped
        for payload in payloads:
            aas = adaptive_sink_latent(self.stream, payload)
            if aas is not None:
                for stage in self.stages:
                    stage.set_aas_latent(payload.session_id, aas)
        decoded = self.decoder.decode_many(payloads)
        failed = next((r for r in decoded if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed
        return [VideoBlock(p.block_index, p.pts_ms, frames, p.is_idle, p.latents) for p, frames in zip(payloads, decoded)]

    def generate(self, image, audio: np.ndarray, prompt: str = "", seed: int = 0, chunk_samples: int = 3200,
                 text: Optional[torch.Tensor] = None) -> List[VideoBlock]:
        """Offline convenience: stream a whole PCM array in chunks and collect the blocks."""
        audio = np.asarray(audio, dtype=np.float32)
        chunks = (audio[i:i + chunk_samples] for i in range(0, len(audio), chunk_samples))
        return list(self.stream_blocks(image, chunks, prompt=prompt, seed=seed, text=text))
