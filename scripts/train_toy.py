#!/usr/bin/env python
"""Reproduce the embedded `toy` model's weights from scratch (CPU, nothing downloaded).

  python scripts/train_toy.py                       # full recipe -> services/avatarserve/weights/toy
  python scripts/train_toy.py --smoke --out /tmp/x  # a few steps of every stage (CI)
  python scripts/train_toy.py --evaluate            # also score the result on held-out people

Stages (each resumable from --work-dir): clips, vae, encode, decoder, stage1, stage2, export. The shipped
recipe's stage 2 is "none" (the stage-1 model is the 4-step student); `--stage2-method dmd` trains Self-Forcing
DMD and `--stage2-method tf` the rollout-regression student instead (see avatarserve/toy/train/dit.py).
Prints one JSON summary line at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from avatarserve.toy.train import FULL, SMOKE, STAGES, TrainingError, run
from avatarserve.toy.train.run import Logger

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "services" / "avatarserve" / "weights" / "toy"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny recipe: a few steps of every stage")
    p.add_argument("--work-dir", type=Path, help="intermediate results (default: a temp dir for --smoke, "
                                                  "./toy-train otherwise)")
    p.add_argument("--out", type=Path, help=f"checkpoint folder to write (default {DEFAULT_OUT}; required with --smoke)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--stage2-method", choices=("dmd", "tf"), help="override the recipe's stage 2 method")
    p.add_argument("--threads", type=int, help="torch intra-op threads (recipe default: 2)")
    p.add_argument("--evaluate", action="store_true", help="score the written checkpoint on held-out clips")
    p.add_argument("--eval-clips", type=int, default=20)
    p.add_argument("--eval-seconds", type=float, default=10.0)
    p.add_argument("--eval-stream-seconds", type=float, default=600.0, help="long held-out stream (0: skip)")
    args = p.parse_args(argv)

    recipe = SMOKE if args.smoke else FULL
    if args.stage2_method:
        recipe = recipe.replace_stage2(method=args.stage2_method)
    if args.threads:
        recipe = dataclasses.replace(recipe, threads=args.threads)
    if args.smoke and args.out is None:
        p.error("--smoke needs --out (the shipped weights are never overwritten by a smoke run)")
    out = args.out or DEFAULT_OUT
    tmp = None
    work = args.work_dir
    if work is None:
        if args.smoke:
            tmp = tempfile.TemporaryDirectory(prefix="toy-smoke-")
            work = Path(tmp.name)
        else:
            work = Path("toy-train")
    stages = [s for s in args.stages.split(",") if s]
    t0 = time.time()
    try:
        summary = run(work, out, recipe, stages=stages, log=Logger(Path(work) / "train.log"))
        summary["wall_s"] = round(time.time() - t0, 1)
        if args.evaluate:
            from avatarserve.engine.bundle import build_bundle
            from avatarserve.toy.train.data import write_json
            from avatarserve.toy.train.evaluate import full_report

            bundle = build_bundle("toy", checkpoint=str(out))
            report = full_report(bundle, args.eval_clips, args.eval_seconds, args.eval_stream_seconds,
                                 log=Logger(Path(work) / "train.log"))
            write_json(Path(work) / "quality.json", report)
            summary["eval"] = report["summary"]
    except TrainingError as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
