#!/usr/bin/env python
"""Turn a training checkpoint (DistillMetaArch, DistillFCOS or another wrapper) into a model-zoo
release.

    python projects/TBD/tools/export_student.py \\
        --config-file projects/TBD/configs/shapes/tbd_R18_FPN256_to_R18_FPN64.yaml \\
        --checkpoint output/shapes/tbd_R18_FPN256_to_R18_FPN64/model_final.pth \\
        --output release/tbd_R18_FPN256_to_R18_FPN64

Writes ``model_final_<sha256[:8]>.pth`` (student weights only, stock RetinaNet or FCOS keys),
``model_final_<sha8>.json`` (config, teacher, schedule, AP, training time, commit) and
``model_final_<sha8>_config.yaml`` (a student config that stock Detectron2 accepts: no
MODEL.DISTILL keys); for FCOS also ``model_final_<sha8>_lazy.py``, the LazyConfig stock
Detectron2 builds it from. AP and training time are read from the run's ``metrics.json`` (or
``eval_results.json``) next to the checkpoint when present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import tbd
from tbd.checkpoint import ReleaseError, export_student
from tbd.config import load_config
from tbd.modeling.teacher import stock_meta_architecture


def run_metadata(cfg, checkpoint: Path) -> dict:
    meta: dict = {
        "config": None,  # filled with the student config below
        "student_meta_architecture": stock_meta_architecture(cfg.MODEL.META_ARCHITECTURE),
        "schedule": {"max_iter": cfg.SOLVER.MAX_ITER, "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
                     "base_lr": cfg.SOLVER.BASE_LR, "steps": list(cfg.SOLVER.STEPS)},
        "datasets": {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)},
        "teacher": None,
        "AP": None,
        "bbox": None,
        "train_s_per_iter": None,
    }
    if cfg.MODEL.META_ARCHITECTURE != meta["student_meta_architecture"]:  # a distilling one
        t = cfg.MODEL.DISTILL.TEACHER
        meta["teacher"] = {"config": t.CONFIG, "weights": t.WEIGHTS, "opts": list(t.OPTS),
                           "losses": list(cfg.MODEL.DISTILL.LOSSES)}
    run_dir = checkpoint.parent
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        evals = [r for r in recs if "bbox/AP" in r]
        if evals:
            meta["bbox"] = {k[5:]: v for k, v in evals[-1].items() if k.startswith("bbox/")}
        times = [r["time"] for r in recs if "time" in r]
        meta["train_s_per_iter"] = statistics.median(times) if times else None
    results = run_dir / "eval_results.json"
    if meta["bbox"] is None and results.is_file():
        meta["bbox"] = json.loads(results.read_text()).get("bbox")
    if meta["bbox"]:
        ap = meta["bbox"].get("AP")
        meta["AP"] = None if ap is None or ap != ap else ap
    try:
        # the project's commit, also when the tool runs outside the repository
        meta["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                        text=True, check=True,
                                        cwd=Path(tbd.__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        meta["commit"] = None
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True, help="config the checkpoint was trained with")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True, help="release folder")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides used in training")
    args = p.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    meta = run_metadata(cfg, Path(args.checkpoint))
    student = tbd.student_config(cfg)
    student.MODEL.WEIGHTS = ""
    meta["config"] = student.dump()
    try:
        path = export_student(args.checkpoint, student, args.output, meta)
    except ReleaseError as e:
        sys.exit(str(e))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
