"""Stage handlers: the engine runners behind the gRPC data plane (one per deployment kind).

A handler adapts wire items to engine payloads and back; it never redoes model math. Model work runs on a
one compute thread per replica (a stage's accelerator does one forward at a time, and torch kernels are not
re-entrant friendly), while the data-plane event loop keeps moving other sessions' messages. That thread belongs to
the replica's `StageScheduler` (engine/scheduler.py): blocks run earliest deadline first (the gateway stamps each
block's deadline, `DEADLINE_KEY`), a denoise stage runs the ready blocks of up to `scheduling.max_batch` sessions in
one forward and the VAE decoder decodes them as one batch, and session setup and teardown run ahead of blocks.

Items on the wire, per block:
  gateway -> AudioEncoder   tensors {pcm: float32 [samples_per_block]}, metadata {idle}
  AudioEncoder -> Stage0    tensors {audio: float32 [1, L, C, frames_per_block]}
  StageK -> StageK+1 / VAE  tensors {audio, latents: [1, 16, F, h, w] (model dtype)}
  VaeDecoder -> gateway     tensors {jpeg: uint8 (frames concatenated), jpeg_sizes: int64 [T], h264: uint8}
  control (last stage -> stages 0..3): kind "aas", tensors {latent: [1, 16, 1, h, w]}
Session options (output formats, JPEG quality) arrive once, as JSON in the Open header's config bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from avatarserve.engine.bundle import ModelBundle, build_bundle
from avatarserve.engine.errors import BlockOrderError, EngineError, InvalidInput, SessionExists, SessionNotFound
from avatarserve.model.text_encoder import PromptError
from avatarserve.engine.runners import AudioEncoderRunner, BlockPayload, DecoderRunner, StageRunner, adaptive_sink_latent
from avatarserve.engine.sink import synthetic_sink
from avatarserve.engine.scheduler import BatchReport, StageScheduler, sessions_by_memory
from avatarserve.serve.config import ModelSection, RedisTimeouts, format_validation_error, resolve_redis_url
from avatarserve.serve.control.redis_client import RedisOutage, RedisUnavailableError
from avatarserve.serve.dataplane.media import encode_h264_block, encode_jpeg_frames
from avatarserve.serve.control.session_store import SessionStore, StoreError, sink_to_bytes
from avatarserve.serve.dataplane.transport import (DEADLINE_KEY, REPLAY_KEY, START_BLOCK_KEY, BlockItem, ControlBoard,
                                                  ControlItem, ErrorCode, StageError)

log = logging.getLogger(__name__)

AAS_KIND = "aas"


class InvalidItem(StageError):
    code = ErrorCode.INVALID_ARGUMENT


class SessionStateError(StageError):
    code = ErrorCode.ALREADY_EXISTS


class StoreUnavailable(StageError):
    code = ErrorCode.UNAVAILABLE


def _stage_error(exc: BaseException) -> BaseException:
    """Engine errors -> wire error codes."""
    if isinstance(exc, (InvalidInput, BlockOrderError, PromptError)):
        return InvalidItem(str(exc))
    if isinstance(exc, SessionExists):
        return SessionStateError(str(exc))
    if isinstance(exc, SessionNotFound):
        err = StageError(str(exc))
        err.code = ErrorCode.PROTOCOL
        return err
    if isinstance(exc, StoreError):
        return StoreUnavailable(str(exc))
    return exc


class EngineHandlerConfig(BaseModel):
    """What serve/builder.py passes an engine handler (`StageSpec.handler_config`); every value comes from the
    `AppConfig`, so nothing here has a default of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: ModelSection
    redis_url: Optional[str]  # None: REDIS_URL / REDIS_PASSWORD of this process (serve/config.py resolve_redis_url)
    namespace: str
    session_ttl_s: float = Field(gt=0)
    redis: RedisTimeouts  # timeouts.redis: the store's client, outages
    torch_threads: int = Field(ge=1)
    max_batch: int = Field(ge=1, description="scheduling.max_batch for denoise stages and the VAE decoder, 1 for the "
                                             "audio encoder.")
    utilization: float = Field(gt=0, le=1, description="scheduling.utilization.")
    batch_linger_s: float = Field(ge=0, le=1, description="scheduling.batch_linger_s.")
    step: Optional[int] = Field(None, ge=0, description="Denoise stages only: the denoising step it runs.")
    aas_wait_s: Optional[float] = Field(None, gt=0, description="Denoise stages only: timeouts.aas_wait_s.")

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> "EngineHandlerConfig":
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as exc:
            raise HandlerConfigError(format_validation_error(exc, "handler_config")) from exc


class HandlerConfigError(StageError, ValueError):
    code = ErrorCode.INVALID_ARGUMENT


class _EngineHandler:
    """Shared plumbing: the model bundle of this replica, the session store, the compute executor."""

    components: tuple = ()

    def __init__(self, config: Mapping[str, Any]):
        self.config = EngineHandlerConfig.parse(config)
        model = self.config.model
        self.bundle: ModelBundle = build_bundle(
            model.config, checkpoint=model.checkpoint, seed=model.seed, device=model.device,
            dtype=getattr(torch, model.dtype), stream_overrides=model.stream_overrides, components=self.components)
        self.stream = self.bundle.stream
        self.name = self.config.name
        torch.set_num_threads(self.config.torch_threads)
        self._metrics: Any = None
        self.scheduler = StageScheduler(self._measured_batch, max_batch=self.config.max_batch,
                                        block_seconds=self.stream.block_seconds, utilization=self.config.utilization,
                                        batch_linger_s=self.config.batch_linger_s,
                                        name=self.name, on_batch=self._on_batch)
        self._store: Optional[SessionStore] = None
        self.session_options: Dict[str, dict] = {}
        # Accelerator memory per session (its state allocation, measured at its creation) and the most a batch
        # took beyond what was allocated before it; CUDA only (a CPU replica's sessions live in host RAM).
        self._cuda = torch.device(model.device).type == "cuda"
        self.session_bytes: Optional[int] = None
        self.activation_bytes = 0

    @property
    def store(self) -> SessionStore:
        # Created lazily on the data-plane loop (redis.asyncio clients bind to the loop that uses them).
        if self._store is None:
            self._store = SessionStore.from_url(resolve_redis_url(self.config.redis_url), namespace=self.config.namespace,
                                                ttl_s=self.config.session_ttl_s, redis_options=self.config.redis)
        return self._store

    async def _run(self, fn, *args):
        """`fn(*args)` on the compute thread, ahead of queued blocks (session setup and teardown)."""
        try:
            return await asyncio.wrap_future(self.scheduler.call(fn, *args))
        except (EngineError, PromptError) as exc:
            raise _stage_error(exc) from exc

    async def _block(self, session_id: str, item: BlockItem, work: Any):
        """One block's work on the compute thread, earliest deadline first (`_batch` runs it)."""
        try:
            return await asyncio.wrap_future(self.scheduler.submit(session_id, work, block_deadline(item)))
        except (EngineError, PromptError) as exc:
            raise _stage_error(exc) from exc

    def _batch(self, works: List[Any]) -> List[Any]:
        """Blocks of different sessions taken together: here one after the other (`(fn, args)` each); a denoise
        stage runs them in one forward, the VAE decoder in one batched decode."""
        out: List[Any] = []
        for fn, args in works:
            try:
                out.append(fn(*args))
            except Exception as exc:  # noqa: BLE001 - that block's own failure
                out.append(exc)
        return out

    def attach_metrics(self, metrics: Any) -> None:
        self._metrics = metrics

    def _on_batch(self, report: BatchReport) -> None:
        m = self._metrics
        if m is None:
            return
        m.observe("avatarserve_stage_batch_size", report.size)
        m.inc("avatarserve_stage_deadline_misses", report.misses)
        for slack in report.slacks_s:
            m.observe("avatarserve_stage_deadline_slack_seconds", slack)

    def _measured_batch(self, works: List[Any]) -> Sequence[Any]:
        """`_batch`, recording on CUDA the activation memory it took (peak minus allocated before)."""
        if not self._cuda:
            return self._batch(works)
        device = torch.device(self.config.model.device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = self._batch(works)
        self.activation_bytes = max(self.activation_bytes, torch.cuda.max_memory_allocated(device) - before)
        return out

    def _session_state_bytes(self, session_id: str) -> Optional[int]:
        """Bytes of a session's state on this replica (a denoise stage's KV cache, the decoder's causal cache)."""
        return None

    def _measure_session(self, session_id: str) -> None:
        if self._cuda and self.session_bytes is None:
            self.session_bytes = self._session_state_bytes(session_id)

    def memory_capacity(self) -> Optional[int]:
        """Sessions this replica's accelerator memory holds (None on CPU, or before its first session)."""
        if not self._cuda or not self.session_bytes:
            return None
        device = torch.device(self.config.model.device)
        free, _ = torch.cuda.mem_get_info(device)
        # memory this process's caching allocator holds but no tensor uses is free for new sessions too
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return sessions_by_memory(free_bytes=free, live_sessions=self.live_sessions(),
                                  session_bytes=self.session_bytes, activation_bytes=self.activation_bytes)

    # ----- measuring the stage before its first session ------------------------------------------------------
    def measure_costs(self) -> None:
        """Time this stage's batch on synthetic sessions at batch 1 and `max_batch` (each size once untimed first:
        allocator and kernel warm-up), on the compute thread, so its real-time capacity is known before the first
        session arrives; live blocks refine it. Blocking, no time limit (a slow machine takes longer, not fails)."""
        self.scheduler.call(self._measure_costs).result()

    def _measure_costs(self) -> None:
        # max_batch sessions, made at the block from which the adaptive sink is in force (so no block re-prefills
        # the sink inside a timed forward); each size runs once untimed (allocator, kernels), then once timed.
        st = self.stream
        start = st.aas_after_blocks if st.adaptive_sink else 0
        sids = [f"{MEASURE_PREFIX}{i}" for i in range(self.config.max_batch)]
        next_block: Dict[str, int] = {}

        def run(batch: List[str]) -> float:
            works = [self._synthetic_work(sid, next_block[sid]) for sid in batch]
            t0 = time.perf_counter()
            results = self._measured_batch(works)
            seconds = time.perf_counter() - t0
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed
            for sid in batch:
                next_block[sid] += 1
            return seconds

        try:
            for sid in sids:
                self._synthetic_session(sid, start)
                next_block[sid] = start
                self._measure_session(sid)
            for n in sorted({1, len(sids)}):
                run(sids[:n])
                self.scheduler.costs.record(n, run(sids[:n]))
        finally:
            for sid in next_block:
                self.runner.close(sid)

    def _synthetic_sink(self):
        cfg = self.bundle.model_config
        # (the text is zero-padded to text_len in the model: its length does not change the cost)
        return synthetic_sink(cfg.in_dim, cfg.motion_latent_frames, cfg.text_dim, self.stream,
                              text_tokens=min(32, cfg.text_len))

    def _synthetic_session(self, session_id: str, start_block: int) -> None:
        raise NotImplementedError

    def _synthetic_work(self, session_id: str, block_index: int) -> Any:
        raise NotImplementedError

    def realtime_capacity(self) -> Optional[int]:
        """Real-time sessions this replica can serve: by its measured step cost, and no more than its accelerator
        memory holds (None before anything was measured)."""
        known = [c for c in (self.scheduler.realtime_capacity(), self.memory_capacity()) if c is not None]
        return min(known) if known else None

    def shutdown(self) -> None:
        self.scheduler.close()

    async def _sink(self, session_id: str):
        try:
            return await self.store.get_sink(session_id)
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def _options(self, session_id: str, config: bytes) -> dict:
        try:
            opts = json.loads(config.decode() or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidItem(f"session config is not JSON: {exc}") from exc
        if not isinstance(opts, dict):
            raise InvalidItem("session config must be a JSON object")
        start = opts.get(START_BLOCK_KEY, 0)
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise InvalidItem(f"session config {START_BLOCK_KEY!r} must be an int >= 0, got {start!r}")
        self.session_options[session_id] = opts
        return opts

    @staticmethod
    def _start_block(opts: dict) -> int:
        return int(opts.get(START_BLOCK_KEY, 0))

    def live_sessions(self) -> int:
        return len(self.session_options)

    async def close_session(self, session_id: str) -> None:
        self.session_options.pop(session_id, None)
        try:
            self.runner.close(session_id)
        except SessionNotFound:
            pass


class AudioEncoderHandler(_EngineHandler):
    components = ("audio",)

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.runner = AudioEncoderRunner(self.bundle.audio, self.stream)

    async def open_session(self, session_id: str, config: bytes) -> None:
        opts = self._options(session_id, config)
        await self._run(self.runner.create, session_id, self._start_block(opts))

    def _synthetic_session(self, session_id: str, start_block: int) -> None:
        self.runner.create(session_id, start_block)

    def _synthetic_work(self, session_id: str, block_index: int) -> Any:
        pcm = 0.1 * np.random.default_rng(0).standard_normal(self.stream.samples_per_block).astype(np.float32)
        return self._encode, (session_id, pcm)

    def _encode(self, session_id: str, pcm: np.ndarray) -> Optional[BlockPayload]:
        self.runner.push(session_id, pcm)
        return self.runner.next_block(session_id)

    async def process(self, session_id: str, item: BlockItem) -> list:
        pcm = item.tensor("pcm").numpy()
        if pcm.dtype != np.float32 or pcm.ndim != 1 or pcm.size != self.stream.samples_per_block:
            raise InvalidItem(f"block {item.block_index}: pcm must be float32 [{self.stream.samples_per_block}], "
                              f"got {pcm.dtype} {list(pcm.shape)}")
        payload = await self._block(session_id, item, (self._encode, (session_id, np.array(pcm))))
        if payload is None or payload.block_index != item.block_index:
            raise InvalidItem(f"audio encoder out of step at block {item.block_index}")
        return [BlockItem(block_index=item.block_index, pts_ms=item.pts_ms, metadata=dict(item.metadata),
                          tensors={"audio": payload.audio.numpy()})]


class DenoiseStageHandler(_EngineHandler):
    components = ("transformer",)

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        if self.config.step is None or self.config.aas_wait_s is None:
            raise HandlerConfigError(f"{self.name}: a denoise stage needs handler_config.step and aas_wait_s")
        self.step = self.config.step
        b = self.bundle
        self.runner = StageRunner(self.step, b.transformer, b.schedule, self.stream)
        self.board = ControlBoard()
        self.aas_wait_s = self.config.aas_wait_s
        self._aas_writes: Dict[str, asyncio.Task] = {}  # adaptive-sink latents Redis did not take yet (retried)
        self._aas_outage = RedisOutage(f"{self.name} (adaptive-sink latent store)",
                                       consequence="streams go on; the latent is stored once Redis is back")

    async def open_session(self, session_id: str, config: bytes) -> None:
        opts = self._options(session_id, config)
        sink = await self._sink(session_id)
        self.board.open(session_id)
        await self._run(self.runner.create, session_id, sink, self._start_block(opts))
        self._measure_session(session_id)

    def _session_state_bytes(self, session_id: str) -> Optional[int]:
        return self.runner.sessions.get(session_id).cache.nbytes()

    def _synthetic_session(self, session_id: str, start_block: int) -> None:
        self.runner.create(session_id, self._synthetic_sink(), start_block)

    def _synthetic_work(self, session_id: str, block_index: int) -> Any:
        cfg, st = self.bundle.model_config, self.stream
        g = torch.Generator().manual_seed(1)
        audio = 0.1 * torch.randn(1, cfg.audio_num_layers, cfg.audio_dim, st.frames_per_block, generator=g)
        latents = None if self.runner.is_first else torch.randn((1,) + st.latent_shape(cfg.in_dim), generator=g)
        return BlockPayload(session_id=session_id, block_index=block_index, pts_ms=0, audio=audio, latents=latents,
                            steps_done=self.step)

    async def on_control(self, session_id: str, item: ControlItem) -> None:
        self.board.publish(session_id, item)

    def _batch(self, works: List[Any]) -> Sequence[Any]:
        return self.runner.step_many(works)  # the blocks of different sessions in one forward

    async def process(self, session_id: str, item: BlockItem) -> list:
        b = item.block_index
        if self.runner.needs_aas(session_id, b):
            if self.runner.is_last:
                raise InvalidItem(f"block {b} reached the last stage before block 0 (no adaptive-sink latent)")
            ctl = await self.board.wait_for(session_id, AAS_KIND, for_block=b, timeout_s=self.aas_wait_s)
            self.runner.set_aas_latent(session_id, _as_torch(ctl, "latent"))
        # Copies: wire tensors are views into message bytes (unaligned), and SIMD kernels chosen by alignment
        # would change results in the last bit, breaking equality with the sequential pipeline.
        audio = item.tensor("audio").torch().clone()
        latents = item.tensor("latents").torch().clone() if "latents" in item.tensors else None
        payload = BlockPayload(session_id=session_id, block_index=b, pts_ms=item.pts_ms, audio=audio,
                               latents=latents, steps_done=self.step)
        out = await self._block(session_id, item, payload)
        items: List[Any] = [BlockItem(block_index=b, pts_ms=item.pts_ms, metadata=dict(item.metadata),
                                      tensors={"audio": audio, "latents": out.latents})]
        aas = adaptive_sink_latent(self.stream, out) if self.runner.is_last else None
        if aas is not None:
            self.runner.set_aas_latent(session_id, aas)
            await self._store_aas(session_id, aas)
            items.append(ControlItem(kind=AAS_KIND, apply_from_block=self.stream.aas_after_blocks,
                                     tensors={"latent": aas}, origin=self.name))
        return items

    async def _store_aas(self, session_id: str, aas: torch.Tensor) -> None:
        """Store the adaptive-sink latent in the session's sink, for later streams of the session. This stream does
        not need it (every stage gets it over the data plane), so a Redis that is unreachable, or that lost the sink
        (the gateway writes it back), does not fail the stream: the write is retried in the background every
        `timeouts.redis.probe_s` (outage logged once), until stored or the sink stays missing for
        `write_back_grace_s` while Redis answers."""
        try:
            await self.store.set_aas_latent(session_id, aas)
        except StoreError as exc:
            if isinstance(exc, RedisUnavailableError):
                self._aas_outage.failed(exc)
            old = self._aas_writes.pop(session_id, None)
            if old is not None:
                old.cancel()
            self._aas_writes[session_id] = asyncio.get_running_loop().create_task(
                self._retry_store_aas(session_id, aas), name=f"{session_id}/aas-store")

    async def _retry_store_aas(self, session_id: str, aas: torch.Tensor) -> None:
        o = self.config.redis
        missing_since: Optional[float] = None
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(o.probe_s)
                try:
                    await self.store.set_aas_latent(session_id, aas)
                except RedisUnavailableError:
                    missing_since = None
                    continue
                except StoreError as exc:  # Redis answers, the sink is not (yet) back
                    missing_since = missing_since if missing_since is not None else loop.time()
                    if loop.time() - missing_since >= o.write_back_grace_s:
                        log.warning("%s: session %s: adaptive-sink latent not stored: %s (for %.0f s)", self.name,
                                    session_id, exc, o.write_back_grace_s)
                        return
                    continue
                self._aas_outage.recovered()
                log.warning("%s: session %s: adaptive-sink latent stored after Redis came back", self.name, session_id)
                return
        finally:
            if self._aas_writes.get(session_id) is asyncio.current_task():
                self._aas_writes.pop(session_id, None)

    async def close_session(self, session_id: str) -> None:
        try:
            self.board.close(session_id)
        except Exception:  # noqa: BLE001 - a session that failed before its board opened
            pass
        await super().close_session(session_id)


def _as_torch(ctl: ControlItem, name: str) -> torch.Tensor:
    from avatarserve.serve.dataplane.transport import WireTensor

    return WireTensor.of(ctl.tensors[name]).torch()


class VaeDecoderHandler(_EngineHandler):
    """Streaming VAE decode per session; also turns a reference image + prompt into a sink (session setup)."""

    components = ("vae", "text")

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.runner = DecoderRunner(self.bundle.vae, self.stream, self.bundle.model_config.motion_frames)

    def prepare(self, image: bytes, prompt: str, seed: int) -> bytes:
        """Reference image + prompt -> serialized SinkState (reference/motion latents, text embeddings)."""
        text = self.bundle.encode_prompt(prompt)
        return sink_to_bytes(self.runner.prepare_sink(image, text, int(seed)))

    async def prepare_async(self, image: bytes, prompt: str, seed: int) -> bytes:
        return await self._run(self.prepare, image, prompt, seed)

    async def open_session(self, session_id: str, config: bytes) -> None:
        opts = self._options(session_id, config)
        sink = await self._sink(session_id)
        await self._run(self.runner.create, session_id, sink, self._start_block(opts))
        self._measure_session(session_id)

    def _session_state_bytes(self, session_id: str) -> Optional[int]:
        return self.runner.sessions.get(session_id).state.nbytes()

    def _synthetic_session(self, session_id: str, start_block: int) -> None:
        self.runner.create(session_id, self._synthetic_sink(), start_block)

    def _synthetic_work(self, session_id: str, block_index: int) -> Any:
        g = torch.Generator().manual_seed(2)
        latents = torch.randn((1,) + self.stream.latent_shape(self.bundle.model_config.in_dim), generator=g)
        payload = BlockPayload(session_id=session_id, block_index=block_index, pts_ms=0, audio=torch.zeros(0),
                               latents=latents)
        return session_id, payload, False  # encoded as a real block is (JPEG at the default quality)

    def _batch(self, works: List[Any]) -> List[Any]:
        """(session, payload, replay) of different sessions: decoded as one batch where their streams allow, then
        each encoded."""
        decoded = self.runner.decode_many([payload for _, payload, _ in works])
        out: List[Any] = []
        for (session_id, _, replay), frames in zip(works, decoded):
            if isinstance(frames, Exception):
                out.append(frames)
                continue
            try:
                out.append(self._encode_frames(session_id, frames, replay))
            except Exception as exc:  # noqa: BLE001 - that block's own failure
                out.append(exc)
        return out

    def _encode_frames(self, session_id: str, frames: np.ndarray, replay: bool) -> Dict[str, np.ndarray]:
        if replay:  # a block replayed to rebuild the session after a replica loss: the caller already has it
            return {}
        opts = self.session_options.get(session_id, {})
        formats = opts.get("formats") or ["jpeg"]
        out: Dict[str, np.ndarray] = {}
        if "jpeg" in formats:
            jpegs = encode_jpeg_frames(frames, int(opts.get("jpeg_quality", 85)))
            out["jpeg"] = np.frombuffer(b"".join(jpegs), dtype=np.uint8)
            out["jpeg_sizes"] = np.array([len(j) for j in jpegs], dtype=np.int64)
        if "h264" in formats:
            out["h264"] = np.frombuffer(encode_h264_block(frames, self.stream.fps), dtype=np.uint8)
        if "rgb" in formats:
            out["rgb"] = frames
        return out

    async def process(self, session_id: str, item: BlockItem) -> list:
        payload = BlockPayload(session_id=session_id, block_index=item.block_index, pts_ms=item.pts_ms,
                               audio=torch.zeros(0), latents=item.tensor("latents").torch().clone())
        tensors = await self._block(session_id, item, (session_id, payload, item.metadata.get(REPLAY_KEY) == "1"))
        meta = dict(item.metadata)
        meta.update(num_frames=str(self.stream.frames_per_block), width=str(self.stream.width),
                    height=str(self.stream.height))
        return [BlockItem(block_index=item.block_index, pts_ms=item.pts_ms, metadata=meta, tensors=tensors)]


MEASURE_PREFIX = "measure:"  # ids of the synthetic sessions a replica times itself on (never registered)


def block_deadline(item: BlockItem) -> float:
    """The block's deadline (unix seconds) as the gateway stamped it; now when it is missing or malformed (a block
    sent by another client of the stage protocol: it runs before later deadlines, not after)."""
    raw = item.metadata.get(DEADLINE_KEY)
    try:
        value = float(raw) / 1000.0
    except (TypeError, ValueError):
        return time.time()
    return value if math.isfinite(value) else time.time()


# Factories for serve/deployments/stage.py's StageSpec.handler ("module:callable").
def audio_encoder(config: Mapping[str, Any]) -> AudioEncoderHandler:
    return AudioEncoderHandler(config)


def denoise_stage(config: Mapping[str, Any]) -> DenoiseStageHandler:
    return DenoiseStageHandler(config)


def vae_decoder(config: Mapping[str, Any]) -> VaeDecoderHandler:
    return VaeDecoderHandler(config)
