"""Toy-world datasets on disk: one compressed .npz per clip plus a manifest.json.

Seed split (so evaluation never sees a training person or voice): clip seeds below
`HELDOUT_SEED_START` (10**6) are for training, seeds from 10**6 up are held out for evaluation.
`write_dataset(out_dir, num_clips, seconds, seed)` uses seeds seed, seed + 1, ..., which must all
fall on one side of the split.

Files are byte-reproducible: the same arguments write identical bytes (the zip entries carry a
fixed timestamp). Audio is stored as 16-bit PCM, which is lossless because the toy world quantises
its audio to the int16 grid. The manifest lists every clip with its seed, sizes, identity, voice,
spoken texts and the sha256 of its file; `ToyDataset` reads and verifies them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Union

import numpy as np

from avatarserve.toy.errors import DatasetError, ToyWorldError
from avatarserve.toy.faces import FPS, Identity
from avatarserve.toy.speech import SAMPLE_RATE, VoiceProfile, float_to_pcm16, pcm16_to_float
from avatarserve.toy.world import Clip, _num_frames, make_clip

HELDOUT_SEED_START = 10**6
FORMAT = "avatarserve-toy-clips"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)

PathLike = Union[str, "os.PathLike[str]"]


def split_of(seed: int) -> str:
    """'train' for seeds < 10**6, 'heldout' from 10**6 on."""
    if seed < 0:
        raise ToyWorldError(f"seed must be non-negative, got {seed}")
    return "train" if seed < HELDOUT_SEED_START else "heldout"


def heldout_seeds(count: int, start: int = HELDOUT_SEED_START) -> List[int]:
    """`count` consecutive held-out seeds from `start` (default: the first held-out seed)."""
    if start < HELDOUT_SEED_START:
        raise ToyWorldError(f"held-out seeds start at {HELDOUT_SEED_START}, got start={start}")
    return list(range(start, start + count))


def _npz_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
    """An .npz (readable by np.load) with fixed zip timestamps, so equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def clip_to_npz_bytes(clip: Clip) -> bytes:
    pcm = float_to_pcm16(clip.audio)
    return _npz_bytes(
        {
            "frames": clip.frames,
            "audio_pcm16": pcm,
            "mouth_open": clip.mouth_open.astype("<f4"),
            "eye_open": clip.eye_open.astype("<f4"),
            "head_pose": clip.head_pose.astype("<f4"),
            "reference_image": clip.reference_image,
        }
    )


def _write_one(args: tuple) -> Dict[str, Any]:
    out_dir, index, seed, seconds, size = args
    clip = make_clip(seed, seconds, size=size)
    data = clip_to_npz_bytes(clip)
    name = f"clip_{index:06d}.npz"
    tmp = Path(out_dir) / (name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, Path(out_dir) / name)
    entry = {"file": name, **clip.metadata(), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return entry


def write_dataset(
    out_dir: PathLike,
    num_clips: int,
    seconds: float,
    seed: int,
    size: int = 64,
    workers: int = 1,
) -> Path:
    """Generate clips with seeds seed .. seed + num_clips - 1 into `out_dir`; returns the manifest path."""
    if isinstance(num_clips, bool) or not isinstance(num_clips, int) or num_clips < 1:
        raise ToyWorldError(f"num_clips must be a positive integer, got {num_clips!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ToyWorldError(f"seed must be a non-negative integer, got {seed!r}")
    if split_of(seed) != split_of(seed + num_clips - 1):
        raise ToyWorldError(
            f"seeds {seed}..{seed + num_clips - 1} straddle the train/held-out boundary {HELDOUT_SEED_START}; "
            "write training and held-out clips as separate datasets"
        )
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ToyWorldError(f"workers must be a positive integer, got {workers!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        raise DatasetError(f"{out} already holds a dataset ({MANIFEST} exists); use an empty directory")
    jobs = [(str(out), i, seed + i, seconds, size) for i in range(num_clips)]
    _num_frames(seconds)  # validate arguments (and espeak) before any work is spawned
    make_clip(seed, 1.0 / FPS, size=size)
    if workers == 1:
        entries = [_write_one(job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            entries = list(pool.map(_write_one, jobs))
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fps": FPS,
        "sample_rate": SAMPLE_RATE,
        "size": size,
        "seconds": float(seconds),
        "first_seed": seed,
        "num_clips": num_clips,
        "split": split_of(seed),
        "heldout_seed_start": HELDOUT_SEED_START,
        "clips": entries,
    }
    path = out / MANIFEST
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


class ToyDataset:
    """Read a dataset written by `write_dataset`: len(), indexing and iteration give `Clip`s."""

    def __init__(self, root: PathLike, verify: bool = True) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise DatasetError(f"{self.root} is not a toy dataset: {MANIFEST} is missing")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetError(f"cannot read {path}: {exc}") from exc
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise DatasetError(
                f"{path} is format {manifest.get('format')!r} v{manifest.get('version')!r}; "
                f"expected {FORMAT!r} v{FORMAT_VERSION}"
            )
        clips = manifest.get("clips")
        if not isinstance(clips, list) or len(clips) != manifest.get("num_clips"):
            raise DatasetError(f"{path}: the clip list does not match num_clips")
        self.manifest: Dict[str, Any] = manifest
        self.verify = verify

    def __len__(self) -> int:
        return len(self.manifest["clips"])

    @property
    def seeds(self) -> List[int]:
        return [int(c["seed"]) for c in self.manifest["clips"]]

    def __getitem__(self, index: int) -> Clip:
        if not -len(self) <= index < len(self):
            raise IndexError(f"clip index {index} out of range for {len(self)} clips")
        entry = self.manifest["clips"][index]
        path = self.root / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"cannot read clip file {path}: {exc}") from exc
        if self.verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise DatasetError(f"{path} is corrupted: its sha256 does not match the manifest")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise DatasetError(f"{path} is not a readable clip file: {exc}") from exc
        missing = {"frames", "audio_pcm16", "mouth_open", "eye_open", "head_pose", "reference_image"} - set(arrays)
        if missing:
            raise DatasetError(f"{path} lacks arrays {sorted(missing)}")
        frames = arrays["frames"]
        if frames.shape[0] != entry["num_frames"] or arrays["audio_pcm16"].size != entry["num_samples"]:
            raise DatasetError(f"{path}: array sizes disagree with the manifest")
        try:
            identity = Identity.from_dict(entry["identity"])
            voice = VoiceProfile(**entry["voice"])
        except (TypeError, ToyWorldError) as exc:
            raise DatasetError(f"{self.root / MANIFEST}: bad identity/voice for {entry['file']}: {exc}") from exc
        return Clip(
            seed=int(entry["seed"]),
            frames=frames,
            audio=pcm16_to_float(arrays["audio_pcm16"]),
            mouth_open=arrays["mouth_open"],
            eye_open=arrays["eye_open"],
            head_pose=arrays["head_pose"],
            identity=identity,
            voice=voice,
            reference_image=arrays["reference_image"],
            texts=list(entry["texts"]),
            fps=int(entry["fps"]),
            sample_rate=int(entry["sample_rate"]),
        )

    def __iter__(self) -> Iterator[Clip]:
        for i in range(len(self)):
            yield self[i]


def read_dataset(root: PathLike, verify: bool = True) -> ToyDataset:
    """Open a dataset directory written by `write_dataset`."""
    return ToyDataset(root, verify=verify)
