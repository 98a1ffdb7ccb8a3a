"""Procedural speech for the toy world: random English sentences spoken by espeak-ng.

A `SpeechTrack` is an endless, deterministic audio stream for one speaker (one seed): a chain of
segments, each an utterance synthesised by the espeak-ng binary (through a temporary wav file) and
followed by a silence gap, all over a low, constant noise floor. Every segment draws from its own
generator `(seed, segment index)`, so the track is byte-identical however it is read in chunks.
Audio is 16 kHz mono float32 on the int16 grid (x * 32767 is an integer), so storing it as 16-bit
PCM is lossless.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import wave
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from avatarserve.toy.errors import EspeakNotFoundError, SpeechSynthesisError, ToyWorldError

SAMPLE_RATE = 16000

# Keys that separate the random streams drawn from one seed (see `np.random.default_rng([...])`).
_VOICE_KEY = 101
_SEGMENT_KEY = 102

# English voices of espeak-ng's own (non-mbrola) set whose variants all work in espeak-ng 1.51.
VOICES = (
    "en-us",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
# Voice variants (timbre); robot, whisper and joke variants are left out on purpose.
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7",
    "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4",
    "Alex", "Andrea", "Annie", "aunty", "david", "ed", "edward", "grandma", "grandpa",
    "iven", "iven3", "john", "linda", "max", "paul", "rob", "steph", "zac",
)

# A small embedded vocabulary; sentences are drawn from templates over these word classes.
_WORDS: Dict[str, tuple] = {
    "det": ("the", "a", "my", "your", "our", "this", "that", "every", "one", "some"),
    "adj": (
        "small", "big", "red", "blue", "green", "quiet", "loud", "happy", "sleepy", "bright",
        "dark", "warm", "cold", "quick", "slow", "tiny", "huge", "gentle", "brave", "clever",
        "funny", "strange", "golden", "silver", "wooden", "lucky", "busy", "friendly", "old",
        "young", "soft", "sharp", "round", "empty", "heavy", "light", "early", "late",
    ),
    "noun": (
        "cat", "dog", "bird", "fish", "horse", "rabbit", "garden", "river", "mountain", "city",
        "window", "door", "table", "chair", "book", "letter", "song", "story", "morning",
        "evening", "teacher", "doctor", "farmer", "robot", "rocket", "train", "boat", "bridge",
        "apple", "orange", "bread", "coffee", "music", "picture", "camera", "computer", "forest",
        "island", "ocean", "cloud", "storm", "sun", "moon", "star", "kitchen", "market", "school",
        "friend", "neighbour", "village", "castle", "dragon", "engine", "pencil", "garden",
    ),
    "verb": (
        "sees", "finds", "likes", "paints", "builds", "carries", "follows", "watches", "opens",
        "closes", "visits", "remembers", "answers", "brings", "catches", "cleans", "draws",
        "fixes", "greets", "helps", "keeps", "moves", "pushes", "reads", "sells", "shows",
        "throws", "wants", "needs", "loves",
    ),
    "iverb": (
        "sings", "sleeps", "waits", "dances", "laughs", "listens", "runs", "walks", "swims",
        "talks", "works", "shines", "rests", "jumps", "travels", "smiles", "whispers", "wanders",
    ),
    "adv": (
        "slowly", "quickly", "quietly", "happily", "carefully", "often", "never", "always",
        "today", "again", "suddenly", "gently", "loudly", "together", "early", "later",
    ),
    "prep": ("near", "under", "behind", "beside", "above", "across", "inside", "around", "past"),
    "name": (
        "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack",
        "Kira", "Leo", "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor",
    ),
    "num": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"),
    "plural": (
        "cats", "dogs", "birds", "apples", "books", "boats", "clouds", "trees", "friends",
        "letters", "songs", "stars", "children", "windows", "flowers", "lamps",
    ),
}

_TEMPLATES = (
    "det adj noun verb det noun",
    "det noun iverb adv",
    "det adj noun iverb prep det noun",
    "name verb det adj noun adv",
    "name and name iverb prep det noun",
    "num adj plural iverb prep det noun",
    "det noun verb num plural",
    "does det noun iverb adv ?",
    "where is det adj noun ?",
    "name iverb , and det noun iverb adv",
    "det adj noun verb det adj noun prep det noun",
    "adv , name verb det noun",
    "I think det noun iverb adv",
    "we saw num plural prep det adj noun",
)


def make_sentence(rng: np.random.Generator) -> str:
    """One random sentence (3 to ~12 words) from the embedded vocabulary."""
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    words: List[str] = []
    for token in template.split():
        if token in _WORDS:
            choices = _WORDS[token]
            words.append(choices[int(rng.integers(len(choices)))])
        else:
            words.append(token)
    text = " ".join(words).replace(" ,", ",").replace(" ?", "?")
    text = text[0].upper() + text[1:]
    return text if text.endswith("?") else text + "."


@dataclass(frozen=True)
class VoiceProfile:
    """How one toy speaker sounds: espeak voice + variant, base speed (wpm), pitch (0-99), level."""

    voice: str
    variant: str
    speed_wpm: int
    pitch: int
    word_gap: int  # extra pause between words, espeak units of 10 ms
    peak_dbfs: float  # utterance peak level
    noise_dbfs: float  # RMS level of the constant noise floor

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def sample_voice(seed: int) -> VoiceProfile:
    """The speaker of `seed` (same seed -> same voice)."""
    rng = np.random.default_rng([seed, _VOICE_KEY])
    return VoiceProfile(
        voice=VOICES[int(rng.integers(len(VOICES)))],
        variant=VARIANTS[int(rng.integers(len(VARIANTS)))],
        speed_wpm=int(rng.integers(130, 191)),
        pitch=int(rng.integers(25, 76)),
        word_gap=int(rng.integers(0, 3)),
        peak_dbfs=float(np.round(rng.uniform(-7.0, -2.0), 3)),
        noise_dbfs=float(np.round(rng.uniform(-66.0, -52.0), 3)),
    )


def find_espeak() -> str:
    """Path of the espeak-ng binary ($AVATARSERVE_ESPEAK wins over PATH)."""
    override = os.environ.get("AVATARSERVE_ESPEAK")
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise EspeakNotFoundError(
            f"AVATARSERVE_ESPEAK={override!r} is not an executable file; point it at espeak-ng"
        )
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakNotFoundError(
            "the toy world needs the espeak-ng binary for speech, and it is not on PATH: "
            "install it (Debian/Ubuntu: apt-get install espeak-ng) or set AVATARSERVE_ESPEAK"
        )
    return path


def _read_wav(path: str) -> tuple:
    with wave.open(path, "rb") as wav:
        if wav.getsampwidth() != 2:
            raise SpeechSynthesisError(f"espeak-ng wrote {8 * wav.getsampwidth()}-bit audio; expected 16-bit")
        rate = wav.getframerate()
        channels = wav.getnchannels()
        raw = wav.readframes(wav.getnframes())
    pcm = np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1)
    return pcm, rate


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling by FFT (exact for the finite, zero-padded utterances we feed it)."""
    if sr_in == sr_out or x.size == 0:
        return x.astype(np.float64, copy=True)
    g = math.gcd(sr_in, sr_out)
    step_in, step_out = sr_in // g, sr_out // g
    # Zero margins (so the FFT's circular wrap only touches silence) and a total length that are
    # whole multiples of step_in, so input and output grids line up exactly.
    k = -(-512 // step_in)
    front = k * step_in
    total = -(-(x.size + 2 * front) // step_in) * step_in
    padded = np.zeros(total)
    padded[front : front + x.size] = x
    n_out = total // step_in * step_out
    spectrum = np.fft.rfft(padded)
    keep = min(spectrum.size, n_out // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n=n_out) * (n_out / total)
    length = int(round(x.size * sr_out / sr_in))
    return out[k * step_out : k * step_out + length]


def synthesize(
    text: str,
    voice: str,
    variant: str,
    speed_wpm: int,
    pitch: int,
    word_gap: int = 0,
    sample_rate: int = SAMPLE_RATE,
    binary: Optional[str] = None,
) -> np.ndarray:
    """Speak `text` with espeak-ng and return mono float64 audio at `sample_rate`."""
    if not text.strip():
        raise SpeechSynthesisError("cannot synthesise an empty utterance")
    exe = binary or find_espeak()
    with tempfile.TemporaryDirectory(prefix="avatarserve-espeak-") as tmp:
        out = os.path.join(tmp, "utterance.wav")
        cmd = [
            exe, "-v", f"{voice}+{variant}", "-s", str(speed_wpm), "-p", str(pitch),
            "-g", str(word_gap), "-w", out, "--", text,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        except FileNotFoundError as exc:
            raise EspeakNotFoundError(f"could not run espeak-ng at {exe!r}: {exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise SpeechSynthesisError(f"espeak-ng took over 60 s for {text!r}") from exc
        if proc.returncode != 0 or not os.path.exists(out):
            err = proc.stderr.decode(errors="replace").strip()
            raise SpeechSynthesisError(
                f"espeak-ng failed (exit {proc.returncode}) for voice {voice}+{variant}: {err or 'no output'}"
            )
        pcm, rate = _read_wav(out)
    if pcm.size == 0 or not np.any(pcm):
        raise SpeechSynthesisError(f"espeak-ng produced silence for {text!r} with voice {voice}+{variant}")
    return resample(pcm, rate, sample_rate)


@dataclass(frozen=True)
class Segment:
    """One piece of the speech track: an utterance followed by a silence gap."""

    index: int
    text: str
    audio: np.ndarray  # float64, speech + noise, not yet quantised
    speech_start: int  # sample index (within the segment) where the utterance starts
    speech_end: int


class SpeechTrack:
    """Endless deterministic speech of one speaker; `read(n)` returns the next n samples."""

    def __init__(self, seed: int, sample_rate: int = SAMPLE_RATE, binary: Optional[str] = None) -> None:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ToyWorldError(f"seed must be a non-negative integer, got {seed!r}")
        if sample_rate < 8000:
            raise ToyWorldError(f"sample_rate must be >= 8000 Hz, got {sample_rate}")
        self.seed = int(seed)
        self.sample_rate = sample_rate
        self.voice = sample_voice(self.seed)
        self._binary = binary or find_espeak()  # fail early, with the typed error
        self._next_index = 0
        self._buffer = np.zeros(0, dtype=np.float64)
        self.texts: List[str] = []

    def _segment(self, index: int) -> Segment:
        rng = np.random.default_rng([self.seed, _SEGMENT_KEY, index])
        v = self.voice
        text = make_sentence(rng)
        speech = synthesize(
            text,
            v.voice,
            v.variant,
            speed_wpm=int(np.clip(v.speed_wpm + rng.integers(-15, 16), 90, 260)),
            pitch=int(np.clip(v.pitch + rng.integers(-8, 9), 0, 99)),
            word_gap=v.word_gap,
            sample_rate=self.sample_rate,
            binary=self._binary,
        )
        peak_db = v.peak_dbfs + rng.uniform(-2.0, 2.0)
        speech *= 10.0 ** (peak_db / 20.0) / np.max(np.abs(speech))
        lead = rng.uniform(0.05, 0.6) if index == 0 else 0.0
        # Mostly short pauses, sometimes a long one, so silences of all lengths occur.
        gap = rng.uniform(1.2, 2.5) if rng.random() < 0.15 else rng.uniform(0.15, 0.9)
        n_lead = int(lead * self.sample_rate)
        n_gap = int(gap * self.sample_rate)
        audio = np.zeros(n_lead + speech.size + n_gap)
        audio[n_lead : n_lead + speech.size] = speech
        audio += rng.standard_normal(audio.size) * 10.0 ** (v.noise_dbfs / 20.0)
        return Segment(index, text, audio, n_lead, n_lead + speech.size)

    def read(self, num_samples: int) -> np.ndarray:
        """The next `num_samples` samples as float32 on the int16 grid, in [-1, 1]."""
        if num_samples < 0:
            raise ToyWorldError(f"num_samples must be >= 0, got {num_samples}")
        parts = [self._buffer]
        have = self._buffer.size
        while have < num_samples:
            seg = self._segment(self._next_index)
            self._next_index += 1
            self.texts.append(seg.text)
            parts.append(seg.audio)
            have += seg.audio.size
        joined = np.concatenate(parts) if len(parts) > 1 else self._buffer
        out, self._buffer = joined[:num_samples], joined[num_samples:]
        return pcm16_to_float(np.round(np.clip(out, -1.0, 1.0) * 32767.0).astype(np.int16))


def pcm16_to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM -> float32 in [-1, 1]; the one conversion used everywhere, so round trips are exact."""
    return pcm.astype(np.float32) / np.float32(32767.0)


def float_to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Inverse of `pcm16_to_float` for audio on the int16 grid (rounds anything else)."""
    return np.round(np.clip(audio.astype(np.float64), -1.0, 1.0) * 32767.0).astype("<i2")
