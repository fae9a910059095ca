#!/usr/bin/env python
"""Train and evaluate TBD students (and their teachers) with Detectron2's engine.

    python projects/TBD/train_net.py --config-file projects/TBD/configs/shapes/tbd_R34_to_R18.yaml
    python projects/TBD/train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <model.pth>

``--eval-only`` builds the student alone (a stock RetinaNet, no teacher) and loads a training
checkpoint of DistillMetaArch into it, dropping the distillation-only ``distillers.*`` keys.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys

import detectron2.utils.comm as comm
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

import tbd
from tbd.checkpoint import StudentCheckpointer
from tbd.config import load_config
from tbd.data import ensure_generated, is_shapes_dataset

logger = logging.getLogger("tbd.train_net")


class Trainer(DefaultTrainer):
    """DefaultTrainer with COCO evaluation; synthetic datasets are generated on first use."""

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        if is_shapes_dataset(dataset_name):
            ensure_generated(dataset_name)  # COCOEvaluator reads the json_file metadata
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def check_inputs(cfg: CfgNode, args) -> None:
    """Fail before any training on unknown datasets or missing weight files, naming them."""
    registered = set(DatasetCatalog.list())
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in registered:
                close = sorted(n for n in registered if n.startswith(name.split("_")[0]))[:10]
                raise SystemExit(
                    f"DATASETS.{key}: dataset '{name}' is not registered. Register it with "
                    f"detectron2.data.datasets.register_coco_instances (see README, 'Your own "
                    f"dataset'). Similar registered names: {close}"
                )
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise SystemExit(f"MODEL.WEIGHTS={weights!r}: file not found (cwd {os.getcwd()}).")


def setup(args) -> CfgNode:
    """Config from file + command-line overrides, with Detectron2's default setup."""
    if not args.config_file or not os.path.isfile(args.config_file):
        raise SystemExit(f"--config-file {args.config_file!r}: file not found (cwd {os.getcwd()}).")
    cfg = load_config(args.config_file, args.opts, cpu_fallback=False)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        # Convenience for the CPU-first configs: Detectron2's default device is "cuda".
        logger.warning("MODEL.DEVICE=%s but CUDA is unavailable: using cpu.", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    check_inputs(cfg, args)
    default_setup(cfg, args)
    # default_setup configures the "detectron2" and "fvcore" loggers; ours (teacher load report,
    # first-step distillation terms) go to the same console and log file.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="tbd")
    return cfg


def build_eval_model(cfg: CfgNode):
    """The student alone, as a stock RetinaNet: ``--eval-only`` builds no teacher."""
    if cfg.MODEL.META_ARCHITECTURE == "DistillMetaArch":
        model = build_model(tbd.student_config(cfg))
        StudentCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=False
        )
    else:
        model = build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=False
        )
    return model


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None  # undefined metric (e.g. APl without large objects)
    return x


def write_results(results, path: str) -> None:
    """Evaluation results as JSON (NaN written as null), atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_json_safe(dict(results)), f, indent=2)
    os.replace(tmp, path)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = build_eval_model(cfg)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
            write_results(res, os.path.join(cfg.OUTPUT_DIR, "eval_results.json"))
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    # DefaultTrainer.train() returns the final evaluation only when TEST.EXPECTED_RESULTS is set;
    # return it in every case so scripts (demo, benchmarks) can read it.
    return results if results is not None else getattr(trainer, "_last_eval_results", None)


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    sys.exit(invoke_main())
