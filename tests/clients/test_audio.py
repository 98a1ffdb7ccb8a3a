from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from avatarserve_client.v1 import avatar_service_pb2 as pb
from avatarserve_client import (INTERRUPT, InvalidArgument, RealtimePacer, chunk_pcm, float_to_pcm16,
                                read_wav, resample, silence)
from avatarserve_client._streaming import AudioStamper, SendQueue
from avatarserve_client.types import AudioEncoding

from .conftest import tone


# -- chunking --------------------------------------------------------------------------------

def test_chunk_pcm_seq_pts_and_payload() -> None:
    pcm = np.arange(16000 + 100, dtype=np.int16)  # 1 s + 100 samples
    chunks = chunk_pcm(pcm, chunk_ms=40)
    assert [c.seq for c in chunks] == list(range(26))
    assert [c.pts_ms for c in chunks] == [40 * i for i in range(26)]
    assert all(len(c.pcm) == 640 * 2 for c in chunks[:-1])
    assert len(chunks[-1].pcm) == 100 * 2  # the tail chunk is shorter
    joined = np.frombuffer(b"".join(c.pcm for c in chunks), dtype="<i2")
    np.testing.assert_array_equal(joined, pcm)


def test_chunk_pcm_pts_floor_with_offsets() -> None:
    # 10 ms chunks starting 7 samples into the clock: pts = floor((7 + 160 k) / 16)
    chunks = chunk_pcm(np.zeros(480, np.int16), chunk_ms=10, start_seq=5, start_sample=7)
    assert [c.seq for c in chunks] == [5, 6, 7]
    assert [c.pts_ms for c in chunks] == [0, 10, 20]
    chunks = chunk_pcm(np.zeros(320, np.int16), chunk_ms=10, start_sample=15)
    assert [c.pts_ms for c in chunks] == [0, 10]
    chunks = chunk_pcm(np.zeros(320, np.int16), chunk_ms=10, start_sample=16)
    assert [c.pts_ms for c in chunks] == [1, 11]


def test_chunk_pcm_float32_gives_f32le() -> None:
    pcm = np.linspace(-1, 1, 800, dtype=np.float32)
    chunks = chunk_pcm(pcm, chunk_ms=20)
    assert len(chunks) == 3 and len(chunks[0].pcm) == 320 * 4
    np.testing.assert_array_equal(np.frombuffer(chunks[0].pcm, "<f4"), pcm[:320])


@pytest.mark.parametrize("kwargs, msg", [
    ({"chunk_ms": 0}, "chunk_ms"),
    ({"chunk_ms": 1500}, "chunk_ms"),
    ({"chunk_ms": 0.01}, "whole number"),
    ({"start_seq": -1}, "non-negative"),
])
def test_chunk_pcm_rejects_bad_parameters(kwargs, msg) -> None:
    with pytest.raises(InvalidArgument, match=msg):
        chunk_pcm(np.zeros(100, np.int16), **kwargs)


def test_chunk_pcm_rejects_bad_arrays() -> None:
    with pytest.raises(InvalidArgument, match="1-D"):
        chunk_pcm(np.zeros((100, 2), np.int16))
    with pytest.raises(InvalidArgument, match="int16"):
        chunk_pcm(np.zeros(100, np.float64))
    with pytest.raises(InvalidArgument, match="NaN"):
        chunk_pcm(np.array([0.0, np.nan], np.float32))


def test_silence_and_float_conversion() -> None:
    assert silence(480).shape == (7680,) and not silence(480).any()
    assert silence(0.04).shape == (1,)
    with pytest.raises(InvalidArgument):
        silence(-1)
    np.testing.assert_array_equal(float_to_pcm16(np.array([0, 1, -1, 2, -2, 0.5])),
                                  [0, 32767, -32767, 32767, -32767, 16384])
    with pytest.raises(InvalidArgument, match="NaN"):
        float_to_pcm16(np.array([np.inf]))


# -- WAV reading / resampling ----------------------------------------------------------------

def _dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


def test_read_wav_downmixes_and_resamples(tmp_path) -> None:
    rate = 44100
    t = np.arange(rate) / rate  # 1 s
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.5 * np.sin(2 * np.pi * 440 * t + 0.3)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), rate, subtype="PCM_16")
    pcm = read_wav(path)
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert pcm.shape[0] == 16000
    assert abs(_dominant_hz(pcm, 16000) - 440) < 2
    mid = pcm[2000:-2000].astype(np.float64) / 32767
    expected_amp = 0.5 * abs(np.cos(0.15))  # (sin a + sin(a+0.3)) / 2
    assert np.max(np.abs(mid)) == pytest.approx(expected_amp, rel=0.02)


def test_resample_suppresses_aliasing() -> None:
    rate = 48000
    t = np.arange(rate) / rate
    # 12 kHz is above the 8 kHz Nyquist of 16 kHz: it must not fold back to 4 kHz.
    out = resample(np.sin(2 * np.pi * 12000 * t), rate, 16000)
    assert out.shape == (16000,)
    assert np.sqrt(np.mean(out[500:-500] ** 2)) < 0.01
    passband = resample(np.sin(2 * np.pi * 1000 * t), rate, 16000)
    assert np.sqrt(np.mean(passband[500:-500] ** 2)) == pytest.approx(np.sqrt(0.5), rel=0.01)


def test_read_wav_at_16k_is_identity(tmp_path) -> None:
    pcm = tone(100)
    sf.write(tmp_path / "a.wav", pcm, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(read_wav(tmp_path / "a.wav"), pcm)


def test_read_wav_bad_file(tmp_path) -> None:
    (tmp_path / "x.wav").write_bytes(b"not a wav")
    with pytest.raises(InvalidArgument, match="cannot read audio file"):
        read_wav(tmp_path / "x.wav")
    with pytest.raises(InvalidArgument, match="cannot read audio file"):
        read_wav(tmp_path / "missing.wav")


# -- pacing ----------------------------------------------------------------------------------

class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s

    async def async_sleep(self, s: float) -> None:
        self.sleep(s)


def _release_times(pacer, clock: FakeClock) -> list[float]:
    times = []
    for _ in pacer:
        times.append(round(clock.t - 100.0, 6))
    return times


def test_pacer_releases_chunks_at_real_time() -> None:
    clock = FakeClock()
    chunks = chunk_pcm(np.zeros(16000, np.int16), chunk_ms=100)
    pacer = RealtimePacer(chunks, clock=clock, sleep=clock.sleep)
    assert _release_times(pacer, clock) == [round(0.1 * i, 6) for i in range(10)]


def test_pacer_lead_releases_early_but_never_faster_after_the_lead() -> None:
    clock = FakeClock()
    chunks = chunk_pcm(np.zeros(16000, np.int16), chunk_ms=100)
    pacer = RealtimePacer(chunks, lead_ms=250, clock=clock, sleep=clock.sleep)
    times = _release_times(pacer, clock)
    assert times[:3] == [0.0, 0.0, 0.0]          # pts 0,100,200 ms are within the lead
    assert times[3:] == [round(0.1 * i - 0.25, 6) for i in range(3, 10)]


def test_pacer_does_not_drift_when_the_consumer_is_slow() -> None:
    clock = FakeClock()
    chunks = chunk_pcm(np.zeros(8000, np.int16), chunk_ms=100)
    pacer = iter(RealtimePacer(chunks, clock=clock, sleep=clock.sleep))
    next(pacer)
    clock.t += 0.35  # consumer stalls 350 ms
    released = [next(pacer) for _ in range(3)]  # 100, 200, 300 ms are overdue: no sleeping
    assert len(released) == 3 and clock.sleeps == []
    next(pacer)  # pts 400 ms: due 50 ms later
    assert clock.sleeps == [pytest.approx(0.05)]


def test_pacer_times_arrays_by_duration_and_passes_markers() -> None:
    clock = FakeClock()
    items = [np.zeros(1600, np.int16), INTERRUPT, np.zeros(3200, np.int16), b"\x00" * 640,
             np.zeros(160, np.int16)]
    pacer = RealtimePacer(items, clock=clock, sleep=clock.sleep)
    assert _release_times(pacer, clock) == [0.0, 0.1, 0.1, 0.3, 0.32]


def test_pacer_follows_pts_gaps() -> None:
    clock = FakeClock()
    items = [pb.AudioChunk(seq=0, pts_ms=1000, pcm=b"\x00" * 320),
             pb.AudioChunk(seq=1, pts_ms=1500, pcm=b"\x00" * 320)]
    assert _release_times(RealtimePacer(items, clock=clock, sleep=clock.sleep), clock) == [0.0, 0.5]


def test_pacer_async_iteration_uses_async_sleep() -> None:
    clock = FakeClock()
    chunks = chunk_pcm(np.zeros(4800, np.int16), chunk_ms=100)
    pacer = RealtimePacer(chunks, lead_ms=100, clock=clock, sleep=None, async_sleep=clock.async_sleep)

    async def collect():
        return [round(clock.t - 100, 6) async for _ in pacer]

    assert asyncio.run(collect()) == [0.0, 0.0, 0.1]


def test_pacer_with_the_real_clock_is_not_early() -> None:
    chunks = chunk_pcm(np.zeros(800, np.int16), chunk_ms=10)  # 5 chunks, 40 ms of pacing
    t0 = time.monotonic()
    stamps = [time.monotonic() - t0 for _ in RealtimePacer(chunks)]
    for i, s in enumerate(stamps):
        assert s >= 0.01 * i - 0.002


def test_pacer_rejects_negative_lead() -> None:
    with pytest.raises(InvalidArgument):
        RealtimePacer([], lead_ms=-1)


# -- stamping and the send queue -------------------------------------------------------------

def test_stamper_stamps_arrays_contiguously_and_checks_chunks() -> None:
    st = AudioStamper(AudioEncoding.PCM_S16LE, 16000)
    a = st.to_message(np.zeros(800, np.int16)).audio
    b = st.to_message(np.zeros(8, np.int16)).audio
    c = st.to_message(np.zeros(800, np.float32)).audio  # converted to s16le
    assert (a.seq, a.pts_ms, b.seq, b.pts_ms, c.seq, c.pts_ms) == (0, 0, 1, 50, 2, 50)
    assert len(c.pcm) == 1600
    d = st.to_message(pb.AudioChunk(seq=10, pts_ms=2000, pcm=b"\x00\x00" * 16)).audio  # a gap is fine
    e = st.to_message(np.zeros(16, np.int16)).audio
    assert (d.seq, e.seq, e.pts_ms) == (10, 11, 2001)
    with pytest.raises(InvalidArgument, match="does not increase"):
        st.to_message(pb.AudioChunk(seq=11, pts_ms=3000, pcm=b""))
    with pytest.raises(InvalidArgument, match="overlaps"):
        st.to_message(pb.AudioChunk(seq=20, pts_ms=1000, pcm=b""))
    with pytest.raises(InvalidArgument, match="multiple"):
        st.to_message(b"\x00\x00\x00")
    with pytest.raises(InvalidArgument, match="cannot send"):
        st.to_message("hello")
    assert st.to_message(INTERRUPT).control.kind == pb.Control.KIND_INTERRUPT


def test_stamper_live_floor_moves_late_arrays_to_now() -> None:
    now = [0]
    st = AudioStamper(AudioEncoding.PCM_S16LE, 16000, floor_ms=lambda: now[0])
    assert st.to_message(np.zeros(160, np.int16)).audio.pts_ms == 0
    now[0] = 900  # nothing sent for 890 ms: stamping at 10 ms would arrive late
    assert st.to_message(np.zeros(160, np.int16)).audio.pts_ms == 900
    assert st.to_message(np.zeros(160, np.int16)).audio.pts_ms == 910


def test_stamper_f32le_validates() -> None:
    st = AudioStamper(AudioEncoding.PCM_F32LE, 16000)
    m = st.to_message(np.array([0, 16384], np.int16)).audio
    np.testing.assert_array_equal(np.frombuffer(m.pcm, "<f4"), [0.0, 0.5])
    with pytest.raises(InvalidArgument, match="NaN"):
        st.to_message(np.array([np.nan], np.float32))
    with pytest.raises(InvalidArgument, match="multiple of the 4-byte"):
        st.to_message(b"\x00\x00")


def _audio(seq: int) -> pb.ClientMessage:
    return pb.ClientMessage(audio=pb.AudioChunk(seq=seq, pcm=b"\x00\x00"))


def _control(kind: int) -> pb.ClientMessage:
    return pb.ClientMessage(control=pb.Control(kind=kind))


def test_send_queue_bounds_audio_but_not_control() -> None:
    q = SendQueue(2)
    assert q.put(_audio(0)) and q.put(_audio(1))
    assert not q.put(_audio(2), timeout=0.01)  # full: back-pressure
    assert q.put(_control(pb.Control.KIND_END_OF_INPUT), timeout=0)  # control never waits
    assert q.get().audio.seq == 0
    assert q.put(_audio(2), timeout=0.01)


def test_send_queue_blocked_producer_resumes_when_consumer_reads() -> None:
    q = SendQueue(1)
    q.put(_audio(0))
    done = threading.Event()

    def produce():
        q.put(_audio(1))
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    assert not done.wait(0.05)
    assert q.get().audio.seq == 0
    assert done.wait(2)
    assert q.get().audio.seq == 1


def test_send_queue_interrupt_drops_queued_audio_only() -> None:
    q = SendQueue(8)
    for i in range(3):
        q.put(_audio(i))
    q.put(_control(pb.Control.KIND_INTERRUPT))
    q.put(_audio(3))
    assert q.interrupt(_control(pb.Control.KIND_INTERRUPT)) == 4
    assert [m.WhichOneof("kind") for m in (q.get(), q.get())] == ["control", "control"]
    q.close(_control(pb.Control.KIND_END_OF_INPUT))
    assert q.get().control.kind == pb.Control.KIND_END_OF_INPUT
    assert q.get() is None
    assert not q.put(_audio(9))


def test_send_queue_close_wakes_blocked_producer() -> None:
    q = SendQueue(1)
    q.put(_audio(0))
    result = []
    t = threading.Thread(target=lambda: result.append(q.put(_audio(1))), daemon=True)
    t.start()
    time.sleep(0.02)
    q.abort()
    t.join(2)
    assert result == [False] and q.get() is None


def test_send_queue_rejects_zero_capacity() -> None:
    with pytest.raises(InvalidArgument):
        SendQueue(0)
