"""What ``projects/TBD/train_net.py`` does, as library functions: the config, the checks run
before anything is written, the output set-up, training and evaluation.

Everything that can be checked is checked before the output folder is written: the config keys,
dataset names and contents, weight files, the teacher (built and loaded), and on ``--resume`` that
the checkpoint's teacher is this one. A bad input therefore fails with a message that names the key
or file, and leaves OUTPUT_DIR as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

import detectron2.utils.comm as comm
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from ..checkpoint import TrainingCheckpointer, atomic_write_text, is_complete_checkpoint
from ..checkpoint.io import json_safe
from ..checkpoint.training import CheckpointError, load_with_report
from ..config import ConfigError, load_config, student_config
from ..data import add_dataset_arguments, load_train_dicts, register_datasets
from ..data.loader import DataError, check_test_sets
from ..modeling.teacher import TeacherError, check_resume_teacher, stock_meta_architecture
from .launch import BACKENDS
from .teacher_check import check_teacher
from .trainer import DistillTrainer, rng_state, set_rng_state

logger = logging.getLogger(__name__)


def argument_parser():
    """Detectron2's parser, plus --dist-backend (gloo runs --num-gpus CPU processes) and the
    dataset registration options (--register-coco, --dataset-module)."""
    parser = default_argument_parser()
    parser.add_argument(
        "--dist-backend", default="auto", choices=BACKENDS,
        help="auto: nccl with CUDA, else gloo. With gloo, --num-gpus is the number of CPU "
        "processes per machine (set MODEL.DEVICE cpu).",
    )
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of an input error (the teacher, the data, "
                        "a config key, a checkpoint), not only its message")
    return add_dataset_arguments(parser)


# The project's own input errors: their messages say which key or file and what to do, so the
# user sees the message alone (the traceback goes to the log when there is one, or with
# --traceback to the console).
INPUT_ERRORS = (TeacherError, DataError, ConfigError, CheckpointError)


@contextlib.contextmanager
def input_errors_reported(args):
    """Turn the project's input errors into a clean exit with their message (see INPUT_ERRORS)."""
    try:
        yield
    except INPUT_ERRORS as e:
        if getattr(args, "traceback", False):
            raise
        logger.debug("Input error", exc_info=True)  # in OUTPUT_DIR's log.txt once it exists
        raise SystemExit(f"{type(e).__name__}: {e}") from None


def check_inputs(cfg: CfgNode) -> None:
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
    for key in ("MAX_ITER", "CHECKPOINT_PERIOD", "IMS_PER_BATCH"):
        value = cfg.SOLVER[key]
        if not isinstance(value, int) or value < 1:
            raise SystemExit(f"SOLVER.{key}={value!r}: must be a whole number >= 1.")
    keep = cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP
    if not isinstance(keep, int) or keep < 0:
        raise SystemExit(f"SOLVER.CHECKPOINT_MAX_TO_KEEP={keep!r}: must be 0 (keep all) or a "
                         "whole number >= 1.")
    if cfg.SOLVER.IMS_PER_BATCH % comm.get_world_size():
        raise SystemExit(f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is the total over "
                         f"{comm.get_world_size()} processes and must divide by their number.")


def setup_config(args) -> CfgNode:
    """Config from file + command-line overrides, checked; writes nothing. Registers the datasets
    the command line names first (``--register-coco``, ``--dataset-module``)."""
    register_datasets(args)
    if not args.config_file or not os.path.isfile(args.config_file):
        raise SystemExit(f"--config-file {args.config_file!r}: file not found (cwd {os.getcwd()}).")
    cfg = load_config(args.config_file, args.opts, cpu_fallback=False)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        # Convenience for the CPU-first configs: Detectron2's default device is "cuda".
        logger.warning("MODEL.DEVICE=%s but CUDA is unavailable: using cpu.", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    check_inputs(cfg)
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
    """Hold log records while nothing may be written yet (see ``replay``); on an error, print the
    held warnings to stderr before the error (the info records would bury its message)."""
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
            if r.levelno >= logging.WARNING:
                err.handle(r)
        raise
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)


def replay(buf: _Buffer) -> None:
    """Send the held records to the loggers, now configured by ``setup_outputs``."""
    for r in buf.records:
        lg = logging.getLogger(r.name)
        if lg.isEnabledFor(r.levelno):
            lg.handle(r)


def prepare_training(cfg: CfgNode, args, trainer_cls=DistillTrainer):
    """Build and check everything a training needs; write nothing. Returns (model, dicts); the
    teacher check's result (or None) is kept as ``model.teacher_check``.

    On ``--resume``, the newest checkpoint's teacher is compared with this one here, once. The
    teacher check (``tbd.engine.teacher_check``) runs on new and resumed runs alike: it costs an
    evaluation of a few hundred images and catches a teacher file replaced between the runs.
    """
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())  # as default_setup
    dicts = load_train_dicts(cfg)
    model = trainer_cls.build_model(cfg)
    if args.resume:
        ckpt = TrainingCheckpointer(model, cfg.OUTPUT_DIR, save_to_disk=False)
        if ckpt.has_checkpoint():
            check_resume_teacher(ckpt.get_checkpoint_file(), model)
    # The check's data loader draws from the global RNGs: restored, so that the training is the
    # same with and without the check.
    saved = rng_state()
    model.teacher_check = check_teacher(cfg, model)
    set_rng_state(saved)
    return model, dicts


def build_eval_model(cfg: CfgNode):
    """The student alone, as its stock detector, with MODEL.WEIGHTS loaded and checked:
    ``--eval-only`` builds no teacher, drops a distillation checkpoint's ``distillers.*`` keys,
    and refuses weights that leave any of the model's tensors unloaded (a teacher's or another
    architecture's checkpoint, or none at all), which would evaluate a random model."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise SystemExit("MODEL.WEIGHTS is empty: give the checkpoint to evaluate (a training "
                         "checkpoint or a release); a random model would be evaluated otherwise.")
    distilling = stock_meta_architecture(cfg.MODEL.META_ARCHITECTURE) != \
        cfg.MODEL.META_ARCHITECTURE
    model = build_model(student_config(cfg) if distilling else cfg)
    try:
        report = load_with_report(model, weights, strip_distillers=distilling)
    except Exception as e:  # noqa: BLE001 - unreadable, truncated, not a checkpoint
        raise SystemExit(f"MODEL.WEIGHTS={weights!r} could not be loaded ({type(e).__name__}: "
                         f"{e}). Is it a complete Detectron2/PyTorch checkpoint?") from e
    if not report.complete:
        raise SystemExit(
            f"MODEL.WEIGHTS={weights!r} does not fit the {type(model).__name__} of this config: "
            f"{len(report.missing)} of its tensors are missing from the file and "
            f"{len(report.shape_mismatch)} have other shapes. Is it a checkpoint of this model "
            f"(not its teacher's, nor another architecture's)?\n{report.summary()}")
    if report.unexpected:
        logger.warning("MODEL.WEIGHTS has %d tensors the model does not use (ignored): %s",
                       len(report.unexpected), report.unexpected[:10])
    return model


def write_results(results, path: str) -> None:
    """Evaluation results as JSON (NaN written as null), atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_text(path, json.dumps(json_safe(dict(results)), indent=2, allow_nan=False))


def evaluate(cfg: CfgNode, args, trainer_cls=DistillTrainer):
    """``--eval-only``: the student's COCO evaluation, also written to eval_results.json. The
    model, its weights and the test sets are checked before anything is written."""
    with held_logs() as held:
        model = build_eval_model(cfg)
        if not cfg.DATASETS.TEST:
            raise SystemExit("--eval-only: DATASETS.TEST is empty: name the dataset to evaluate.")
        check_test_sets(cfg)
    setup_outputs(cfg, args)
    replay(held)
    res = trainer_cls.test(cfg, model)
    if comm.is_main_process():
        verify_results(cfg, res)
        write_results(res, os.path.join(cfg.OUTPUT_DIR, "eval_results.json"))
    return res


def train(cfg: CfgNode, args, trainer_cls=DistillTrainer):
    """Check and build everything, then write the outputs, train and return the last evaluation.

    DefaultTrainer.train() returns the final evaluation only when TEST.EXPECTED_RESULTS is set;
    it is returned in every case so that scripts (demo, benchmarks) can read it.
    """
    with held_logs() as held:
        model, dicts = prepare_training(cfg, args, trainer_cls)
    setup_outputs(cfg, args)
    replay(held)
    if model.teacher_check is not None and comm.is_main_process():
        write_results(model.teacher_check, os.path.join(cfg.OUTPUT_DIR, "teacher_check.json"))
    trainer = trainer_cls(cfg, model=model, train_dicts=dicts)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    return results if results is not None else getattr(trainer, "_last_eval_results", None)
