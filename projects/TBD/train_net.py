#!/usr/bin/env python
"""Train and evaluate TBD students (and their teachers) with Detectron2's engine.

    python projects/TBD/train_net.py --config-file projects/TBD/configs/shapes/tbd_R34_to_R18.yaml
    python projects/TBD/train_net.py --config-file <cfg> --resume          # after an interruption
    python projects/TBD/train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <model.pth>
    python projects/TBD/train_net.py --config-file <cfg> --num-gpus 8      # DDP on 8 GPUs
    python projects/TBD/train_net.py --config-file <cfg> --num-gpus 2 --dist-backend gloo \
        MODEL.DEVICE cpu                                                    # 2 CPU processes

Everything that can be checked is checked before the output folder is written: the config keys,
dataset names and contents, weight files, the teacher (built and loaded), and on ``--resume`` that
the checkpoint's teacher is this one. A bad input therefore fails with a message that names the key
or file, and leaves OUTPUT_DIR as it was.

``--eval-only`` builds the student alone (a stock RetinaNet, no teacher) and loads a training
checkpoint of DistillMetaArch into it, dropping the distillation-only ``distillers.*`` keys.
"""

from __future__ import annotations

import contextlib
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
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

import tbd
from tbd.checkpoint import (
    StudentCheckpointer,
    TrainingCheckpointer,
    atomic_write_text,
    is_complete_checkpoint,
)
from tbd.config import load_config
from tbd.data import load_train_dicts
from tbd.engine import DistillTrainer, launch
from tbd.engine.launch import BACKENDS
from tbd.engine.trainer import check_same_teacher

logger = logging.getLogger("tbd.train_net")

Trainer = DistillTrainer  # the name Detectron2 projects use


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
    if weights and "://" not in weights:
        if not os.path.isfile(weights):
            raise SystemExit(f"MODEL.WEIGHTS={weights!r}: file not found (cwd {os.getcwd()}).")
        if not is_complete_checkpoint(weights):
            raise SystemExit(f"MODEL.WEIGHTS={weights!r}: the file is empty or truncated (not a "
                             "complete checkpoint). Copy or download it again.")
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise SystemExit("SOLVER.AMP.ENABLED=True needs MODEL.DEVICE=cuda: Detectron2's AMPTrainer "
                         "is CUDA-only. Set SOLVER.AMP.ENABLED False on CPU.")


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
    return cfg


def setup_outputs(cfg: CfgNode, args) -> None:
    """Detectron2's default setup (output folder, config.yaml, log file, seed) and our logger."""
    default_setup(cfg, args)
    # default_setup configures the "detectron2" and "fvcore" loggers; ours (teacher load report,
    # first-step distillation terms) go to the same console and log file.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="tbd")


class _Buffer(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_logs(names=("tbd", "detectron2", "fvcore")):
    """Hold log records while nothing may be written yet (see ``replay``); on an error, print
    them to stderr with the error."""
    buf = _Buffer()
    saved = []
    for name in names:
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers, lg.level, lg.propagate))
        lg.handlers, lg.propagate = [buf], False
        lg.setLevel(logging.DEBUG)
    try:
        yield buf
    except BaseException:
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(logging.Formatter("[%(name)s] %(levelname)s %(message)s"))
        for r in buf.records:
            if r.levelno >= logging.INFO:
                err.handle(r)
        raise
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)


def replay(buf: _Buffer) -> None:
    for r in buf.records:
        lg = logging.getLogger(r.name)
        if lg.isEnabledFor(r.levelno):
            lg.handle(r)


def resume_teacher_check(cfg: CfgNode, model) -> None:
    """On --resume, refuse a checkpoint trained with another teacher, before anything is written.

    (DistillTrainer.load_state_dict checks again when the checkpoint is loaded.)
    """
    ckpt = TrainingCheckpointer(model, cfg.OUTPUT_DIR, save_to_disk=False)
    if not ckpt.has_checkpoint():
        return
    path = ckpt.get_checkpoint_file()
    state = torch.load(path, map_location="cpu", weights_only=False).get("trainer", {})
    if "tbd" in state:
        check_same_teacher(state["tbd"].get("teacher"),
                           getattr(model, "teacher_fingerprint", None), path)


def prepare(cfg: CfgNode, args):
    """Build and check everything a training needs; write nothing. Returns (model, dicts)."""
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())  # as default_setup
    dicts = load_train_dicts(cfg)
    model = Trainer.build_model(cfg)
    if args.resume:
        resume_teacher_check(cfg, model)
    return model, dicts


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
    atomic_write_text(path, json.dumps(_json_safe(dict(results)), indent=2))


def main(args):
    cfg = setup(args)
    if args.eval_only:
        setup_outputs(cfg, args)
        model = build_eval_model(cfg)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
            write_results(res, os.path.join(cfg.OUTPUT_DIR, "eval_results.json"))
        return res
    with held_logs() as held:
        model, dicts = prepare(cfg, args)
    setup_outputs(cfg, args)
    replay(held)
    trainer = Trainer(cfg, model=model, train_dicts=dicts)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    # DefaultTrainer.train() returns the final evaluation only when TEST.EXPECTED_RESULTS is set;
    # return it in every case so scripts (demo, benchmarks) can read it.
    return results if results is not None else getattr(trainer, "_last_eval_results", None)


def argument_parser():
    """Detectron2's parser, plus --dist-backend (gloo runs --num-gpus CPU processes)."""
    parser = default_argument_parser()
    parser.add_argument(
        "--dist-backend", default="auto", choices=BACKENDS,
        help="auto: nccl with CUDA, else gloo. With gloo, --num-gpus is the number of CPU "
        "processes per machine (set MODEL.DEVICE cpu).",
    )
    return parser


def invoke_main() -> None:
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        backend=args.dist_backend,
    )


if __name__ == "__main__":
    sys.exit(invoke_main())
