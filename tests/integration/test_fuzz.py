"""Hostile-input fuzzing of the public API on the real cluster (Ray Serve gRPC proxy, real Redis, tiny model).

Raw gRPC (the generated modules, not the SDK) sends well over a thousand malformed or hostile inputs to every RPC:
random bytes as the serialized request (identity serializers), huge, tiny, truncated and non-image reference images,
extreme options, random audio framing (odd byte counts, NaN/Inf f32, chunks over 1000 ms, empty and huge pcm),
random and non-monotonic seq/pts_ms, interleaved controls (INTERRUPT, END_OF_INPUT, END_OF_UTTERANCE, unknown kinds,
a second Hello), abrupt cancels at random points and foreign session ids/tokens. Inputs are drawn by hypothesis
(derandomized: the same inputs on every run; no shrinking: every violation is collected and reported at the end).

What must hold:
- every answer is a status code the proto documents for that RPC (protos/avatarserve/v1/avatar_service.proto:
  header + per-RPC comments), and the one its rules give for that input where they give one; never UNKNOWN or
  INTERNAL; CANCELLED only when this test cancelled the call itself (a call that reaches this test's own deadline
  counts as a hang);
- no Serve replica restarts (actor ids and pids of every replica and of the proxy, before vs after);
- a reference session streaming a fixed clip concurrently with the fuzzing produces exactly the same JPEG bytes as the
  same inputs streamed on the quiet cluster first (same seed => same video);
- the gateway replica's RSS stays flat after a warm-up pass: growth <= RSS_GROWTH_BOUND over the main pass (the
  proxy's is reported); inputs over BIG_INPUT_BYTES are sent in the warm-up pass only (see there);
- every session the fuzzer used can still be streamed afterwards (no leaked stream lock or pipeline).
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from avatarserve_client.v1 import avatar_service_pb2 as pb
from grpc_health.v1 import health_pb2

from .conftest import APP, png as _png

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SC = grpc.StatusCode
SERVICE = "/avatarserve.v1.AvatarService/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVICE_NAME = "avatarserve.v1.AvatarService"

SR = 16000
SAMPLES_PER_MS = SR // 1000
MAX_CHUNK_SAMPLES = SR  # 1000 ms
MAX_IMAGE_BYTES = 16 * 1024 * 1024
# A gap on the client's clock larger than this leaves more silence to buffer than the server may hold (its
# audio buffer): such chunks may only be refused (INVALID_ARGUMENT or RESOURCE_EXHAUSTED), never accepted. The
# fuzzer's ordinary gaps stay far below it; its extreme ones (hours to 2^63 ms) far above.
EXTREME_GAP_MS = 3_600_000

UNARY_DEADLINE_S = 60.0  # one unary call; a busy 2-core machine is slow, a healthy server never gets near it
STREAM_DEADLINE_S = 120.0  # one fuzz stream (at most ~20 s of audio); hitting it means the server hung
LOCK_RELEASE_WAIT_S = 30.0  # after a cancelled stream, how long its session's stream lock may take to come free
# One reference stream (6 blocks, ~2 s here). It shares the stages with the fuzzer's streams: a stage serves late
# blocks of different sessions in turn, so each of its blocks waits for at most one block of every other stream per
# stage. The bound keeps a starved or hung stream from running for the rest of the test.
REFERENCE_TIMEOUT_S = 300.0
RSS_GROWTH_BOUND = 0.05  # of the post-warm-up RSS
# Inputs of more than this many bytes (16 MiB images, 8 MiB pcm) go in the warm-up pass only: each one moves the
# allocator's high-water mark (glibc raises its mmap threshold after freeing a big block, so later big buffers come
# from the heap), which is not a leak and would drown one in noise.
BIG_INPUT_BYTES = 1 << 20

# Status codes each RPC documents (INVALID_ARGUMENT, "malformed request", applies to every RPC). grpc.health
# Check: SERVING/NOT_SERVING, NOT_FOUND for an unknown service (the gRPC health protocol).
DOCUMENTED: Dict[str, Set[grpc.StatusCode]] = {
    "CreateSession": {SC.OK, SC.INVALID_ARGUMENT, SC.RESOURCE_EXHAUSTED, SC.DEADLINE_EXCEEDED, SC.UNAVAILABLE},
    "GetSession": {SC.OK, SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.PERMISSION_DENIED},
    "CloseSession": {SC.OK, SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.PERMISSION_DENIED},
    "StreamSession": {SC.OK, SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.PERMISSION_DENIED, SC.FAILED_PRECONDITION,
                      SC.RESOURCE_EXHAUSTED, SC.UNAVAILABLE},
    "Check": {SC.OK, SC.INVALID_ARGUMENT, SC.NOT_FOUND},
}
IA = {SC.INVALID_ARGUMENT}

FUZZ = settings(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck), print_blob=False)


# ------------------------------------------------------------------------------------------------- bookkeeping


@dataclass
class Ledger:
    tried: Counter = field(default_factory=Counter)
    codes: Dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    violations: List[str] = field(default_factory=list)
    signatures: List[str] = field(default_factory=list)  # one per contract violation (notes have none)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, rpc: str, what: str, code: grpc.StatusCode, details: str, expected: Set[grpc.StatusCode],
              ours: Set[grpc.StatusCode] = frozenset()) -> None:
        """Record one answer. `ours`: codes this test caused on purpose (its own cancel)."""
        with self.lock:
            self.tried[rpc] += 1
            self.codes[rpc][code.name] += 1
            if code in ours:
                return
            allowed = expected & DOCUMENTED[rpc]
            if code not in allowed:
                self.violations.append(f"{rpc} <- {what}: got {code.name} ({details[:300]!r}); expected one of "
                                       f"{sorted(c.name for c in allowed)}")
                self.signatures.append(f"{rpc}: got {code.name} ({_generic(details)!r}), expected "
                                       f"{'/'.join(sorted(c.name for c in allowed))}")

    def grouped(self) -> List[Tuple[int, str, str]]:
        """(count, signature, first violation) per kind of violation, most frequent first."""
        first: Dict[str, str] = {}
        counts: Counter = Counter()
        for sig, text in zip(self.signatures, self.violations):
            counts[sig] += 1
            first.setdefault(sig, text)
        return [(n, sig, first[sig]) for sig, n in counts.most_common()]

    def note(self, msg: str) -> None:
        with self.lock:
            self.violations.append(msg)
            self.signatures.append(msg[:100])


def _generic(details: str) -> str:
    """A status message with its session ids and numbers blanked, to group violations of one kind."""
    import re

    return re.sub(r"\d+", "N", re.sub(r"[0-9a-f]{32}", "<sid>", details))[:100]


def _describe(raw: bytes, limit: int = 48) -> str:
    return f"{len(raw)} bytes {raw[:limit].hex()}{'...' if len(raw) > limit else ''}"


class Api:
    """Raw multicallables: bytes in, bytes out."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1),
                                                               ("grpc.max_receive_message_length", -1)])
        self._unary = {m: self.channel.unary_unary(SERVICE + m)
                       for m in ("CreateSession", "GetSession", "CloseSession")}
        self._unary["Check"] = self.channel.unary_unary(HEALTH_CHECK)
        self._stream = self.channel.stream_stream(SERVICE + "StreamSession")

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def md(sid: Optional[str] = None, application: Optional[str] = APP) -> List[Tuple[str, str]]:
        out = [("application", application)] if application is not None else []
        if sid and len(sid) < 256 and sid.isascii() and sid.isprintable():
            out.append(("session_id", sid))
        return out

    def unary(self, rpc: str, raw: bytes, md=None) -> Tuple[grpc.StatusCode, str, bytes]:
        try:
            resp, call = self._unary[rpc].with_call(raw, metadata=md if md is not None else self.md(),
                                                    timeout=UNARY_DEADLINE_S)
            return call.code(), call.details() or "", resp
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", b""

    def stream(self, msgs: Sequence[bytes], md, *, end: str = "half_close", cancel_after: int = 0,
               cancel_after_s: float = 1.0, deadline_s: float = STREAM_DEADLINE_S):
        """Send `msgs`, then half-close (`end="half_close"`), cancel as soon as they were handed over ("abrupt"), or
        cancel after `cancel_after` responses or `cancel_after_s` seconds ("cancel"). -> (code, details, responses,
        cancelled_by_us)."""
        release = threading.Event()
        handed = threading.Event()

        def requests():
            yield from msgs
            handed.set()
            if end != "half_close":
                release.wait(deadline_s)  # the request side stays open until we cancel

        call = self._stream(requests(), metadata=md, timeout=deadline_s)
        cancelled = threading.Event()

        def cancel():
            cancelled.set()
            call.cancel()

        timer = None
        if end == "abrupt":
            timer = threading.Thread(target=lambda: handed.wait(deadline_s) and cancel(), daemon=True)
            timer.start()
        elif end == "cancel":
            timer = threading.Timer(cancel_after_s, cancel)
            timer.start()
        out: List[pb.ServerMessage] = []
        try:
            for raw in call:
                out.append(pb.ServerMessage.FromString(raw))
                if end == "cancel" and len(out) >= cancel_after:
                    cancel()
            code, details = call.code(), call.details() or ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        finally:
            release.set()
            if isinstance(timer, threading.Timer):
                timer.cancel()
        return code, details, out, cancelled.is_set()


# ------------------------------------------------------------------------------------------------- inputs


def _img_bytes(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@dataclass(frozen=True)
class ImageCase:
    name: str
    data: bytes
    valid: bool  # True: a decodable PNG/JPEG the documented rules accept


def _images() -> List[ImageCase]:
    from PIL import Image

    valid_png = _png(3)
    rng = np.random.default_rng(5)
    noise = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    pad_to = lambda data, n: data + bytes(n - len(data))  # noqa: E731 - trailing bytes after IEND: still a valid PNG
    return [
        ImageCase("png 80x96", valid_png, True),
        ImageCase("jpeg 64x64", _img_bytes(noise, "JPEG", quality=80), True),
        ImageCase("png grayscale 64x64", _img_bytes(noise.convert("L"), "PNG"), True),
        ImageCase("png rgba 64x64", _img_bytes(noise.convert("RGBA"), "PNG"), True),
        ImageCase("png 4000x4000 solid", _img_bytes(Image.new("RGB", (4000, 4000), (120, 90, 60)), "PNG"), True),
        ImageCase("png exactly 16 MiB (padded)", pad_to(valid_png, MAX_IMAGE_BYTES), True),
        ImageCase("png 1x1", _img_bytes(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), False),
        ImageCase("empty", b"", False),
        ImageCase("png truncated", valid_png[: len(valid_png) // 2], False),
        ImageCase("png header only", valid_png[:33], False),
        ImageCase("not an image", b"this is not an image, it is a text file\n" * 20, False),
        ImageCase("gif 64x64", _img_bytes(noise.convert("P"), "GIF"), False),
        ImageCase("bmp 64x64", _img_bytes(noise, "BMP"), False),
        ImageCase("png 9000x9000 (decompression bomb)", _img_bytes(Image.new("L", (9000, 9000)), "PNG"), False),
        ImageCase("16 MiB + 1 random bytes", rng.integers(0, 256, MAX_IMAGE_BYTES + 1, dtype=np.uint8).tobytes(),
                  False),
        ImageCase("png padded to 16 MiB + 1", pad_to(valid_png, MAX_IMAGE_BYTES + 1), False),
    ]


def _options_valid(o: pb.SessionOptions) -> Optional[bool]:
    """True/False when the proto's rules decide; None when they leave it open (an unknown IdleMode)."""
    if (o.width or o.height) and (o.width, o.height) != (64, 64):  # tiny model: 64x64; give both or neither
        return False
    if not 0 <= o.jpeg_quality <= 100:
        return False
    if any(f not in (pb.OUTPUT_FORMAT_JPEG, pb.OUTPUT_FORMAT_H264) for f in o.output_formats):
        return False
    af = o.audio_format
    if af.encoding not in (0, 1, 2) or af.sample_rate_hz not in (0, SR) or af.channels not in (0, 1):
        return False
    if o.idle.mode not in (0, 1, 2):
        return None
    return True


U32 = st.sampled_from([0, 1, 2, 63, 64, 65, 128, 640, 2**31, 2**32 - 1])
OPTIONS = st.builds(
    lambda w, h, seed, formats, q, enc, rate, ch, mode, grace, idle_s, ret: pb.SessionOptions(
        width=w, height=h, seed=seed, output_formats=formats, jpeg_quality=q,
        audio_format=pb.AudioFormat(encoding=enc, sample_rate_hz=rate, channels=ch),
        idle=pb.IdleOptions(mode=mode, fill_grace_ms=grace, idle_timeout_s=idle_s), return_audio=ret),
    st.sampled_from([0, 0, 64, 64, 1, 63, 65, 128, 2**32 - 1]),
    st.sampled_from([0, 0, 64, 64, 1, 63, 65, 128, 2**32 - 1]),
    st.one_of(st.none(), st.sampled_from([0, 1, 2**31, 2**63, 2**64 - 1])),
    st.lists(st.sampled_from([1, 1, 2, 0, 3, 99, -1, 2**31 - 1]), max_size=3),
    st.sampled_from([0, 1, 50, 100, 101, 255, 2**32 - 1]),
    st.sampled_from([0, 1, 2, 3, 999, -7]), st.sampled_from([0, SR, SR, 8000, 48000, 2**32 - 1]),
    st.sampled_from([0, 1, 1, 2, 2**32 - 1]), st.sampled_from([0, 1, 2, 3, -5]), U32, U32, st.booleans())
PROMPTS = st.one_of(st.just(""), st.text(max_size=200), st.sampled_from(["a person talking", "\x00\x00", "é" * 3000]))


@dataclass
class Session:
    sid: str
    token: str
    encoding: str = "s16le"
    mode: str = "wait"
    dirty_at: float = 0.0  # last time a stream of it was cancelled (its stream lock is released asynchronously)
    history: List[str] = field(default_factory=list)  # its streams so far: "what -> code" (for violation reports)
    reported: bool = False  # a violation on it already carries its history


def _create(api: Api, *, image: bytes, seed: int, encoding: int = pb.AUDIO_ENCODING_PCM_S16LE,
            mode: int = pb.IDLE_MODE_WAIT_FOR_AUDIO, prompt: str = "a person talking") -> Session:
    req = pb.CreateSessionRequest(reference_image=image, prompt=prompt, options=pb.SessionOptions(
        seed=seed, jpeg_quality=90, audio_format=pb.AudioFormat(encoding=encoding),
        idle=pb.IdleOptions(mode=mode, idle_timeout_s=3600)))
    code, details, raw = api.unary("CreateSession", req.SerializeToString())
    assert code == SC.OK, f"helper CreateSession failed: {code.name} {details}"
    resp = pb.CreateSessionResponse.FromString(raw)
    return Session(resp.session_id, resp.session_token, "f32le" if encoding == pb.AUDIO_ENCODING_PCM_F32LE else "s16le",
                   "wait" if mode == pb.IDLE_MODE_WAIT_FOR_AUDIO else "fill")


def _close(api: Api, s: Session) -> Tuple[grpc.StatusCode, str]:
    code, details, _ = api.unary("CloseSession", pb.CloseSessionRequest(session_id=s.sid, session_token=s.token)
                                 .SerializeToString(), md=api.md(s.sid))
    return code, details


# ------------------------------------------------------------------------------------------------- streams


def _msg(**kw) -> bytes:
    return pb.ClientMessage(**kw).SerializeToString()


def _hello(sid: str, token: str) -> bytes:
    return _msg(hello=pb.Hello(session_id=sid, session_token=token))


def _control(kind: int) -> bytes:
    return _msg(control=pb.Control(kind=kind))


def _audio(seq: int, pts_ms: int, pcm: bytes) -> bytes:
    return _msg(audio=pb.AudioChunk(seq=seq, pts_ms=pts_ms, pcm=pcm))


class StreamModel:
    """What the proto's rules say about a sequence of ClientMessages after an accepted Hello: `definite` is set at the
    first message they reject (the stream must end INVALID_ARGUMENT); `open_ended` when they leave the answer open
    (audio after an INTERRUPT may fall before the INTERRUPTED pts, which the client does not know in advance;
    messages after END_OF_INPUT; a gap too large to buffer: INVALID_ARGUMENT or RESOURCE_EXHAUSTED)."""

    def __init__(self, encoding: str):
        self.encoding = encoding
        self.last_seq = -1
        self.real_end = 0  # client clock, samples
        self.interrupted = False
        self.input_ended = False
        self.definite: Optional[str] = None
        self.open_ended: Set[grpc.StatusCode] = set()
        self.audio_samples = 0

    def _reject(self, why: str) -> None:
        if self.definite is None and not self.input_ended:
            self.definite = why

    def message(self, raw: bytes) -> None:
        if self.definite is not None:
            return
        if self.input_ended:  # the server may stop reading at END_OF_INPUT; what follows may be ignored or refused
            self.open_ended |= {SC.OK, SC.INVALID_ARGUMENT}
            return
        try:
            msg = pb.ClientMessage.FromString(raw)
        except Exception:  # noqa: BLE001 - not a ClientMessage
            return self._reject("undecodable ClientMessage")
        kind = msg.WhichOneof("kind")
        if kind is None:
            return self._reject("empty ClientMessage")
        if kind == "hello":
            return self._reject("second Hello")
        if kind == "control":
            k = msg.control.kind
            if k == pb.Control.KIND_INTERRUPT:
                self.interrupted = True
            elif k == pb.Control.KIND_END_OF_INPUT:
                self.input_ended = True
            elif k != pb.Control.KIND_END_OF_UTTERANCE:
                self._reject(f"unknown control kind {k}")
            return
        a = msg.audio
        if a.seq <= self.last_seq:
            return self._reject(f"seq {a.seq} after {self.last_seq}")
        self.last_seq = a.seq
        size = 4 if self.encoding == "f32le" else 2
        if len(a.pcm) % size:
            return self._reject(f"{len(a.pcm)} pcm bytes, not a multiple of {size}")
        if size == 4 and len(a.pcm) and not np.isfinite(np.frombuffer(a.pcm, "<f4")).all():
            return self._reject("NaN/Inf f32")
        n = len(a.pcm) // size
        if n > MAX_CHUNK_SAMPLES:
            return self._reject(f"chunk of {n / SR * 1000:.0f} ms")
        if a.pts_ms < 0:
            return self._reject(f"negative pts_ms {a.pts_ms}")
        if not n:
            return  # keep-alive
        start = a.pts_ms * SAMPLES_PER_MS
        if start < self.real_end - SAMPLES_PER_MS:
            return self._reject(f"pts_ms {a.pts_ms} overlaps audio up to {self.real_end / SAMPLES_PER_MS:.0f} ms")
        if start - self.real_end > EXTREME_GAP_MS * SAMPLES_PER_MS:
            self.open_ended |= {SC.INVALID_ARGUMENT, SC.RESOURCE_EXHAUSTED}
            self.definite = "gap too large to buffer"  # nothing after it is judged
            return
        if self.interrupted:
            self.open_ended |= {SC.OK, SC.INVALID_ARGUMENT}
        self.real_end = max(start, self.real_end) + n
        self.audio_samples += n

    def expected(self) -> Set[grpc.StatusCode]:
        if self.definite == "gap too large to buffer":
            return {SC.INVALID_ARGUMENT, SC.RESOURCE_EXHAUSTED}
        if self.definite is not None:
            return set(IA)
        return self.open_ended | {SC.OK}


# pcm recipes: (name, s16 or f32 or any, n samples spec)
PCM_KINDS = ["speech", "speech", "speech", "noise", "empty", "odd bytes", "over 1000 ms", "exactly 1000 ms", "huge",
             "nan", "inf", "loud f32"]


def _pcm(kind: str, encoding: str, n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    f32 = encoding == "f32le"
    if kind == "empty":
        return b""
    if kind == "odd bytes":
        return rng.integers(0, 256, 2 * n + 1 if not f32 else 4 * n + int(rng.integers(1, 4)), dtype=np.uint8).tobytes()
    if kind == "over 1000 ms":
        n = MAX_CHUNK_SAMPLES + 1 + int(rng.integers(0, 4000))
    elif kind == "exactly 1000 ms":
        n = MAX_CHUNK_SAMPLES
    elif kind == "huge":
        n = 4 * 1024 * 1024  # 8-16 MB of pcm, 262 s
    t = np.arange(n) / SR
    if kind == "noise":
        x = rng.standard_normal(n) * 0.3
    else:
        x = 0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    x = x.astype(np.float32)
    if f32:
        if kind in ("nan", "inf") and n:
            x[int(rng.integers(0, n))] = np.nan if kind == "nan" else (np.inf if rng.random() < 0.5 else -np.inf)
        if kind == "loud f32":
            x = x * 1e30  # finite, far outside [-1, 1]: clipped, not rejected
        return x.astype("<f4").tobytes()
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


SEQ_MODES = ["next", "next", "next", "next", "jump", "same", "lower", "max"]
PTS_MODES = ["contiguous", "contiguous", "contiguous", "gap", "rounding", "overlap", "negative", "extreme"]
CONTROL_KINDS = [pb.Control.KIND_INTERRUPT, pb.Control.KIND_END_OF_UTTERANCE, pb.Control.KIND_END_OF_INPUT,
                 pb.Control.KIND_UNSPECIFIED, 99, -1]
OP = st.one_of(
    st.tuples(st.just("audio"), st.sampled_from(SEQ_MODES), st.sampled_from(PTS_MODES), st.sampled_from(PCM_KINDS),
              st.integers(0, 3200), st.integers(0, 2**16)),
    st.tuples(st.just("audio"), st.sampled_from(["next"]), st.sampled_from(["contiguous"]), st.just("speech"),
              st.integers(160, 1600), st.integers(0, 2**16)),
    st.tuples(st.just("control"), st.sampled_from(CONTROL_KINDS)),
    st.tuples(st.just("hello_again"),),
    st.tuples(st.just("empty_message"),),
    st.tuples(st.just("junk"), st.binary(max_size=64)),
)


def _ops_to_messages(ops, encoding: str) -> Tuple[List[bytes], List[str]]:
    """Turn drawn ops into wire messages following (or breaking) the seq/pts rules as drawn."""
    msgs, names = [], []
    seq, end_ms = -1, 0
    for op in ops:
        if op[0] == "audio":
            _, seq_mode, pts_mode, kind, n, seed = op
            seq = {"next": seq + 1, "jump": seq + 1 + seed, "same": max(seq, 0), "lower": max(seq - 1 - seed % 5, 0),
                   "max": 2**64 - 1}[seq_mode]
            seq = min(seq, 2**64 - 1)
            pts = {"contiguous": end_ms, "gap": end_ms + seed % 1500, "rounding": max(end_ms - 1, 0),
                   "overlap": end_ms - 2 - seed % 400, "negative": -1 - seed,
                   "extreme": [10**10, 2**62, 2**63 - 1][seed % 3]}[pts_mode]
            pcm = _pcm(kind, encoding, n, seed)
            msgs.append(_audio(seq, pts, pcm))
            names.append(f"audio(seq={seq},pts={pts},{kind},{len(pcm)}B)")
            size = 4 if encoding == "f32le" else 2
            if len(pcm) % size == 0 and len(pcm) and pts >= 0 and pts < 2**40:
                end_ms = max(end_ms, pts + (len(pcm) // size) // SAMPLES_PER_MS)
        elif op[0] == "control":
            msgs.append(_control(op[1]))
            names.append(f"control({op[1]})")
        elif op[0] == "hello_again":
            msgs.append(_hello("0" * 32, "x"))
            names.append("hello")
        elif op[0] == "empty_message":
            msgs.append(b"")
            names.append("ClientMessage{}")
        else:
            msgs.append(op[1])
            names.append(f"junk({op[1].hex()})")
    return msgs, names


def _check_stream_output(ledger: Ledger, what: str, code, out: List[pb.ServerMessage], hello_ok: bool) -> None:
    """Invariants of what a stream delivered: STARTED first, block indices increasing, END_OF_STREAM before OK."""
    if hello_ok and out:
        first = out[0]
        if first.WhichOneof("kind") != "status" or first.status.kind != pb.StatusEvent.KIND_STARTED:
            ledger.note(f"StreamSession <- {what}: first message is not STARTED: {first}")
    blocks = [m.video.block_index for m in out if m.WhichOneof("kind") == "video"]
    if blocks != sorted(set(blocks)):
        ledger.note(f"StreamSession <- {what}: block indices not increasing: {blocks}")
    if code == SC.OK and (not out or out[-1].WhichOneof("kind") != "status"
                          or out[-1].status.kind != pb.StatusEvent.KIND_END_OF_STREAM):
        ledger.note(f"StreamSession <- {what}: ended OK without END_OF_STREAM last")


# ------------------------------------------------------------------------------------------------- cluster probes


def _replicas() -> Dict[str, Tuple[str, int]]:
    """Actor name -> (actor id, pid) of every live Serve actor (replicas, proxy, controller)."""
    from ray._private import state  # the GCS actor table: works without the dashboard (the state API needs it)

    out = {}
    for a in state.actors().values():
        name = a.get("Name") or ""
        if a.get("State") == "ALIVE" and name.startswith("SERVE_"):
            out[name] = (a["ActorID"], int(a["Pid"]))
    return out


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _pid_of(actors: Dict[str, Tuple[str, int]], needle: str) -> int:
    pids = [pid for name, (_, pid) in actors.items() if needle in name]
    assert len(pids) == 1, f"expected one actor matching {needle!r}: {sorted(actors)}"
    return pids[0]


# ------------------------------------------------------------------------------------------------- reference session

REF_IMAGE_SEED, REF_SEED, REF_BLOCKS = 7, 4242, 6


def _ref_speech() -> bytes:
    n = REF_BLOCKS * 7680
    t = np.arange(n) / SR
    rng = np.random.default_rng(11)
    x = 0.3 * (np.sin(2 * np.pi * 3 * t) > 0) * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(n)
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def _stage_statuses() -> Dict[str, object]:
    """Every stage replica's status (sessions, queues, scheduler) and the gateway's stream tasks with the awaits they
    are suspended in: what a failed reference run is reported with."""
    from ray import serve

    out: Dict[str, object] = {}
    try:  # where the gateway's stream tasks wait (the stream side of a stuck run)
        tasks = serve.get_deployment_handle("Gateway", app_name=APP).debug_tasks.remote().result(timeout_s=60)
        out["Gateway"] = [t for t in tasks if any(m in a for a in t["awaiting"]
                                                  for m in ("servicer.py", "stream_controller.py", "recovery.py"))]
    except Exception as exc:  # noqa: BLE001 - a diagnostic: report what could not be read
        out["Gateway"] = f"{type(exc).__name__}: {exc}"
    for name in serve.status().applications[APP].deployments:
        if name in ("Gateway", "SinkFrameCache"):
            continue
        try:
            out[name] = serve.get_deployment_handle(name, app_name=APP).status.remote().result(timeout_s=60)
        except Exception as exc:  # noqa: BLE001 - a diagnostic: report what could not be read
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def _reference_run(api: Api, image: bytes, pcm: bytes) -> List[Tuple[int, int, Tuple[bytes, ...]]]:
    s = _create(api, image=image, seed=REF_SEED)
    try:
        msgs = [_hello(s.sid, s.token)]
        step = 100 * SAMPLES_PER_MS * 2
        for i, off in enumerate(range(0, len(pcm), step)):
            msgs.append(_audio(i, i * 100, pcm[off:off + step]))
        msgs.append(_control(pb.Control.KIND_END_OF_INPUT))
        code, details, out, _ = api.stream(msgs, api.md(s.sid), deadline_s=REFERENCE_TIMEOUT_S)
        assert code == SC.OK, f"reference stream failed: {code.name} {details}"
        return [(m.video.block_index, m.video.pts_ms, tuple(m.video.jpeg_frames)) for m in out
                if m.WhichOneof("kind") == "video"]
    finally:
        _close(api, s)


# ------------------------------------------------------------------------------------------------- the test


@pytest.mark.timeout(1800)  # cluster start-up (shared) + a few minutes of fuzzing on a busy 2-core machine
def test_public_api_survives_hostile_inputs(cluster, redis_server, capsys):
    import redis

    api = Api(cluster)
    ledger = Ledger()
    images = _images()
    valid_images = [c for c in images if c.valid and len(c.data) < 1_000_000]
    ref_image, ref_pcm = _png(REF_IMAGE_SEED), _ref_speech()
    t_start = time.monotonic()

    # 1. the reference video on the quiet cluster
    quiet = _reference_run(api, ref_image, ref_pcm)
    assert len(quiet) == REF_BLOCKS and all(len(f) == 12 for _, _, f in quiet), quiet
    actors_before = _replicas()
    gateway_pid, proxy_pid = _pid_of(actors_before, "#Gateway#"), _pid_of(actors_before, "SERVE_PROXY_ACTOR")

    pool = [_create(api, image=valid_images[0].data, seed=1),
            _create(api, image=valid_images[1].data, seed=2, mode=pb.IDLE_MODE_FILL_SILENCE),
            _create(api, image=valid_images[0].data, seed=3, encoding=pb.AUDIO_ENCODING_PCM_F32LE)]
    closed_victims: List[Session] = []
    replaced: List[str] = []  # pool sessions swapped out after a violation left them unusable

    def replace(old: Session) -> None:
        i = next(k for k, p in enumerate(pool) if p is old)
        enc = pb.AUDIO_ENCODING_PCM_F32LE if old.encoding == "f32le" else pb.AUDIO_ENCODING_PCM_S16LE
        mode = pb.IDLE_MODE_WAIT_FOR_AUDIO if old.mode == "wait" else pb.IDLE_MODE_FILL_SILENCE
        pool[i] = _create(api, image=valid_images[i % 2].data, seed=100 + len(replaced), encoding=enc, mode=mode)
        code, details = _close(api, old)
        ledger.check("CloseSession", "a pool session a violation left unusable", code, details, {SC.OK})
        replaced.append(old.sid)
    from ray import serve

    single_app = len(serve.status().applications) == 1

    # ----- fuzzers (each hypothesis example sends one input; every answer goes through the ledger) -------------

    def fuzz_raw(rpc: str, raw: bytes) -> None:
        parse = {"CreateSession": pb.CreateSessionRequest, "GetSession": pb.GetSessionRequest,
                 "CloseSession": pb.CloseSessionRequest, "Check": health_pb2.HealthCheckRequest}[rpc]
        try:
            req = parse.FromString(raw)
        except Exception:  # noqa: BLE001 - undecodable: the server must say INVALID_ARGUMENT
            req = None
        code, details, resp = api.unary(rpc, raw)
        if req is None:
            expected = set(IA)
        elif rpc == "CreateSession":
            expected = DOCUMENTED[rpc]  # it parsed: whatever the rules say about its content
        elif rpc == "Check":
            expected = {SC.OK} if req.service in ("", SERVICE_NAME) else {SC.NOT_FOUND}
        else:
            expected = {SC.INVALID_ARGUMENT, SC.NOT_FOUND} if not req.session_id else {SC.NOT_FOUND}
        ledger.check(rpc, f"raw {_describe(raw)}", code, details, expected)
        if rpc == "CreateSession" and code == SC.OK:
            r = pb.CreateSessionResponse.FromString(resp)
            _close(api, Session(r.session_id, r.session_token))

    def fuzz_raw_stream(raw_first: bytes, rest: List[bytes]) -> None:
        try:
            first = pb.ClientMessage.FromString(raw_first)
            kind = first.WhichOneof("kind")
        except Exception:  # noqa: BLE001
            kind = "undecodable"
        if kind == "hello":
            expected = {SC.INVALID_ARGUMENT, SC.NOT_FOUND} if not first.hello.session_id else {SC.NOT_FOUND}
        else:
            expected = set(IA)
        code, details, out, _ = api.stream([raw_first, *rest], api.md())
        ledger.check("StreamSession", f"raw first message {_describe(raw_first)} (+{len(rest)} raw)", code, details,
                     expected)

    fuzzers = []  # (body, examples in the main pass, strategies)

    def fuzzer(n: int, **strategies):
        def register(body):
            fuzzers.append((body, n, strategies))
            return body
        return register

    @fuzzer(500, rpc=st.sampled_from(["CreateSession", "GetSession", "CloseSession", "Check", "StreamSession"]),
            raw=st.one_of(st.binary(max_size=300), st.binary(min_size=1, max_size=8).map(lambda b: b * 40)),
            rest=st.lists(st.binary(max_size=40), max_size=3))
    def raw_bytes(rpc, raw, rest):
        if rpc == "StreamSession":
            fuzz_raw_stream(raw, rest)
        else:
            fuzz_raw(rpc, raw)

    @fuzzer(120, rpc=st.sampled_from(["CreateSession", "GetSession", "CloseSession", "Check"]),
           flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
           cut=st.one_of(st.none(), st.integers(0, 10**6)), tail=st.binary(max_size=16))
    def mutated(rpc, flips, cut, tail):
        """Bit-flipped / truncated / extended encodings of well-formed requests: they often still parse."""
        s = pool[0]
        base = {"CreateSession": pb.CreateSessionRequest(reference_image=valid_images[0].data[:200], prompt="p",
                                                         options=pb.SessionOptions(seed=1, jpeg_quality=50)),
                "GetSession": pb.GetSessionRequest(session_id=s.sid, session_token=s.token),
                "CloseSession": pb.CloseSessionRequest(session_id=s.sid, session_token=s.token + "x"),
                "Check": health_pb2.HealthCheckRequest(service=SERVICE_NAME)}[rpc].SerializeToString()
        raw = bytearray(base)
        for pos, x in flips:
            raw[pos % len(raw)] ^= x
        if cut is not None:
            raw = raw[: cut % (len(raw) + 1)]
        raw = bytes(raw) + tail
        if rpc == "CloseSession":  # never close the pool by accident: a mutated request must not carry its token
            try:
                req = pb.CloseSessionRequest.FromString(raw)
                if any(req.session_id == p.sid and req.session_token == p.token for p in pool):
                    return
            except Exception:  # noqa: BLE001
                pass
        if rpc in ("GetSession", "CloseSession"):
            try:
                req = (pb.GetSessionRequest if rpc == "GetSession" else pb.CloseSessionRequest).FromString(raw)
            except Exception:  # noqa: BLE001
                req = None
            code, details, _ = api.unary(rpc, raw)
            if req is None:
                expected = set(IA)
            else:
                owner = next((p for p in pool if p.sid == req.session_id), None)
                if owner is None:
                    expected = {SC.INVALID_ARGUMENT, SC.NOT_FOUND} if not req.session_id else {SC.NOT_FOUND}
                else:
                    expected = {SC.OK} if req.session_token == owner.token else {SC.PERMISSION_DENIED}
            ledger.check(rpc, f"mutated {_describe(raw)}", code, details, expected)
        else:
            fuzz_raw(rpc, raw)

    @fuzzer(150, image=st.sampled_from(images), options=OPTIONS, prompt=PROMPTS, drop_options=st.booleans())
    def create(image, options, prompt, drop_options):
        assume(big_inputs_ok[0] or len(image.data) <= BIG_INPUT_BYTES)
        req = pb.CreateSessionRequest(reference_image=image.data, prompt=prompt)
        if not drop_options:
            req.options.CopyFrom(options)
        verdict = True if drop_options else _options_valid(options)
        if not image.valid or verdict is False:
            expected = set(IA)
        elif verdict is None:
            expected = {SC.OK, SC.INVALID_ARGUMENT}
        else:
            expected = {SC.OK}
        code, details, raw = api.unary("CreateSession", req.SerializeToString())
        what = f"image={image.name!r} prompt={prompt[:20]!r}... options={'unset' if drop_options else options}"
        ledger.check("CreateSession", what.replace("\n", " "), code, details, expected)
        if code == SC.OK:
            r = pb.CreateSessionResponse.FromString(raw)
            if r.geometry.width != 64 or r.geometry.height != 64:
                ledger.note(f"CreateSession <- {what}: geometry {r.geometry}")
            c, d = _close(api, Session(r.session_id, r.session_token))
            ledger.check("CloseSession", "its own fresh session", c, d, {SC.OK})

    SID_KINDS = ["pool", "pool", "closed", "random hex", "random text", "empty", "huge", "pool + suffix", "glob"]
    TOKEN_KINDS = ["own", "own", "other pool", "random", "empty", "huge"]

    def ident(sid_kind: str, token_kind: str, i: int, text: str) -> Tuple[str, str, Optional[Session]]:
        s = pool[i % len(pool)]
        target = s if sid_kind == "pool" else None
        if sid_kind == "closed":
            if not closed_victims:
                v = _create(api, image=valid_images[0].data, seed=9)
                c, d = _close(api, v)
                assert c == SC.OK, f"helper CloseSession: {c.name} {d}"
                closed_victims.append(v)
            target = closed_victims[0]
        sid = {"pool": s.sid, "closed": target.sid if target else "", "random hex": f"{i:032x}",
               "random text": text, "empty": "", "huge": "a" * (1 << 20), "pool + suffix": s.sid + ":sink",
               "glob": "*"}[sid_kind]
        own = target.token if target is not None else s.token
        token = {"own": own, "other pool": pool[(i + 1) % len(pool)].token, "random": text or "t", "empty": "",
                 "huge": "t" * (1 << 20)}[token_kind]
        return sid, token, target

    @fuzzer(160, rpc=st.sampled_from(["GetSession", "CloseSession"]), sid_kind=st.sampled_from(SID_KINDS),
           token_kind=st.sampled_from(TOKEN_KINDS), i=st.integers(0, 2**20), text=st.text(max_size=80))
    def foreign(rpc, sid_kind, token_kind, i, text):
        sid, token, target = ident(sid_kind, token_kind, i, text)
        if rpc == "CloseSession" and target is not None and sid_kind == "pool" and token == target.token:
            token += "-not"  # the pool stays open: closing with the right token is covered by the victims below
        if sid_kind == "closed":
            expected = {SC.NOT_FOUND, SC.OK, SC.PERMISSION_DENIED} if token == target.token else \
                {SC.NOT_FOUND, SC.PERMISSION_DENIED}
        elif target is not None:
            expected = {SC.OK} if token == target.token else {SC.PERMISSION_DENIED}
        elif not sid:
            expected = {SC.INVALID_ARGUMENT, SC.NOT_FOUND}
        else:
            expected = {SC.NOT_FOUND}
        Req = pb.GetSessionRequest if rpc == "GetSession" else pb.CloseSessionRequest
        code, details, _ = api.unary(rpc, Req(session_id=sid, session_token=token).SerializeToString(), md=api.md(sid))
        ledger.check(rpc, f"session_id={sid_kind} ({sid[:40]!r}) token={token_kind}", code, details, expected)

    @fuzzer(60, service=st.one_of(st.sampled_from(["", SERVICE_NAME, "grpc.health.v1.Health", SERVICE_NAME + ".",
                                               "avatarserve.v1.avatarservice"]), st.text(max_size=100)),
           application=st.sampled_from([APP, APP, None, "no-such-app", ""]))
    def health(service, application):
        md = Api.md(application=application) if application is not None else []
        code, details, _ = api.unary("Check", health_pb2.HealthCheckRequest(service=service).SerializeToString(), md=md)
        expected = {SC.OK} if service in ("", SERVICE_NAME) else {SC.NOT_FOUND}
        if not single_app and application != APP:
            # "Ray Serve answers NOT_FOUND when `application` names no running application"; while the cluster runs
            # one application Serve routes every call to it, whatever `application` says.
            expected = {SC.NOT_FOUND} if application == "no-such-app" else expected | {SC.NOT_FOUND}
        ledger.check("Check", f"service={service[:40]!r} application={application!r}", code, details, expected)

    def stream_once(first_kind: str, s: Session, msgs: List[bytes], names: List[str], end: str, k: int, after_s: float):
        hello = {"valid": _hello(s.sid, s.token), "foreign token": _hello(s.sid, pool[(pool.index(s) + 1) % 3].token),
                 "unknown id": _hello("f" * 32, s.token), "empty id": _hello("", ""),
                 "audio first": _audio(0, 0, b"\x00\x00" * 160), "control first": _control(pb.Control.KIND_INTERRUPT),
                 "empty first": b""}[first_kind]
        model = StreamModel(s.encoding)
        for m in msgs:
            model.message(m)
        expected = {"valid": model.expected(), "foreign token": {SC.PERMISSION_DENIED}, "unknown id": {SC.NOT_FOUND},
                    "empty id": {SC.INVALID_ARGUMENT, SC.NOT_FOUND}, "audio first": set(IA),
                    "control first": set(IA), "empty first": set(IA)}[first_kind]
        what = f"{first_kind} hello on {s.encoding}/{s.mode} session, then [{', '.join(names)}], end={end}"
        if end == "cancel":
            what += f" after {k} responses or {after_s:.2f} s"
        deadline = time.monotonic() + LOCK_RELEASE_WAIT_S
        while True:
            code, details, out, cancelled = api.stream([hello, *msgs], api.md(s.sid), end=end, cancel_after=k,
                                                       cancel_after_s=after_s)
            # A cancelled stream's session lock is freed asynchronously on the server: a Hello right after it may
            # still find the stream open. Retry until the lock comes free (bounded).
            if (code == SC.FAILED_PRECONDITION and first_kind == "valid" and "already open" in details
                    and time.monotonic() < deadline):
                time.sleep(0.2)
                continue
            break
        if cancelled:
            s.dirty_at = time.monotonic()
        before = len(ledger.violations)
        ledger.check("StreamSession", what, code, details, expected, ours={SC.CANCELLED} if cancelled else set())
        if len(ledger.violations) > before and s.history and not s.reported:
            s.reported = True  # the first violation on a session says what its previous streams were
            ledger.violations[-1] += "\n    previous streams of this session (oldest first):\n      " + \
                "\n      ".join(s.history[-4:])
        s.history.append(f"{what} -> {code.name}{' (cancelled by the test)' if cancelled else ''} {details[:120]!r}")
        if first_kind == "valid" and code not in expected | {SC.CANCELLED, SC.PERMISSION_DENIED}:
            # Recorded above. The session may be unusable now (FAILED after an INTERNAL, or its pipeline state stuck
            # on a replica): later inputs get a fresh one, so one bug does not hide the others.
            replace(s)
        _check_stream_output(ledger, what, code, out, first_kind == "valid" and code != SC.PERMISSION_DENIED)

    @fuzzer(220, first_kind=st.sampled_from(["valid"] * 8 + ["foreign token", "unknown id", "empty id", "audio first",
                                                       "control first", "empty first"]),
           which=st.integers(0, 2), ops=st.lists(OP, max_size=8),
           end=st.sampled_from(["half_close", "half_close", "half_close", "abrupt", "cancel"]),
           k=st.integers(0, 6), after_s=st.floats(0.0, 1.0))
    def streams(first_kind, which, ops, end, k, after_s):
        assume(big_inputs_ok[0] or not any(op[0] == "audio" and op[3] == "huge" for op in ops))
        s = pool[which]
        msgs, names = _ops_to_messages(ops, s.encoding)
        stream_once(first_kind, s, msgs, names, end, k, after_s)

    def directed() -> None:
        """Every hostile stream input named in the brief at least once, whatever hypothesis draws."""
        speech = lambda enc, n=1600, seed=0: _pcm("speech", enc, n, seed)  # noqa: E731
        s16, fill, f32 = 0, 1, 2  # pool indices, resolved when each case runs (a violation may replace one)
        cases = [
            (s16, lambda s: [_audio(0, 10**10, speech("s16le"))], "gap of 10^10 ms"),
            (s16, lambda s: [_audio(0, 2**62, speech("s16le"))], "gap of 2^62 ms"),
            (fill, lambda s: [_audio(0, 2**63 - 1, speech("s16le"))], "gap of 2^63-1 ms"),
            (s16, lambda s: [_audio(0, -1, speech("s16le"))], "pts -1"),
            (s16, lambda s: [_audio(0, 0, b"\x01\x02\x03")], "3 bytes of s16"),
            (f32, lambda s: [_audio(0, 0, b"\x00" * 6)], "6 bytes of f32"),
            (f32, lambda s: [_audio(0, 0, _pcm("nan", "f32le", 1600, 1))], "NaN f32"),
            (f32, lambda s: [_audio(0, 0, _pcm("inf", "f32le", 1600, 2))], "Inf f32"),
            (f32, lambda s: [_audio(0, 0, _pcm("loud f32", "f32le", 1600, 2))], "finite f32 far outside [-1, 1]"),
            (s16, lambda s: [_audio(0, 0, _pcm("over 1000 ms", "s16le", 0, 3))], "chunk over 1000 ms"),
            (s16, lambda s: [_audio(0, 0, _pcm("exactly 1000 ms", "s16le", 0, 3))], "chunk of exactly 1000 ms"),
            (s16, lambda s: [_audio(0, 0, _pcm("huge", "s16le", 0, 3))], "8 MiB pcm"),
            (s16, lambda s: [_audio(0, 0, b""), _audio(1, 0, b"")], "empty pcm keep-alives"),
            (s16, lambda s: [_audio(5, 0, speech("s16le")), _audio(5, 100, speech("s16le"))], "repeated seq"),
            (s16, lambda s: [_audio(5, 0, speech("s16le")), _audio(4, 100, speech("s16le"))], "decreasing seq"),
            (s16, lambda s: [_audio(2**64 - 1, 0, speech("s16le")), _audio(0, 100, speech("s16le"))],
             "seq 2^64-1 then 0"),
            (s16, lambda s: [_audio(0, 500, speech("s16le")), _audio(1, 0, speech("s16le"))], "pts going back"),
            (fill, lambda s: [_audio(0, 0, speech("s16le")), _control(pb.Control.KIND_INTERRUPT),
                              _audio(1, 100, speech("s16le")), _control(pb.Control.KIND_END_OF_UTTERANCE)],
             "INTERRUPT mid-way"),
            (s16, lambda s: [_control(pb.Control.KIND_END_OF_UTTERANCE), _control(pb.Control.KIND_INTERRUPT),
                             _control(pb.Control.KIND_INTERRUPT)], "controls without audio"),
            (s16, lambda s: [_control(pb.Control.KIND_UNSPECIFIED)], "control KIND_UNSPECIFIED"),
            (s16, lambda s: [_control(99)], "unknown control kind 99"),
            (s16, lambda s: [_audio(0, 0, speech("s16le")), _hello(s.sid, s.token)], "second Hello (same session)"),
            (s16, lambda s: [b""], "empty ClientMessage"),
            (s16, lambda s: [b"\xff\xff\xff"], "undecodable ClientMessage"),
            (s16, lambda s: [_control(pb.Control.KIND_END_OF_INPUT), _audio(0, 0, speech("s16le"))],
             "audio after END_OF_INPUT"),
        ]
        for i, msgs, name in cases:
            if name == "8 MiB pcm" and not big_inputs_ok[0]:
                continue
            stream_once("valid", pool[i], msgs(pool[i]), [name], "half_close", 0, 0.0)
        one_s = [_audio(0, 0, speech("s16le", 16000))]
        stream_once("valid", pool[fill], one_s, ["1 s of speech"], "abrupt", 0, 0.0)
        stream_once("valid", pool[s16], one_s, ["1 s of speech"], "cancel", 1, 0.0)
        stream_once("valid", pool[s16], one_s, ["1 s of speech (after cancels)"], "half_close", 0, 0.0)

    # ----- run: a warm-up pass of every fuzzer, then RSS baseline, then the main pass with the reference running ----

    rss_trend: List[Dict[str, object]] = []
    big_inputs_ok = [True]  # warm-up pass only (BIG_INPUT_BYTES)

    def run_all(scale: float) -> None:
        directed()
        for body, n, strategies in fuzzers:  # a fresh hypothesis wrapper per pass (settings apply once per function)
            settings(FUZZ, max_examples=max(1, int(n * scale)))(given(**strategies)(body))()
            rss_trend.append({"after": f"{body.__name__} x{max(1, int(n * scale))}",
                              "gateway_mib": round(_rss(gateway_pid) / 2**20, 1),
                              "proxy_mib": round(_rss(proxy_pid) / 2**20, 1)})

    # The big inputs once each before the baseline, so the allocators' high-water marks are reached in warm-up.
    for case in images:
        code, details, raw = api.unary("CreateSession", pb.CreateSessionRequest(reference_image=case.data)
                                       .SerializeToString())
        ledger.check("CreateSession", f"image={case.name!r} (warm-up)", code, details, {SC.OK} if case.valid else IA)
        if code == SC.OK:
            r = pb.CreateSessionResponse.FromString(raw)
            _close(api, Session(r.session_id, r.session_token))
    run_all(0.5)  # warm-up: every fuzzer, so allocator pools and caches reach their working size first
    big_inputs_ok[0] = False
    rss0 = {"gateway": _rss(gateway_pid), "proxy": _rss(proxy_pid)}

    stop = threading.Event()
    ref_runs: List[List] = []
    ref_errors: List[str] = []
    ref_diagnostics: List[Dict[str, object]] = []

    ref_seconds: List[float] = []

    def reference_loop():
        ref_api = Api(cluster)
        try:
            while (not stop.is_set() or not ref_runs) and len(ref_errors) < 3:
                t = time.monotonic()
                try:
                    ref_runs.append(_reference_run(ref_api, ref_image, ref_pcm))
                except BaseException as exc:  # noqa: BLE001 - reported below
                    ref_errors.append(f"after {time.monotonic() - t:.0f} s: {type(exc).__name__}: {exc}")
                    try:
                        ref_diagnostics.append(_stage_statuses())
                    except Exception as diag_exc:  # noqa: BLE001
                        ref_diagnostics.append({"error": repr(diag_exc)})
                ref_seconds.append(round(time.monotonic() - t, 1))
        finally:
            ref_api.close()

    ref_thread = threading.Thread(target=reference_loop, name="reference-session", daemon=True)
    ref_thread.start()
    try:
        run_all(1.0)
    finally:
        stop.set()
        ref_thread.join(REFERENCE_TIMEOUT_S * 2)
    rss1 = {"gateway": _rss(gateway_pid), "proxy": _rss(proxy_pid)}

    # ----- afterwards: every pool session still streams (no leaked lock/pipeline), then close everything ----------
    for s in pool:
        msgs = [_audio(0, 0, _pcm("speech", s.encoding, 8000, 1)), _control(pb.Control.KIND_END_OF_INPUT)]
        stream_once("valid", s, msgs, ["audio(500 ms)", "END_OF_INPUT"], "half_close", 0, 0.0)
        code, details, raw = api.unary("GetSession", pb.GetSessionRequest(session_id=s.sid, session_token=s.token)
                                       .SerializeToString(), md=api.md(s.sid))
        ledger.check("GetSession", "pool session after the fuzzing", code, details, {SC.OK})
        if code == SC.OK:
            info = pb.SessionInfo.FromString(raw)
            if info.stream_open or info.state not in (pb.SESSION_STATE_IDLE, pb.SESSION_STATE_CREATED):
                ledger.note(f"GetSession after every stream of {s.sid} ended: state "
                            f"{pb.SessionState.Name(info.state)}, stream_open={info.stream_open} "
                            "(expected IDLE, False)")
        c, d = _close(api, s)
        ledger.check("CloseSession", "pool session at the end", c, d, {SC.OK})
    actors_after = _replicas()
    api.close()

    restarted = sorted(n for n, v in actors_before.items() if actors_after.get(n) != v)
    appeared = sorted(set(actors_after) - set(actors_before))
    growth = {k: (rss1[k] - rss0[k]) / rss0[k] for k in rss0}  # asserted for the gateway, reported for the proxy
    r = redis.Redis.from_url(redis_server.url)
    live_sessions = sorted(k.decode() for k in r.scan_iter(match="itest:session:*"))
    r.close()
    summary = {
        "inputs_per_rpc": dict(ledger.tried), "inputs_total": sum(ledger.tried.values()),
        "status_codes_per_rpc": {k: dict(v) for k, v in ledger.codes.items()},
        "replica_restarts": len(restarted), "restarted": restarted, "new_actors": appeared,
        "reference_runs_during_fuzzing": len(ref_runs), "reference_errors": ref_errors,
        "reference_run_seconds": ref_seconds,
        "rss_bytes_after_warmup": rss0, "rss_bytes_end": rss1,
        "rss_growth_pct": {k: round(100 * v, 2) for k, v in growth.items()}, "rss_trend": rss_trend,
        "redis_live_session_keys_at_end": live_sessions, "pool_sessions_replaced": len(replaced),
        "violations": len(ledger.violations), "seconds": round(time.monotonic() - t_start, 1),
    }
    with capsys.disabled():
        print("\n[fuzz] summary " + json.dumps(summary, indent=1))
        for n, sig, example in ledger.grouped():
            print(f"[fuzz] VIOLATION x{n}: {sig}\n    first: {example}")

    failures = []
    if sum(ledger.tried.values()) < 1000:
        failures.append(f"only {sum(ledger.tried.values())} inputs were sent")
    if restarted or appeared:
        failures.append(f"Serve actors restarted or replaced: {restarted} {appeared}")
    if ref_errors or not ref_runs:
        failures.append(f"the reference session failed during the fuzzing: {ref_errors}; stage replicas then: "
                        + json.dumps(ref_diagnostics, indent=1, default=str)[:20000])
    differing = [i for i, run in enumerate(ref_runs) if run != quiet]
    if differing:
        failures.append(f"reference runs {differing} of {len(ref_runs)} during the fuzzing differ from the quiet run")
    if growth["gateway"] > RSS_GROWTH_BOUND:
        failures.append(f"gateway RSS grew {100 * growth['gateway']:.1f}% ({rss0['gateway']} -> {rss1['gateway']} "
                        f"bytes) during the fuzzing (bound {100 * RSS_GROWTH_BOUND:.0f}%)")
    if ledger.violations:
        failures.append(f"{len(ledger.violations)} answers broke the API contract, by kind:\n" +
                        "\n".join(f"x{n} {sig}\n    first: {ex[:1500]}" for n, sig, ex in ledger.grouped()))
    assert not failures, "\n".join(failures)
