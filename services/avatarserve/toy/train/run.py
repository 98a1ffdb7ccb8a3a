"""The whole recipe, stage by stage, resumable: clips -> VAE -> latents -> stage 1 -> stage 2 -> checkpoint.

Every stage writes its result into the work directory and is skipped when that result exists, so an
interrupted run continues where it stopped (stages 1 and 2 also resume mid-way from their own checkpoints).
All randomness is seeded from the recipe; with the same recipe and thread count a rerun gives the same weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

from ...engine.bundle import ModelBundle
from ...model.config import TOY, Preset
from ...model.logmel import LogMelFrontEnd
from ...model.sampler import FlowMatchSchedule
from ...model.text_encoder import tiny_text_encoder
from ...model.vae import StreamingVAE
from ..dataset import HELDOUT_SEED_START
from ..world import make_clip
from .data import DitData, encode_dataset, ensure_clips, write_json
from .dit import build_transformer, train_stage1, train_stage2
from .errors import TrainingError
from .recipe import TrainRecipe
from .vae import build_vae, load_frames, reconstruction_psnr, refine_decoder, set_latent_stats, train_vae

STAGES = ("clips", "vae", "encode", "decoder", "stage1", "stage2", "export")
TEXT_SEED = 0  # the frozen tiny umT5 the toy model is conditioned through (random weights, shipped)


class Logger:
    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as fh:
            fh.write(line + "\n")


def text_encoder_for(preset: Preset):
    cfg = preset.model
    return tiny_text_encoder(TEXT_SEED, d_model=cfg.text_dim, max_length=cfg.text_len)


def make_bundle(preset: Preset, transformer, vae: StreamingVAE) -> ModelBundle:
    st = preset.stream
    return ModelBundle(preset=preset, stream=st, transformer=transformer.eval(), vae=vae, audio=LogMelFrontEnd(),
                       text_encoder=text_encoder_for(preset), model_config=preset.model,
                       schedule=FlowMatchSchedule.create(st.num_steps, st.shift, st.num_train_timesteps))


def run(work_dir: Path, out_dir: Optional[Path], recipe: TrainRecipe, preset: Preset = TOY,
        stages: Sequence[str] = STAGES, weights_dtype: torch.dtype = torch.float16,
        log: Optional[Callable[[str], None]] = None) -> Dict[str, object]:
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise TrainingError(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    work_dir.mkdir(parents=True, exist_ok=True)
    log = log or Logger(work_dir / "train.log")
    torch.set_num_threads(recipe.threads)
    summary: Dict[str, object] = {}
    timings: Dict[str, float] = {}
    write_json(work_dir / "recipe.json", recipe.to_dict())

    def timed(name: str, fn):
        t0 = time.time()
        out = fn()
        timings[name] = round(time.time() - t0, 1)
        log(f"== {name} done in {timings[name]:.1f} s")
        return out

    ds = None
    if "clips" in stages or any(s in stages for s in ("vae", "encode", "decoder")):
        ds = timed("clips", lambda: ensure_clips(work_dir / "clips", recipe.data))

    vae_dir = work_dir / "vae"
    if "vae" in stages and not (vae_dir / "config.json").exists():
        def do_vae():
            vae = build_vae(recipe.vae)
            ck = work_dir / "vae_train.pt"
            start, opt_state = 0, None
            if ck.exists():
                st = torch.load(ck, map_location="cpu", weights_only=True)
                vae.load_state_dict(st["model"])
                start, opt_state = int(st["step"]), st["opt"]
                log(f"vae: resumed at step {start}")
            frames = load_frames(ds)

            def checkpoint(step: int, opt: torch.optim.Optimizer) -> None:
                tmp = ck.with_suffix(".tmp")
                torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
                tmp.replace(ck)

            train_vae(vae, frames, recipe.vae, log, checkpoint, recipe.checkpoint_every, recipe.log_every,
                      start_step=start, optimizer_state=opt_state)
            del frames
            stats = set_latent_stats(vae, ds)
            log(f"vae latent stats: mean {stats['latents_mean'][:4]}... std {stats['latents_std'][:4]}...")
            vae.save_pretrained(vae_dir, safe_serialization=True)
        timed("vae", do_vae)
    data_path = work_dir / "dit_data.pt"
    if "encode" in stages and not data_path.exists():
        def do_encode():
            vae = StreamingVAE.from_pretrained(vae_dir)
            heldout = [make_clip(HELDOUT_SEED_START + i, recipe.data.psnr_seconds) for i in range(recipe.data.psnr_clips)]
            summary["vae_psnr_heldout"] = reconstruction_psnr(vae, heldout)
            log(f"vae reconstruction on held-out clips: {summary['vae_psnr_heldout']}")
            data = encode_dataset(ds, vae, LogMelFrontEnd(), text_encoder_for(preset), preset.model.motion_frames,
                                  preset.model.text_len, preset.model.text_dim,
                                  limit=recipe.data.dit_clips, log=log)
            data.save(data_path)
            std = data.latents.std(dim=(0, 2, 3, 4))
            log(f"latents {tuple(data.latents.shape)} per-channel std {[round(float(s), 2) for s in std]}")
        timed("encode", do_encode)

    decoder_dir = work_dir / "vae_refined"
    if "decoder" in stages and not (decoder_dir / "config.json").exists():
        def do_decoder():
            vae = StreamingVAE.from_pretrained(vae_dir)
            refine_decoder(vae.vae, load_frames(ds), recipe.vae, log, recipe.log_every)
            vae.vae.save_pretrained(decoder_dir, safe_serialization=True)
            refined = StreamingVAE.from_pretrained(decoder_dir)
            heldout = [make_clip(HELDOUT_SEED_START + i, recipe.data.psnr_seconds) for i in range(recipe.data.psnr_clips)]
            summary["vae_psnr_heldout_refined"] = reconstruction_psnr(refined, heldout)
            log(f"refined decoder reconstruction on held-out clips: {summary['vae_psnr_heldout_refined']}")
        timed("decoder", do_decoder)

    teacher_path = work_dir / "teacher.pt"
    if "stage1" in stages and not teacher_path.exists():
        def do_stage1():
            data = DitData.load(data_path)
            model = build_transformer(preset.model, recipe.stage1.seed)
            teacher = train_stage1(model, data, recipe.stage1, preset.stream, work_dir / "stage1.pt", log,
                                   recipe.log_every, recipe.checkpoint_every)
            torch.save(teacher.state_dict(), teacher_path)
        timed("stage1", do_stage1)

    method = recipe.stage2.method
    student_path = work_dir / f"student_{method}.pt"
    if "stage2" in stages and not student_path.exists():
        def do_stage2():
            data = DitData.load(data_path)
            teacher = build_transformer(preset.model, 0)
            teacher.load_state_dict(torch.load(teacher_path, map_location="cpu", weights_only=True))
            teacher.eval().requires_grad_(False)
            student = train_stage2(teacher, data, recipe.stage2, preset.stream, work_dir / f"stage2_{method}.pt",
                                   log, recipe.log_every, recipe.checkpoint_every)
            torch.save(student.state_dict(), student_path)
        timed(f"stage2_{method}", do_stage2)

    if "export" in stages:
        if out_dir is None:
            raise TrainingError("the export stage needs an output folder")

        def do_export():
            from ...engine.loading import save_bundle_checkpoint

            model = build_transformer(preset.model, 0)
            model.load_state_dict(torch.load(student_path, map_location="cpu", weights_only=True))
            if not (decoder_dir / "config.json").exists():
                raise TrainingError(f"{decoder_dir} is missing: run the 'decoder' stage first")
            vae = StreamingVAE.from_pretrained(decoder_dir)
            bundle = make_bundle(preset, model, vae)
            out_dir.mkdir(parents=True, exist_ok=True)
            for old in out_dir.glob("diffusion_pytorch_model*"):
                old.unlink()
            save_bundle_checkpoint(bundle, out_dir, dtype=weights_dtype)
            # The VAE ships in half precision too (it is loaded back as float32).
            StreamingVAE(vae.vae.to(weights_dtype)).vae.save_pretrained(out_dir / "vae", safe_serialization=True)
            vae.vae.to(torch.float32)
            # diffusers records the folder it loaded from: a path on the training machine, not part of the model.
            vae_config = json.loads((out_dir / "vae" / "config.json").read_text())
            vae_config.pop("_name_or_path", None)
            write_json(out_dir / "vae" / "config.json", vae_config)
            write_json(out_dir / "train_recipe.json", {"recipe": recipe.to_dict(), "stage2_method": method,
                                                       "weights_dtype": str(weights_dtype)})
        timed("export", do_export)
    summary["timings_s"] = timings
    prev = {}
    if (work_dir / "summary.json").exists():
        prev = json.loads((work_dir / "summary.json").read_text())
    prev.setdefault("timings_s", {}).update(timings)
    prev.update({k: v for k, v in summary.items() if k != "timings_s"})
    write_json(work_dir / "summary.json", prev)
    return prev
