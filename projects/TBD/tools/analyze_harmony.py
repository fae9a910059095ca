#!/usr/bin/env python
"""Harmony analysis of a RetinaNet-type detector on a registered dataset.

    python projects/TBD/tools/analyze_harmony.py \\
        --config-file projects/TBD/configs/shapes/retinanet_R18_FPN64_student.yaml \\
        --dataset tbd_shapes_val --output output/harmony/student \\
        MODEL.WEIGHTS output/shapes/student_R18_FPN64/model_final.pth

Writes harmony.json (harmonious proportion, Spearman score-IoU correlation; undefined values as
null), score_iou_scatter.png and hs_heatmaps.png. With a DistillMetaArch config it analyses the
student; ``--teacher`` analyses the teacher of that config instead.
"""

from __future__ import annotations

import argparse
import sys

import tbd
from tbd.analysis import analyze_harmony, build_analysis_loader
from tbd.config import load_config
from tbd.data import add_dataset_arguments, ensure_generated, is_shapes_dataset, register_datasets
from tbd.engine.defaults import build_eval_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--dataset", help="registered dataset (default: first of DATASETS.TEST)")
    p.add_argument("--output", required=True, help="folder for harmony.json and the PNGs")
    p.add_argument("--delta", type=float, default=0.2, help="|score - IoU| <= delta: harmonious")
    p.add_argument("--iou-thresh", type=float, default=0.5)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--teacher", action="store_true", help="analyse the config's teacher")
    add_dataset_arguments(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    args = p.parse_args(argv)
    register_datasets(args)

    cfg = load_config(args.config_file, args.opts)
    if not args.teacher and not cfg.MODEL.WEIGHTS:
        sys.exit("MODEL.WEIGHTS is empty: pass the checkpoint to analyse (MODEL.WEIGHTS <file>).")
    if args.teacher:
        if cfg.MODEL.META_ARCHITECTURE not in ("DistillMetaArch", "DistillFCOS"):
            sys.exit("--teacher needs a DistillMetaArch or DistillFCOS config "
                     "(MODEL.DISTILL.TEACHER.*).")
        model, tcfg, _ = tbd.build_teacher(cfg)
        cfg.INPUT.FORMAT = tcfg.INPUT.FORMAT
    else:  # the student or a stock model, its weights checked key by key
        model = build_eval_model(cfg)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    if is_shapes_dataset(dataset):
        ensure_generated(dataset)
    loader = build_analysis_loader(cfg, dataset)
    try:
        stats = analyze_harmony(model, loader, args.output, delta=args.delta,
                                iou_thresh=args.iou_thresh, max_images=args.max_images)
    except TypeError as e:
        sys.exit(str(e))
    print(stats.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
