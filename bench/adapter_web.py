"""The browser adapter (`avatarserve web`) measured in a real headless Chromium; prints ONE JSON object.

    python bench/adapter_web.py --server 127.0.0.1:9000 --json [--chromium /usr/bin/chromium] [--screenshot web.png]

Runs the web server in this process against the cluster at --server, opens its page in headless
Chromium whose microphone is a WAV file (Chromium's fake capture device), talks to the avatar and
measures, on the page:

* ``fps``: frames presented by the <video> element (requestVideoFrameCallback's presentedFrames),
  per second, over the whole run (median of 1-second windows) and its minimum;
* ``latency``: the fake microphone's first speech sample entering the page (a recorder on the page's
  microphone track) -> the first frame of the first non-idle block presented (``audio_in_to_first_video_ms``,
  split into the server's part and the browser's);
* ``frame_match``: which frame of the server's video track each frame the page presented (drawn from
  the <video> into a canvas) is: RTP timestamps up to the sender's random origin, the origin by
  content (motion correlation), and the PSNR against what the server sent;
* ``lipsync``: the project's lip-sync metric (avatarserve.quality) over speech A between the page's
  frames and (a) ``page_vs_mic_wav``: the fake microphone's WAV as the page played it (each frame
  against the sound played during its 40 ms on screen), (b) ``stream_clock_vs_session_audio`` /
  ``stream_clock_vs_mic_wav``: the frames placed on the session's clock by what they show, against the
  audio the session had there / the WAV; references: the same window of ``avatarserve generate``
  output (the model offline, same WAV and face) and of the toy world's ground truth;
* ``av_sync``: on the page, a stream position's frame presented minus its sound played (the audio
  receiver's synchronization source, its packets identified by the RFC 6465 levels the server sent);
* ``interrupt``: the INTERRUPT button pressed while the avatar still shows speech the microphone has
  finished -> the first idle block shown (reported by the server over the data channel);
* ``screenshot``: a PNG of the page (CDP Page.captureScreenshot);
* ``sender`` / ``status`` / ``machine``: whether the machine let the page run in real time: how late the
  adapter's video track woke for each frame (and ``bridge.video_frames_skipped``: frames it skipped rather than
  send late), the browser's own video counters (received, decoded, freezes), and the share of the capture's
  wall time in which some task on the machine waited for a CPU (Linux PSI).

The microphone WAV (16 kHz mono PCM; Chromium converts it to its capture format): silence, speech
A (the lip-sync window), silence, speech B (cut by the INTERRUPT), silence. Speech is the toy
world's (espeak-ng), the face its held-out demo person.

The Chromium driver here is a minimal Chrome DevTools Protocol client over aiohttp's websocket.
"""

from __future__ import annotations

import argparse
import contextlib
import asyncio
import base64
import collections
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import aiohttp
import numpy as np

CHROMIUM = os.environ.get("AVATARSERVE_CHROMIUM", "/usr/bin/chromium")
SAMPLE_RATE = 16000
FPS = 25
FRAME_MS = 1000.0 / FPS
SPEECH_RMS = 0.01  # a 10 ms window above this RMS (-40 dBFS) is speech; the file's silences are digital zero
AUDIO_RMS = 3e-4  # above this (-70 dBFS) a 10 ms window holds audio at all (the utterance's first sample)


class BrowserError(RuntimeError):
    """Chromium did not start, a DevTools command failed, or the page reported an error."""


# --------------------------------------------------------------------------------------------------
# A minimal Chrome DevTools Protocol client


class Chromium:
    """Headless Chromium with a fake microphone, driven over the DevTools protocol (one page)."""

    def __init__(self, *, binary: str = CHROMIUM, mic_wav: Optional[str] = None, loop_mic: bool = False,
                 extra_flags: tuple = (), window: tuple = (1100, 760)) -> None:
        self.binary = binary
        self.mic_wav = mic_wav
        self.loop_mic = loop_mic
        self.extra_flags = tuple(extra_flags)
        self.window = window
        self.proc: Optional[subprocess.Popen] = None
        self.profile: Optional[str] = None
        self._http: Optional[aiohttp.ClientSession] = None
        self._ws: Optional[aiohttp.ClientWebSocketResponse] = None
        self._reader: Optional[asyncio.Task] = None
        self._next_id = 0
        self._pending: Dict[int, asyncio.Future] = {}
        self.session_id: Optional[str] = None
        self.console: List[str] = []  # page console messages and exceptions
        self.stderr_tail: "collections.deque[str]" = collections.deque(maxlen=300)  # Chromium's own log

    def flags(self) -> List[str]:
        flags = [
            "--headless=new", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--remote-debugging-port=0", "--remote-allow-origins=*",
            f"--user-data-dir={self.profile}", f"--window-size={self.window[0]},{self.window[1]}",
            # WebRTC media without a person: auto-accept the permission prompt, fake capture devices
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            "--autoplay-policy=no-user-gesture-required",
            # keep timers and rendering running at full rate in a headless, unfocused window
            "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
        ]
        if self.mic_wav:
            flags.append(f"--use-file-for-fake-audio-capture={self.mic_wav}{'' if self.loop_mic else '%noloop'}")
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        return flags + list(self.extra_flags) + ["about:blank"]

    async def start(self, timeout: float = 60.0) -> "Chromium":
        if not shutil.which(self.binary) and not os.path.exists(self.binary):
            raise BrowserError(f"Chromium not found at {self.binary!r} (set AVATARSERVE_CHROMIUM)")
        self.profile = tempfile.mkdtemp(prefix="avatarserve-chromium-")
        self.proc = subprocess.Popen([self.binary, *self.flags()], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        ws_url = await asyncio.wait_for(asyncio.to_thread(self._devtools_url), timeout)
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(ws_url, max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        targets = await self.send("Target.getTargets")
        page = next((t for t in targets["targetInfos"] if t["type"] == "page"), None)
        if page is None:
            page = await self.send("Target.createTarget", url="about:blank")
        target_id = page["targetId"]
        self.session_id = (await self.send("Target.attachToTarget", targetId=target_id, flatten=True))["sessionId"]
        await self.page("Runtime.enable")
        await self.page("Page.enable")
        return self

    def _devtools_url(self) -> str:
        assert self.proc is not None and self.proc.stderr is not None
        lines = []
        for line in self.proc.stderr:
            lines.append(line)
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                # keep draining stderr (Chromium must never block on a full pipe); keep its tail for errors
                self.stderr_tail.extend(lines)
                _drain(self.proc.stderr, self.stderr_tail)
                return m.group(1)
        raise BrowserError(f"Chromium exited (code {self.proc.wait()}) before DevTools listened:\n"
                           f"{''.join(lines)[-3000:]}")

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        err = data["error"]
                        fut.set_exception(BrowserError(f"{err.get('message')} {err.get('data', '')}"))
                    else:
                        fut.set_result(data.get("result", {}))
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                text = details.get("exception", {}).get("description", details.get("text"))
                self.console.append(f"exception: {text}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrowserError("the DevTools connection closed"))

    async def send(self, method: str, session_id: Optional[str] = None, **params: Any) -> Dict[str, Any]:
        if self._ws is None or self._ws.closed:
            raise BrowserError("not connected to Chromium")
        self._next_id += 1
        msg: Dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session_id:
            msg["sessionId"] = session_id
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = fut
        await self._ws.send_str(json.dumps(msg))
        return await fut

    async def page(self, method: str, **params: Any) -> Dict[str, Any]:
        return await self.send(method, self.session_id, **params)

    async def evaluate(self, expression: str, *, await_promise: bool = True) -> Any:
        """Evaluate JavaScript in the page; returns its JSON value (raises BrowserError on a JS exception)."""
        result = await self.page("Runtime.evaluate", expression=expression, awaitPromise=await_promise,
                                 returnByValue=True, userGesture=True)
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise BrowserError(f"JavaScript error: {d.get('exception', {}).get('description', d.get('text'))}")
        return result.get("result", {}).get("value")

    async def goto(self, url: str, timeout: float = 30.0) -> None:
        await self.page("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while await self.evaluate("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not finish loading in {timeout} s")
            await asyncio.sleep(0.05)

    async def screenshot(self, path: str) -> str:
        data = await self.page("Page.captureScreenshot", format="png")
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(data["data"]))
        return path

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed:
            try:
                await asyncio.wait_for(self.send("Browser.close"), 5.0)
            except (BrowserError, asyncio.TimeoutError, aiohttp.ClientError):
                pass
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        if self.proc is not None:
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)  # its own process group (start_new_session): only what we started
                await asyncio.to_thread(self.proc.wait)
        if self.profile:
            shutil.rmtree(self.profile, ignore_errors=True)

    async def __aenter__(self) -> "Chromium":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def _drain(stream: Any, tail: "collections.deque[str]") -> None:
    import threading

    threading.Thread(target=lambda: [tail.append(line) for line in stream], daemon=True).start()


# --------------------------------------------------------------------------------------------------
# Inputs: the fake microphone's WAV and the face


@dataclass
class MicInputs:
    """The fake microphone's WAV and where its speech is (seconds of the file)."""

    wav: str
    image: str
    pcm: np.ndarray  # float32, 16 kHz mono: the file's samples
    segments: Dict[str, tuple]  # "A" / "B": (start_s, end_s), speech cut at frame (40 ms) boundaries
    reference: np.ndarray  # the face, uint8 HxWx3
    truth_frames: Optional[np.ndarray]  # the toy world's own video of segment A (uint8 [T, H, W, 3]), if known


def _speech_span(audio: np.ndarray, pad_s: float = 0.2) -> tuple:
    """First and last 40 ms frame of a clip holding speech, padded by `pad_s` (frame indices, end exclusive)."""
    frames = len(audio) // 640
    rms = np.sqrt(np.mean(audio[:frames * 640].reshape(frames, 640) ** 2, axis=1))
    loud = np.flatnonzero(rms > SPEECH_RMS)
    if not len(loud):
        raise ValueError("the clip has no speech")
    pad = int(round(pad_s * FPS))
    return max(0, int(loud[0]) - pad), min(frames, int(loud[-1]) + 1 + pad)


def make_inputs(out_dir: str, *, seed: Optional[int] = None, lead_s: float = 1.0, gap_s: float = 2.4,
                tail_s: float = 2.4) -> MicInputs:
    """Silence, speech A (person `seed`), silence, speech B (another voice), silence: a 16 kHz mono WAV."""
    from PIL import Image

    from avatarserve.toy.demo import DEMO_SEED
    from avatarserve.toy.world import make_clip

    seed = DEMO_SEED if seed is None else seed
    os.makedirs(out_dir, exist_ok=True)
    a = make_clip(seed, 4.0)
    b = make_clip(seed + 1, 2.0)
    a0, a1 = _speech_span(a.audio)
    b0, b1 = _speech_span(b.audio, pad_s=0.08)
    speech_a = a.audio[a0 * 640:a1 * 640]
    speech_b = b.audio[b0 * 640:b1 * 640]
    silence = lambda s: np.zeros(int(round(s * FPS)) * 640, dtype=np.float32)  # noqa: E731  (whole frames)
    parts = [silence(lead_s), speech_a, silence(gap_s), speech_b, silence(tail_s)]
    pcm = np.concatenate(parts).astype(np.float32)
    starts = np.cumsum([0] + [len(p) for p in parts]) / SAMPLE_RATE
    wav = os.path.join(out_dir, "mic.wav")
    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    image = os.path.join(out_dir, "face.png")
    Image.fromarray(a.reference_image).save(image)
    return MicInputs(wav=wav, image=image, pcm=pcm, segments={"A": (starts[1], starts[2]), "B": (starts[3], starts[4])},
                     reference=a.reference_image, truth_frames=a.frames[a0:a1])


def inputs_from(out_dir: str, image: bytes, pcm: np.ndarray, *, lead_s: float = 1.0, tail_s: float = 2.0) -> MicInputs:
    """A face and speech of one's own (int16 or float, 16 kHz mono) as the fake microphone: silence, the speech
    (segment A), silence."""
    from PIL import Image
    import io

    os.makedirs(out_dir, exist_ok=True)
    pcm = np.asarray(pcm)
    speech = (pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32)).reshape(-1)
    speech = np.concatenate([speech, np.zeros((-len(speech)) % 640, np.float32)])  # whole 40 ms frames
    lead = np.zeros(int(round(lead_s * FPS)) * 640, np.float32)
    audio = np.concatenate([lead, speech, np.zeros(int(round(tail_s * FPS)) * 640, np.float32)])
    wav = os.path.join(out_dir, "mic.wav")
    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    with Image.open(io.BytesIO(image)) as img:
        reference = np.asarray(img.convert("RGB"))
    path = os.path.join(out_dir, "face.png")
    Image.fromarray(reference).save(path)
    start = len(lead) / SAMPLE_RATE
    return MicInputs(wav=wav, image=path, pcm=audio, segments={"A": (start, start + len(speech) / SAMPLE_RATE)},
                     reference=reference, truth_frames=None)


async def measure_latency(address: str, image: bytes, pcm: np.ndarray, *, chromium: str = CHROMIUM,
                          application: Optional[str] = None, work_dir: Optional[str] = None) -> Dict[str, Any]:
    """Audio in -> first video frame out through the web adapter, measured in headless Chromium (one page).

    `pcm`: the utterance (int16, 16 kHz mono), played by Chromium's fake microphone after 1 s of silence;
    `image`: the face (PNG/JPEG bytes). Returns ``latency_ms`` (the utterance's first sample entering the page ->
    the first frame of the first non-idle block presented), its server and browser parts, fps and A/V skew.
    """
    work = work_dir or tempfile.mkdtemp(prefix="adapter-web-latency-")
    inputs = inputs_from(work, image, pcm)
    run = await run_page(address, inputs, chromium=chromium, application=application)
    result = analyse(run, inputs)
    lat = result["latency"]
    return {"latency_ms": lat.get("audio_in_to_first_video_ms"), "server_part_ms": lat.get("server_part_ms"),
            "browser_part_ms": lat.get("browser_part_ms"),
            "speech_onset_to_first_video_ms": lat.get("speech_onset_to_first_video_ms"),
            "fps": result["fps"]["median"], "av_sync": result.get("av_sync")}


def _stat(xs: List[float]) -> Dict[str, Optional[float]]:
    if not xs:
        return {"p50": None, "min": None, "max": None}
    return {"p50": round(float(np.percentile(xs, 50)), 1), "min": round(min(xs), 1), "max": round(max(xs), 1)}


async def run(address: str, image: bytes, pcm: np.ndarray, *, rounds: int = 1, application: Optional[str] = None,
              chromium: str = CHROMIUM) -> Dict[str, Any]:
    """`rounds` pages (a fresh browser and session each), one utterance each: latency statistics (bench/adapters.py)."""
    runs = [await measure_latency(address, image, pcm, chromium=chromium, application=application)
            for _ in range(rounds)]
    return {"metric": "first audio sample into the page (fake microphone) -> first speech frame presented",
            "first_frame_ms": _stat([r["latency_ms"] for r in runs if r["latency_ms"] is not None]),
            "server_part_ms": _stat([r["server_part_ms"] for r in runs if r["server_part_ms"] is not None]),
            "browser_part_ms": _stat([r["browser_part_ms"] for r in runs if r["browser_part_ms"] is not None]),
            "fps": _stat([r["fps"] for r in runs if r["fps"] is not None]), "runs": runs}


def measure(address: str, demo: Dict[str, Any], *, rounds: int = 1, application: Optional[str] = None,
            chromium: str = CHROMIUM) -> Dict[str, Any]:
    """bench/adapters.py's entry: `demo` is avatarserve.toy.demo.write_demo_inputs's dict (image and audio paths)."""
    from avatarserve_client.audio import read_wav

    with open(demo["image"], "rb") as fh:
        image = fh.read()
    pcm = read_wav(demo["audio"])  # float32, 16 kHz mono
    pcm16 = np.round(np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)
    return asyncio.run(run(address, image, pcm16, rounds=rounds, application=application, chromium=chromium))


# --------------------------------------------------------------------------------------------------
# Signal helpers


def _to_16k(x: np.ndarray, rate: int) -> np.ndarray:
    from avatarserve_client.audio import resample

    return resample(x, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else x.astype(np.float32)


def _envelope(x: np.ndarray, hop: int = 160) -> np.ndarray:
    n = len(x) // hop
    return np.sqrt(np.mean(x[:n * hop].reshape(n, hop) ** 2, axis=1)) if n else np.zeros(0)


def xcorr_lag(reference: np.ndarray, signal: np.ndarray, near: Optional[int] = None,
              radius: int = 3 * SAMPLE_RATE) -> tuple:
    """Where `reference` sits in `signal`: (lag in samples, normalised peak), from 10 ms envelopes then samples.

    `near`: only lags within `radius` samples of it are considered.
    """
    if near is not None:
        lo = max(0, near - radius)
        lag, peak = xcorr_lag(reference, signal[lo:near + len(reference) + radius])
        return lo + lag, peak
    def norm(v: np.ndarray) -> np.ndarray:
        v = v - v.mean()
        s = np.linalg.norm(v)
        return v / s if s > 0 else v

    def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # c[k] = sum a[i] b[i + k], k = -(len(a)-1) .. len(b)-1
        n = len(a) + len(b) - 1
        size = 1 << (n - 1).bit_length()
        c = np.fft.irfft(np.conj(np.fft.rfft(a, size)) * np.fft.rfft(b, size), size)
        return np.concatenate([c[size - (len(a) - 1):], c[:len(b)]]) if len(a) > 1 else c[:len(b)]

    ea, eb = norm(np.sqrt(_envelope(reference))), norm(np.sqrt(_envelope(signal)))
    c = corr(ea, eb)
    coarse = (int(np.argmax(c)) - (len(ea) - 1)) * 160
    # refine on the samples within +-30 ms of the envelope peak
    lo = max(0, coarse - 480)
    seg = signal[lo:lo + len(reference) + 960]
    if len(seg) < len(reference) // 2:
        return coarse, float(np.max(c))
    fine = corr(norm(reference), norm(seg))
    k = int(np.argmax(fine[len(reference) - 1:])) if len(fine) >= len(reference) else 0
    return lo + k, float(np.max(c))


def _record_to_array(rec: Dict[str, Any]) -> tuple:
    """A page audio recording -> (16 kHz float32 samples on the performance.now() clock, perf ms of sample 0).

    The recorder stamps chunks with the AudioContext's frame counter; the page sampled (context time,
    performance.now()) pairs every 50 ms. Their offset is smoothed over about a second and followed along the
    recording, so a context clock that drifts or stalls against performance.now() (a loaded machine, a fake
    audio device) still puts every sample where the page played it.
    """
    rate = rec["sample_rate"]
    chunks = rec["chunks"]
    if not chunks or not rec["clock"]:
        return np.zeros(0, np.float32), 0.0
    first = chunks[0]["frame"]
    arrays = [(c["frame"] - first, np.frombuffer(base64.b64decode(c["data"]), dtype=np.float32)) for c in chunks]
    raw = np.zeros(arrays[-1][0] + len(arrays[-1][1]), dtype=np.float32)
    for at, data in arrays:
        raw[at:at + len(data)] = data
    ctx = np.array([c["context"] for c in rec["clock"]])
    off = np.array([c["perf"] - 1000.0 * c["context"] for c in rec["clock"]])
    half = 10
    smooth = np.array([np.median(off[max(0, i - half):i + half + 1]) for i in range(len(off))])
    tau = (first + np.arange(0, len(raw) + 1, 160)) / rate  # context time every 160 samples
    perf = 1000.0 * tau + np.interp(tau, ctx, smooth)
    perf = np.maximum.accumulate(perf)
    t0 = float(perf[0])
    grid = t0 + np.arange(int((perf[-1] - t0) * SAMPLE_RATE / 1000.0)) * 1000.0 / SAMPLE_RATE
    index = (np.interp(grid, perf, tau) * rate - first)
    out = np.interp(index, np.arange(len(raw)), raw).astype(np.float32)
    return out, t0


def _first_loud(x: np.ndarray, threshold: float = SPEECH_RMS) -> Optional[int]:
    env = _envelope(x)
    idx = np.flatnonzero(env > threshold)
    return int(idx[0]) * 160 if len(idx) else None


def _near(signal: np.ndarray, reference: np.ndarray) -> Optional[int]:
    """Lag at which `reference`'s first speech meets `signal`'s first speech."""
    a, b = _first_loud(signal), _first_loud(reference)
    return None if a is None or b is None else max(0, a - b)


# --------------------------------------------------------------------------------------------------
# The measurement in the browser


@dataclass
class PageRun:
    """Everything collected from one run of the page."""

    status: Dict[str, Any]
    timing: Dict[str, float]
    frames: List[Dict[str, Any]]  # captured presented frames (image decoded)
    messages: List[Dict[str, Any]]
    mic: Optional[tuple]  # (16 kHz samples, perf ms of sample 0)
    mic_opened_at: float
    interrupt_clicked_at: Optional[float]
    interrupt_shown_idle_at: Optional[float]
    interrupt_state: str
    sent: List[Dict[str, Any]]
    received: List[Dict[str, Any]]
    placeholder: np.ndarray
    stream_started_wall: Optional[float]
    bridge_stats: Dict[str, Any]
    playout: Dict[str, Any]
    screenshot: Optional[str]
    console: List[str] = field(default_factory=list)
    playout_levels: List[Dict[str, Any]] = field(default_factory=list)  # getSynchronizationSources of the audio
    sent_audio: List[Dict[str, Any]] = field(default_factory=list)  # the server's audio frames (level, stream pos)
    # share of the capture's wall time in which some runnable task on the machine waited for a CPU (Linux PSI)
    cpu_stall: Optional[float] = None


def _cpu_stall_us() -> Optional[float]:
    """Linux pressure stall information: total microseconds in which some runnable task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return float(line.split("total=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


async def _poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BrowserError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


async def run_page(server: str, inputs: MicInputs, *, chromium: str = CHROMIUM, application: Optional[str] = None,
                   jitter_ms: float = 200.0, seed: Optional[int] = 0, screenshot: Optional[str] = None,
                   connect_timeout: float = 180.0, progress: Callable[[str], None] = lambda s: None) -> PageRun:
    """Open the page in headless Chromium, talk (the WAV), press INTERRUPT during speech B, collect everything."""
    # Plain host candidates (aiortc resolves no mDNS), on the loopback interface only: this machine's traffic stays
    # on 127.0.0.1 (Chromium: --allow-loopback-in-peer-connection; aiortc: loopback_ice_candidates()).
    flags = ("--disable-features=WebRtcHideLocalIpsWithMdns", "--allow-loopback-in-peer-connection")
    with loopback_ice_candidates():
        return await _run_page(server, inputs, chromium, application, jitter_ms, seed, screenshot, connect_timeout,
                               progress, flags)


@contextlib.contextmanager
def loopback_ice_candidates():
    """While active, aiortc (aioice) offers only 127.0.0.1 as its host candidate and ignores the browser's
    candidates on other addresses, so every ICE check and all media stay on the loopback interface. aioice leaves
    loopback out on purpose (real peers are on other hosts); a test with both peers on this machine needs it."""
    import ipaddress

    import aioice.ice

    gather, add_remote = aioice.ice.get_host_addresses, aioice.ice.Connection.add_remote_candidate

    async def loopback_remote_only(self, candidate):
        if candidate is not None:
            try:
                if not ipaddress.ip_address(candidate.host).is_loopback:
                    return
            except ValueError:  # an mDNS name: not loopback
                return
        await add_remote(self, candidate)

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else []
    aioice.ice.Connection.add_remote_candidate = loopback_remote_only
    try:
        yield
    finally:
        aioice.ice.get_host_addresses, aioice.ice.Connection.add_remote_candidate = gather, add_remote


async def _run_page(server: str, inputs: "MicInputs", chromium: str, application: Optional[str], jitter_ms: float,
                    seed: Optional[int], screenshot: Optional[str], connect_timeout: float,
                    progress: Callable[[str], None], flags: tuple) -> "PageRun":
    from avatarserve_client.web import WebServer

    with open(inputs.image, "rb") as fh:
        image_b64 = base64.b64encode(fh.read()).decode()
    async with WebServer(server, application=application, jitter_ms=jitter_ms, seed=seed, record=True,
                         create_timeout=connect_timeout) as web:
        async with Chromium(binary=chromium, mic_wav=inputs.wav, extra_flags=flags) as br:
            try:
                return await _drive(web, br, inputs, image_b64, screenshot, connect_timeout, progress)
            except BaseException:
                progress("chromium log tail:\n" + "".join(l for l in list(br.stderr_tail)[-40:] if "dbus" not in l))
                progress("page console: " + " | ".join(br.console[-20:]))
                raise


async def _drive(web: Any, br: Chromium, inputs: MicInputs, image_b64: str, screenshot: Optional[str],
                 connect_timeout: float, progress: Callable[[str], None]) -> PageRun:
    ev = br.evaluate
    await br.goto(web.url + "?aec=0&ns=0&agc=0")
    progress("page loaded; connecting")
    await ev(f"window.avatarserve.start({{deferMicrophone: true, image: 'data:image/png;base64,{image_b64}'}})")

    async def connected() -> Any:
        s = await ev("window.avatarserve.status()")
        if s["error"]:
            raise BrowserError(f"the page reports: {s['error']}")
        return s["connection"] == "connected" and s["ice"] in ("connected", "completed") and s["frames"] > 0
    await _poll(connected, connect_timeout, "ICE connected and the first video frame")
    await ev("window.avatarserve.diag.startCapture()")
    stall_from, stall_t0 = _cpu_stall_us(), time.monotonic()
    await ev("window.avatarserve.diag.recordAudio(['mic'])")  # the avatar's audio: its receiver's playout

    async def idle_shown() -> Any:
        s = await ev("window.avatarserve.status()")
        return s["showing"] is not None
    await _poll(idle_shown, connect_timeout, "the first block shown")
    progress("connected, idle video shown; opening the microphone (the WAV starts)")
    mic_open = float(await ev("window.avatarserve.openMicrophone()"))

    # Speech A plays, then B. INTERRUPT once B has left the microphone while the avatar still shows B (and has
    # shown all of A): the button must cut B's remaining speech and bring idle video.
    bridge = web.app["history"][-1]
    origin = float(await ev("performance.timeOrigin"))

    def stream_ms(perf: float) -> float:  # the page's performance.now() -> the session's stream clock
        return 1000.0 * ((origin + perf) / 1000.0 - bridge.wall_offset - bridge.stream_started_at)

    clicked = shown_idle = None
    state = "not_pressed"
    if "B" not in inputs.segments:  # speech A only: wait until the page has shown all of it
        a_end = inputs.segments["A"][1]
        a_end_stream = stream_ms(mic_open + 1000.0 * a_end)

        async def a_shown() -> Any:
            pos = bridge.playout.position_ms()
            return pos is not None and pos >= a_end_stream + 500.0
        await _poll(a_shown, 120.0 + a_end, "the page showing all of the speech")
    else:
        b_start, b_end = inputs.segments["B"]
        b_start_stream = stream_ms(mic_open + 1000.0 * b_start)

        async def showing_b() -> Any:
            if await ev("performance.now()") < mic_open + 1000.0 * b_end + 100.0:
                return False
            pos = bridge.playout.position_ms()
            shown = bridge.playout.current
            if pos is not None and shown is not None and pos >= b_start_stream + 300.0 and not shown.is_idle:
                return True
            if pos is not None and pos > b_start_stream + 1000.0 * (b_end - b_start) + 1500.0:
                raise BrowserError("speech B was over on the page before INTERRUPT could be pressed")
            return False
        try:
            await _poll(showing_b, 120.0 + b_end, "the avatar showing speech B after the microphone finished it")
            clicked = float(await ev("document.getElementById('interrupt').click(), performance.now()"))
            state = "pressed"
            progress("INTERRUPT pressed")

            async def idle_after() -> Any:
                msgs = await ev(f"window.avatarserve.messages({clicked})")
                hit = [m for m in msgs if m["msg"].get("type") == "frame" and m["msg"].get("idle")]
                return hit[0]["t"] if hit else None
            shown_idle = float(await _poll(idle_after, 30.0, "idle video after INTERRUPT"))
            state = "idle_shown"
        except BrowserError as exc:
            progress(f"interrupt: {exc}")
            state = f"failed: {exc}"
    await asyncio.sleep(1.0)  # a little idle video after it
    count = await ev("window.avatarserve.diag.stopCapture()")
    stall_to = _cpu_stall_us()
    cpu_stall = (None if stall_from is None or stall_to is None
                 else (stall_to - stall_from) / 1e6 / max(1e-3, time.monotonic() - stall_t0))
    shot = await br.screenshot(screenshot) if screenshot else None
    frames: List[Dict[str, Any]] = []
    for start in range(0, count, 60):
        for f in await ev(f"window.avatarserve.diag.takeFrames({start}, 60)"):
            raw = np.frombuffer(base64.b64decode(f.pop("rgb")), dtype=np.uint8)
            f["image"] = raw.reshape(f["height"], f["width"], 3)
            frames.append(f)
    status = await ev("window.avatarserve.status()")
    messages = await ev("window.avatarserve.messages(0)")
    mic = await ev("window.avatarserve.diag.takeAudio('mic')")
    playout_levels = await ev("window.avatarserve.diag.takePlayout()")
    run = PageRun(status=status, timing=status["timing"], frames=frames, messages=messages,
                  mic=_record_to_array(mic) if mic else None,
                  mic_opened_at=mic_open, interrupt_clicked_at=clicked, interrupt_shown_idle_at=shown_idle,
                  interrupt_state=state, sent=list(bridge.sent), received=list(bridge.received),
                  sent_audio=list(bridge.sent_audio),
                  placeholder=bridge.video_track.placeholder,
                  stream_started_wall=(None if bridge.stream_started_at is None
                                       else bridge.stream_started_at + bridge.wall_offset),
                  bridge_stats=dict(bridge.stats, video_frames_skipped=bridge.video_track.frames_skipped),
                  playout={"underruns": bridge.playout.underruns, "jitter_ms": bridge.playout.jitter_ms,
                           "skipped_ms": bridge.playout.skipped_ms},
                  screenshot=shot, console=list(br.console), playout_levels=playout_levels, cpu_stall=cpu_stall)
    await ev("window.avatarserve.stop()")
    return run


# --------------------------------------------------------------------------------------------------
# Analysis


def _small_gray(images: np.ndarray, size: int = 16) -> np.ndarray:
    """[T, H, W] gray images box-averaged to about size x size."""
    x = images.astype(np.float32)
    t, h, w = x.shape
    fy, fx = max(1, h // size), max(1, w // size)
    x = x[:, :h // fy * fy, :w // fx * fx]
    return x.reshape(t, h // fy, fy, w // fx, fx).mean(axis=(2, 4))


def number_frames(frames: List[Dict[str, Any]], sent: List[Dict[str, Any]], placeholder: np.ndarray) -> Dict[str, Any]:
    """Which frame of the server's video track each captured frame is (n), by content.

    Within a run the RTP timestamps give every frame's number up to one constant (the sender's random RTP
    origin). The constant is the one under which the changes between consecutive captured frames correlate
    best with the changes between the frames the server sent under those numbers (the codec's own error is
    nearly the same in consecutive frames and cancels; a wrong constant pairs unrelated motion).
    """
    rtp = np.array([f["rtp"] for f in frames], dtype=np.int64)
    rel = (rtp - rtp[0]) % (1 << 32)
    if np.any(rel % 3600):
        raise ValueError("captured RTP timestamps are not whole 25 fps frames apart")
    k = rel // 3600
    by_n = {s["n"]: s for s in sent}
    n_max = max(by_n) + 1
    sent_img = np.stack([by_n[n]["image"] if n in by_n and by_n[n]["image"] is not None else placeholder
                         for n in range(n_max)])
    cap = np.stack([f["image"] for f in frames]).astype(np.float32).mean(axis=-1)
    ref = sent_img.astype(np.float32).mean(axis=-1)
    lo_c, hi_c = int(-k.min()), int(n_max - 1 - k.max())
    if hi_c < lo_c:
        raise ValueError("the page captured frames the server has no record of")
    # candidates: the 12 constants with the least mean squared error, and their neighbours
    small_cap, small_ref = _small_gray(cap), _small_gray(ref)
    mse = {c: float(np.mean((small_cap - small_ref[k + c]) ** 2)) for c in range(lo_c, hi_c + 1)}
    cands = sorted({c + d for c in sorted(mse, key=mse.get)[:12] for d in (-2, -1, 0, 1, 2) if lo_c <= c + d <= hi_c})
    pairs = np.flatnonzero(np.diff(k) == 1)  # consecutive frames both captured
    d_cap = (cap[pairs + 1] - cap[pairs]).reshape(len(pairs), -1)

    def motion_corr(c: int) -> float:
        d_ref = (ref[k[pairs + 1] + c] - ref[k[pairs] + c]).reshape(len(pairs), -1)
        # only pairs the server changed: a repeated frame (the playout holding while a block is late) has no motion
        # to follow, only the codec refining its last picture, which would dilute every constant's score alike
        moving = np.any(d_ref != 0, axis=1)
        a, b = d_cap[moving], d_ref[moving]
        den = float(np.sqrt(np.sum(a ** 2) * np.sum(b ** 2)))
        return float(np.sum(a * b) / den) if den > 0 else 0.0
    corr = {c: motion_corr(c) for c in cands}
    best = max(corr, key=corr.get)
    n = k + best
    full = np.stack([f["image"] for f in frames]).astype(np.float32)
    err = np.mean((full - sent_img[n].astype(np.float32)) ** 2, axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0 ** 2 / np.maximum(err, 1e-6))
    others = [v for c, v in corr.items() if c != best]
    return {"n": n, "offset": best, "motion_corr": round(corr[best], 3),
            "next_motion_corr": round(max(others), 3) if others else None, "pairs": int(len(pairs)),
            "psnr_median": float(np.median(psnr)), "psnr_p5": float(np.percentile(psnr, 5))}


def _fps(frames: List[Dict[str, Any]]) -> Dict[str, Any]:
    t = np.array([f["t"] for f in frames], dtype=np.float64)
    p = np.array([f["presented"] for f in frames], dtype=np.float64)
    windows = []
    start = t[0]
    while start + 1000.0 <= t[-1]:
        c0, c1 = np.interp([start, start + 1000.0], t, p)
        windows.append(float(c1 - c0))
        start += 1000.0
    return {"median": float(np.median(windows)) if windows else None, "min": float(min(windows)) if windows else None,
            "overall": float((p[-1] - p[0]) * 1000.0 / (t[-1] - t[0])) if t[-1] > t[0] else None,
            "windows": [round(w, 1) for w in windows], "callbacks_per_s": float(len(t) * 1000.0 / (t[-1] - t[0]))}


class _Display:
    """When (performance.now() ms) the page presented the track's frame n, from the captured frames."""

    def __init__(self, n: np.ndarray, t: np.ndarray) -> None:
        order = np.argsort(n, kind="stable")
        n, t = n[order], t[order]
        keep = np.concatenate([[True], np.diff(n) > 0])  # a frame presented twice: its first presentation
        self.n, self.t = n[keep], t[keep]

    def at(self, n: int) -> float:
        i = int(np.argmin(np.abs(self.n - n)))
        return float(self.t[i] + (n - self.n[i]) * FRAME_MS)

    def exact(self, n: int) -> Optional[float]:
        i = np.searchsorted(self.n, n)
        return float(self.t[i]) if i < len(self.n) and self.n[i] == n else None


def _sequence(images: Dict[int, np.ndarray], lo: int, hi: int, fallback: np.ndarray) -> tuple:
    """Frames lo..hi (inclusive) in order and which of them were captured (the others are filled with a
    neighbour only to keep the array whole; the lip-sync metric ignores them)."""
    out, present, last = [], [], None
    for n in range(lo, hi + 1):
        present.append(n in images)
        if n in images:
            last = images[n]
        out.append(last if last is not None else fallback)
    present_arr = np.array(present)
    return np.stack(out), present_arr


def _lipsync(frames: np.ndarray, audio: np.ndarray, reference: np.ndarray,
             present: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """avatarserve.quality's lip-sync metric; frames not captured (`present` False) do not count."""
    from avatarserve import quality

    mouth = quality.mouth_opening(frames, reference).astype(np.float64)
    if present is not None:
        mouth[~present] = np.nan  # quality's correlation skips non-finite values
    envelope = quality.audio_envelope(audio, len(frames))
    r = quality.lipsync_from_signals(mouth, envelope)
    out = {"corr": round(float(r["corr"]), 3), "corr_best": round(float(r["corr_best"]), 3),
           "best_offset_frames": int(r["best_offset_frames"]), "frames": int(r["frames"])}
    if present is not None:
        out["frames_captured"] = int(present.sum())
    return out


def av_offsets(run: PageRun, n: np.ndarray, window_ms: tuple) -> Optional[Dict[str, Any]]:
    """Presented video minus played audio of the same stream time, on the page, over `window_ms` (stream clock).

    Also returns "heard": (stream ms, performance.now() ms) arrays, when the page played each stream position.

    Video: each captured frame's presentation time and the stream time it shows (the server's frame n). Audio:
    the receiver's synchronization source (polled every 10 ms: when a packet was played, its RTP timestamp and
    the RFC 6465 level the server put in it); the levels identify the server's audio frame, whose stream
    position the server logged. Resolution: one 20 ms audio frame.
    """
    pl, sa = run.playout_levels, run.sent_audio
    if len(pl) < 50 or len(sa) < 50:
        return None
    rtp = np.array([p["rtp"] for p in pl], dtype=np.int64)
    rel = (rtp - rtp[0]) % (1 << 32)
    step = 960  # Opus at 48 kHz, one 20 ms frame per packet
    if np.any(rel % step):
        return None
    k = rel // step
    page_db = np.array([20.0 * np.log10(p["level"]) if p.get("level") else -127.0 for p in pl]).clip(-127, 0)
    server_db = np.array([a["dbov"] for a in sa], dtype=np.float64)
    best, best_corr = None, -2.0
    for c in range(int(-k.min()), int(len(sa) - 1 - k.max()) + 1):
        a, b = page_db, server_db[k + c]
        if np.std(a) > 0 and np.std(b) > 0:
            r = float(np.corrcoef(a, b)[0, 1])
            if r > best_corr:
                best, best_corr = c, r
    if best is None:
        return None
    origin = run.status["time_origin"]
    heard = [(sa[int(m)]["pos_ms"], p["t"] - origin) for m, p in zip(k + best, pl) if sa[int(m)]["pos_ms"] is not None]
    heard.sort(key=lambda x: x[1])
    pos = np.array([h[0] for h in heard])
    tau = np.array([h[1] for h in heard])
    keep = np.concatenate([[True], np.diff(pos) > 0])  # the first time each stream position was played
    pos, tau = pos[keep], tau[keep]
    sent = {s["n"]: s for s in run.sent}
    offsets = []
    for f, m in zip(run.frames, n):
        pts = sent.get(int(m), {}).get("pts_ms")
        if pts is None or not window_ms[0] <= pts < window_ms[1]:
            continue
        i = int(np.searchsorted(pos, pts, side="right")) - 1
        if i < 0 or pts - pos[i] > 20.0:
            continue
        offsets.append(f["t"] - (tau[i] + (pts - pos[i])))
    if not offsets:
        return None
    o = np.array(offsets)
    return {"video_minus_audio_ms_median": round(float(np.median(o)), 1),
            "p10": round(float(np.percentile(o, 10)), 1), "p90": round(float(np.percentile(o, 90)), 1),
            "frames": len(o), "level_match_corr": round(best_corr, 3), "heard": (pos, tau)}


def read_generated(path: str) -> tuple:
    """Frames of an `avatarserve generate` mp4 and each frame's time (s) on its audio's clock."""
    import av

    with av.open(path) as c:
        a = c.streams.audio[0]
        a_start = float(a.start_time * a.time_base) if a.start_time is not None else 0.0
        frames, times = [], []
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24"))
            times.append(float(f.time) - a_start)
    return np.stack(frames), np.array(times)


def analyse(run: PageRun, inputs: MicInputs, generated: Optional[str] = None) -> Dict[str, Any]:
    """Numbers from a run: fps, latency, lip sync (page and references), interrupt."""
    out: Dict[str, Any] = {}
    frames = run.frames
    if len(frames) < 2:
        raise ValueError(f"only {len(frames)} frames captured on the page")
    ident = number_frames(frames, run.sent, run.placeholder)
    n = ident["n"]
    t = np.array([f["t"] for f in frames])
    out["frames_captured"] = len(frames)
    out["frame_match"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in ident.items() if k != "n"}
    out["fps"] = _fps(frames)
    disp = _Display(n, t)
    images = {}
    for i, f in enumerate(frames):
        images.setdefault(int(n[i]), f["image"])
    sent = {s["n"]: s for s in run.sent}
    origin = run.status["time_origin"]  # performance.now() 0 on the wall clock (ms)

    # latency: the utterance's first sample into the page -> the first frame of the first non-idle block presented
    # (also from its first speech sample, -40 dBFS, for reference)
    lat: Dict[str, Any] = {}
    a0 = inputs.segments["A"][0]
    onset_file = a0 + (_first_loud(inputs.pcm[int(a0 * SAMPLE_RATE):]) or 0) / SAMPLE_RATE
    if run.mic is not None and len(run.mic[0]):
        mic, mic_t0 = run.mic
        first, speech = _first_loud(mic, AUDIO_RMS), _first_loud(mic)
        lat["audio_in_source"] = "page microphone recording"
        audio_in = None if first is None else mic_t0 + 1000.0 * first / SAMPLE_RATE
        speech_in = None if speech is None else mic_t0 + 1000.0 * speech / SAMPLE_RATE
        lat["mic_open_to_audio_ms"] = None if audio_in is None else round(audio_in - run.mic_opened_at, 1)
        lat["file_audio_start_ms"] = round(1000.0 * a0, 1)
    else:
        lat["audio_in_source"] = "microphone opened + the file's timing"
        audio_in = run.mic_opened_at + 1000.0 * a0
        speech_in = run.mic_opened_at + 1000.0 * onset_file
    first_talk = next((s["n"] for s in run.sent if s["idle"] is False), None)
    if audio_in is not None and first_talk is not None:
        shown = disp.exact(first_talk)
        at = shown if shown is not None else disp.at(first_talk)
        lat["first_speech_frame_n"] = int(first_talk)
        lat["first_speech_frame_captured"] = shown is not None
        lat["audio_in_to_first_video_ms"] = round(at - audio_in, 1)
        lat["server_part_ms"] = round(1000.0 * sent[first_talk]["at"] - (origin + audio_in), 1)
        lat["browser_part_ms"] = round(at - (1000.0 * sent[first_talk]["at"] - origin), 1)
        if speech_in is not None:
            lat["speech_onset_to_first_video_ms"] = round(at - speech_in, 1)
    marks = [m["msg"] for m in run.messages if m["msg"].get("type") == "frame"]
    talk = [m for m in marks if not m["idle"] and m.get("latency_ms") is not None]
    if talk:
        lat["server_reported_latency_ms_median"] = float(np.median([m["latency_ms"] for m in talk]))
        lat["server_reported_gen_ms_median"] = float(np.median([m["gen_ms"] for m in talk]))
    out["latency"] = lat

    # INTERRUPT -> idle
    intr: Dict[str, Any] = {"state": run.interrupt_state}
    if run.interrupt_clicked_at is not None and run.interrupt_shown_idle_at is not None:
        intr["click_to_idle_event_ms"] = round(run.interrupt_shown_idle_at - run.interrupt_clicked_at, 1)
        idle_mark = next((m for m in run.messages if m["t"] >= run.interrupt_clicked_at
                          and m["msg"].get("type") == "frame" and m["msg"].get("idle")), None)
        if idle_mark is not None:
            intr["click_to_idle_presented_ms"] = round(disp.at(idle_mark["msg"]["n"]) - run.interrupt_clicked_at, 1)
    if run.interrupt_clicked_at is not None:
        after = [m for m in run.messages if m["t"] >= run.interrupt_clicked_at]
        intr["events"] = [m["msg"]["kind"] for m in after if m["msg"].get("type") == "event"][:6]
        intr["errors"] = [m["msg"]["message"] for m in after if m["msg"].get("type") == "error"]
        ended = [m["msg"]["utterance"] for m in after if m["msg"].get("type") == "event"
                 and m["msg"]["kind"] == "UTTERANCE_ENDED" and m["msg"].get("utterance")]
        intr["utterance_cut"] = ended[0] if ended else None
        shown = [m["msg"] for m in after if m["msg"].get("type") == "frame"]
        first_idle = next((i for i, m in enumerate(shown) if m["idle"]), None)
        # the microphone is silent after speech B: once idle, the avatar must stay idle
        intr["speech_blocks_after_idle"] = (None if first_idle is None
                                            else sum(not m["idle"] for m in shown[first_idle:]))
    out["interrupt"] = intr

    # lip sync of speech A
    a_start, a_end = inputs.segments["A"]
    wav = inputs.pcm
    ls: Dict[str, Any] = {"window_s": round(a_end - a_start, 2)}
    if inputs.truth_frames is not None:
        ls["ground_truth"] = _lipsync(inputs.truth_frames,
                                      wav[int(round(a_start * SAMPLE_RATE)):int(round(a_end * SAMPLE_RATE))],
                                      inputs.reference)
    # segment A with some silence around it: where the session has it
    pad = 0.3
    ref_lo = max(0, int(round((a_start - pad) * SAMPLE_RATE)))
    ref_a = wav[ref_lo:int(round((a_end + pad) * SAMPLE_RATE))]
    # the same frames placed on the session's stream clock by what the server sent as each frame n (during a
    # playout stall a frame repeats: the sequence takes each stream-clock frame once)
    if run.received:
        first_pts = min(r["pts_ms"] for r in run.received)
        end = max(r["pts_ms"] + r["duration_ms"] for r in run.received)
        session_audio = np.zeros((end - first_pts) * SAMPLE_RATE // 1000, np.float32)
        for r in run.received:
            if r["audio"] is not None:
                at = (r["pts_ms"] - first_pts) * SAMPLE_RATE // 1000
                session_audio[at:at + len(r["audio"])] = r["audio"][:len(session_audio) - at] / 32768.0
        lag, peak = xcorr_lag(ref_a, session_audio, near=_near(session_audio, ref_a))
        file_pts = first_pts + 1000.0 * (lag - ref_lo) / SAMPLE_RATE  # stream time of file time 0
        by_pts: Dict[int, np.ndarray] = {}
        for s_ in run.sent:
            if s_["pts_ms"] is not None and s_["n"] in images:
                by_pts.setdefault(int(round(s_["pts_ms"] / FRAME_MS)), images[s_["n"]])
        lo = int(np.ceil((file_pts + 1000.0 * a_start) / FRAME_MS - 0.01))
        count = int(round((a_end - a_start) * FPS))
        seq, present = _sequence(by_pts, lo, lo + count - 1, run.placeholder)
        i0 = int(round((lo * FRAME_MS - file_pts) * SAMPLE_RATE / 1000.0))
        ls["stream_clock_vs_mic_wav"] = {**_lipsync(seq, wav[max(0, i0):i0 + count * 640], inputs.reference, present),
                                         "xcorr_peak": round(peak, 3)}
        # the same frames against the audio the session actually had there (the block audio it returned): the
        # microphone's speech after WebRTC, with the silence the live stream clock inserted where audio came late
        j0 = int(round((lo * FRAME_MS - first_pts) * SAMPLE_RATE / 1000.0))
        ls["stream_clock_vs_session_audio"] = _lipsync(seq, session_audio[max(0, j0):j0 + count * 640],
                                                       inputs.reference, present)
        # As the page presented and played them: frames at their presentation times, sound at the times the
        # page's receiver played each stream position (the WAV's samples there)
        av = av_offsets(run, n, (lo * FRAME_MS, (lo + count) * FRAME_MS))
        if av is not None:
            pos, tau = av.pop("heard")
            out["av_sync"] = av
            first = int(min(sent[m]["n"] for m in sent if sent[m]["pts_ms"] is not None
                            and sent[m]["pts_ms"] >= lo * FRAME_MS - 1.0))
            # each frame's 40 ms on screen (from its own presentation time) -> the sound played meanwhile
            grid = (np.array([disp.at(first + i) for i in range(count)])[:, None]
                    + np.arange(640)[None, :] * 1000.0 / SAMPLE_RATE).reshape(-1)
            stream_pos = np.interp(grid, tau, pos)  # what the page was playing at each instant
            heard_wav = wav[np.clip(np.round((stream_pos - file_pts) * SAMPLE_RATE / 1000.0).astype(np.int64), 0,
                                    len(wav) - 1)]
            seq_p, present_p = _sequence(images, first, first + count - 1, run.placeholder)
            ls["page_vs_mic_wav"] = _lipsync(seq_p, heard_wav, inputs.reference, present_p)
    if generated:
        g_frames, g_times = read_generated(generated)
        sel = np.flatnonzero((g_times >= a_start - 0.001) & (g_times < a_end - 0.001))
        if len(sel):
            i0 = int(round(g_times[sel[0]] * SAMPLE_RATE))
            ls["generate_offline"] = _lipsync(g_frames[sel], wav[i0:i0 + len(sel) * 640], inputs.reference)
    out["lipsync"] = ls
    out["playout"] = run.playout
    out["machine"] = {"cpu_stall_share": None if run.cpu_stall is None else round(run.cpu_stall, 3)}
    late = np.array([s.get("late_ms", 0.0) for s in run.sent], dtype=np.float64)
    if len(late):  # the server's video track: how far behind its 25 fps schedule each frame left
        out["sender"] = {"frames": int(len(late)), "late_ms_p50": round(float(np.median(late)), 1),
                         "late_ms_p99": round(float(np.percentile(late, 99)), 1),
                         "late_ms_max": round(float(late.max()), 1),
                         "late_over_100ms": int((late > 100.0).sum()),
                         "fps": round(float((len(late) - 1) / (run.sent[-1]["at"] - run.sent[0]["at"])), 2)
                         if len(late) > 1 and run.sent[-1]["at"] > run.sent[0]["at"] else None,
                         # the worst lateness in each second of the run (25 frames), to line up with fps windows
                         "late_ms_max_per_s": [round(float(late[i:i + 25].max())) for i in range(0, len(late), 25)]}
    out["bridge"] = run.bridge_stats
    out["status"] = {k: run.status.get(k) for k in ("stats_fps", "frames_received", "frames_decoded",
                                                    "frames_dropped", "freezes", "freezes_ms",
                                                    "jitter_buffer_ms", "packets_lost")}
    tm = run.timing
    out["connect_ms"] = {k: round(v - tm["start"], 1) for k, v in tm.items()}
    if run.screenshot:
        out["screenshot"] = run.screenshot
    return out


def run_generate(inputs: MicInputs, out: str, seed: int = 0, timeout: float = 900.0) -> str:
    """The same WAV and face through `avatarserve generate` (the model offline, one process)."""
    proc = subprocess.run([sys.executable, "-m", "avatarserve.cli", "generate", "--image", inputs.image, "--audio",
                           inputs.wav, "--out", out, "--seed", str(seed)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"avatarserve generate failed: {proc.stderr[-2000:]}")
    return out


async def measure_page(server: str, work_dir: str, *, chromium: str = CHROMIUM, application: Optional[str] = None,
                       screenshot: Optional[str] = None, generate: bool = True, seed: int = 0,
                       progress: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """The whole browser measurement against the cluster at `server`; returns the analysis (JSON-able)."""
    inputs = make_inputs(work_dir)
    run = await run_page(server, inputs, chromium=chromium, application=application, seed=seed,
                         screenshot=screenshot, progress=progress)
    with open(os.path.join(work_dir, "run.pkl"), "wb") as fh:  # the raw run, to analyse again offline
        pickle.dump((run, inputs), fh)
    gen = None
    if generate:
        progress("running avatarserve generate on the same WAV (the offline reference)")
        gen = await asyncio.to_thread(run_generate, inputs, os.path.join(work_dir, "generate.mp4"), seed)
    result = analyse(run, inputs, gen)
    result["server"] = server
    return result


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="gRPC address of a running AvatarServe cluster (HOST:PORT)")
    p.add_argument("--application", default=None)
    p.add_argument("--chromium", default=CHROMIUM)
    p.add_argument("--screenshot", default=None, help="write a PNG of the page here")
    p.add_argument("--work-dir", default=None, help="inputs and the generate output (default: a temporary folder)")
    p.add_argument("--no-generate", action="store_true", help="skip the `avatarserve generate` reference")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    a = p.parse_args(argv)
    work = a.work_dir or tempfile.mkdtemp(prefix="adapter-web-")
    say = (lambda s: None) if a.json else (lambda s: print(f"[web] {s}", file=sys.stderr, flush=True))
    try:
        result = asyncio.run(measure_page(a.server, work, chromium=a.chromium, application=a.application,
                                          screenshot=a.screenshot, generate=not a.no_generate, progress=say))
    except (BrowserError, RuntimeError, ValueError) as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
