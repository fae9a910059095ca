"""Config keys of the TBD project: ``add_tbd_config(cfg)`` and their validation.

Every key has a comment. The keys shared by all distillers (which distillers, the schedule, the
teacher) are declared here; each registered distiller declares and validates its own keys in its
file (``tbd/distillers/``), and ``add_tbd_config`` collects them. Keys marked [ours] are our
reconstruction of the paper (only its abstract is public): docs/METHOD.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from detectron2.config import CfgNode as CN

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config key has a value that cannot work; the message names the key and what to do."""


def add_tbd_config(cfg: CN) -> None:
    """Add the ``MODEL.DISTILL`` keys (defaults are the method's defaults) to ``cfg`` in place:
    the shared keys below and those of every registered distiller."""
    from .distillers import registered_distillers
    from .modeling.fcos import add_fcos_config

    _C = cfg
    if "FCOS" not in _C.MODEL:
        add_fcos_config(_C)
    _C.MODEL.DISTILL = CN()
    # Registered distillers (tbd.distillers.DISTILL_LOSS_REGISTRY) applied to the student, in
    # order. TBD is ["HD", "TFD"]; ["HD"] and ["TFD"] are its ablations; [] trains the student
    # alone.
    _C.MODEL.DISTILL.LOSSES = ["HD", "TFD"]
    # The student's FPN levels whose features are distilled; [] means all the levels its head
    # uses (MODEL.RETINANET.IN_FEATURES or MODEL.FCOS.IN_FEATURES). Each is paired with the
    # teacher's level of the same stride. Set a subset when the teacher lacks a stride (a Faster
    # R-CNN FPN has p2-p6, RetinaNet p3-p7): then only feature distillers (FGD, PKD, MGD) apply.
    _C.MODEL.DISTILL.LEVELS = []
    # Iteration at which distillation starts (loss factor 0 before it).
    _C.MODEL.DISTILL.START_ITER = 0
    # Iteration at which distillation stops (factor 0 from it on); -1: never stop.
    _C.MODEL.DISTILL.STOP_ITER = -1
    # Linear warm-up of every distillation term, in iterations after START_ITER.
    # -1 means min(500, SOLVER.MAX_ITER // 10) [ours; FRS warms up over 500 iterations].
    _C.MODEL.DISTILL.WARMUP_ITERS = -1
    # Diagnostics (mean HS, mask masses, per-level losses) are written to the event storage every
    # LOG_PERIOD iterations with one batched device-to-host copy; 0 disables them.
    _C.MODEL.DISTILL.LOG_PERIOD = 20
    # Check every step that each distillation term is finite and stop with the term's name and a
    # diagnosis of its inputs if not (one device-to-host copy per step, which Detectron2's metric
    # writer already does). False leaves non-finite losses to Detectron2's own check.
    _C.MODEL.DISTILL.CHECK_FINITE = True

    # Inheriting (FGD's and MGD's official configs use it): before the first step of a new run,
    # copy every teacher parameter outside the bottom-up backbone (the FPN and the head) whose
    # name and shape match the student's; a report of what was copied is logged. Never applied
    # on --resume, which continues from the checkpoint.
    _C.MODEL.DISTILL.INHERIT = False

    # How many periodic training checkpoints to keep (each holds the student, the adapters and
    # the optimizer's momentum, about twice the trained weights); 0 keeps all, as Detectron2.
    # model_final.pth is always kept; after --resume the count restarts. Not a stock key:
    # releases drop it.
    _C.SOLVER.CHECKPOINT_MAX_TO_KEEP = 0

    _C.MODEL.DISTILL.AUTO_WEIGHT = CN()
    # Automatic loss weights [ours] (tbd/modeling/auto_weight.py): measure, over the first ITERS
    # iterations from START_ITER, each distiller's weighted total against the detection loss,
    # then scale all its terms by one factor so that the ratio becomes TARGET.<name>. The scales
    # are logged, checkpointed (--resume keeps them) and reported at the end of training.
    _C.MODEL.DISTILL.AUTO_WEIGHT.ENABLED = False
    # Measured iterations (with the configured weights); the scales apply from START_ITER + ITERS.
    _C.MODEL.DISTILL.AUTO_WEIGHT.ITERS = 100
    # Target ratio (distiller total / detection loss) per registered distiller, e.g.
    # MODEL.DISTILL.AUTO_WEIGHT.TARGET.HD 0.5 [ours: 1.0 for every distiller].
    _C.MODEL.DISTILL.AUTO_WEIGHT.TARGET = CN()

    _C.MODEL.DISTILL.TEACHER = CN()
    # Teacher config: a yaml path (relative to the working directory) or a Detectron2 model-zoo
    # name such as "COCO-Detection/retinanet_R_101_FPN_3x.yaml". Required.
    _C.MODEL.DISTILL.TEACHER.CONFIG = ""
    # Teacher weights: a local file or a detectron2:// URL. Required unless ALLOW_RANDOM_INIT.
    _C.MODEL.DISTILL.TEACHER.WEIGHTS = ""
    # Overrides merged into the teacher config, e.g. ["MODEL.RETINANET.NUM_CLASSES", "5"].
    _C.MODEL.DISTILL.TEACHER.OPTS = []
    # Allow a teacher with random weights (no WEIGHTS). For tests and debugging only.
    _C.MODEL.DISTILL.TEACHER.ALLOW_RANDOM_INIT = False
    # Evaluate the teacher on the first EVAL_MAX_IMAGES images of DATASETS.TEST[0] before
    # training (also on --resume), as it sees them during distillation (the student's input in
    # its own format), and refuse to train, writing nothing, when its bbox AP is below
    # EVAL_MIN_AP: the sign of unloaded weights, a wrong class mapping or input format. Skipped,
    # with the reason logged, when DATASETS.TEST is empty or the teacher is random
    # (ALLOW_RANDOM_INIT without WEIGHTS).
    _C.MODEL.DISTILL.TEACHER.EVAL_BEFORE_TRAIN = True
    # Images the check evaluates (the first ones of the test set); 0: all of them.
    _C.MODEL.DISTILL.TEACHER.EVAL_MAX_IMAGES = 200
    # The lowest bbox AP (COCO AP in percent, 0-100) the check accepts [ours: 5, far below a
    # working teacher's AP and far above the 0-1 AP of an unloaded or mis-mapped one].
    _C.MODEL.DISTILL.TEACHER.EVAL_MIN_AP = 5.0
    # Keep the teacher's outputs for each training input in memory, up to this many MB, and
    # skip the teacher's forward for a batch whose inputs all came before (the same image with
    # the same augmentation). The frozen teacher's outputs for an input never change, so the
    # training is the same with or without it; worth it on small datasets with fixed sizes and
    # flips only (the synthetic data: projects/TBD/benchmarks/teacher_cache_check.py), useless
    # under random scales or crops. Memory: a sample's teacher FPN features and head outputs
    # (about 25 KB at 64x64 px with 64 channels; megabytes at COCO sizes), on the model's
    # device. Not used with distillers that read the teacher head's internals (CrossKD).
    # 0: off [ours].
    _C.MODEL.DISTILL.TEACHER.CACHE_MB = 0.0

    for name, distiller in registered_distillers().items():
        distiller.add_config(_C)
        _C.MODEL.DISTILL.AUTO_WEIGHT.TARGET[name] = 1.0


# The repository root (an editable install): the shipped configs name teacher paths relative to it.
REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_teacher_paths(cfg: CN, config_file: str) -> None:
    """Relative MODEL.DISTILL.TEACHER.CONFIG / WEIGHTS that do not exist from the working
    directory are looked up beside the config file, then in the repository root, so that the
    shipped configs work from anywhere; a model-zoo name or URL is left as it is."""
    if "DISTILL" not in cfg.MODEL:
        return
    t = cfg.MODEL.DISTILL.TEACHER
    for key in ("CONFIG", "WEIGHTS"):
        path = t[key]
        if not path or "://" in path or os.path.isabs(path) or os.path.exists(path):
            continue
        for base in (Path(config_file).resolve().parent, REPO_ROOT):
            if (base / path).exists():
                t[key] = str(base / path)
                logger.info("MODEL.DISTILL.TEACHER.%s=%r: using %s", key, path, t[key])
                break


def load_config(config_file: str, opts: list | None = None, cpu_fallback: bool = True) -> CN:
    """get_cfg() + add_tbd_config + a yaml + overrides, teacher paths resolved
    (``resolve_teacher_paths``); ``cuda`` falls back to cpu if absent.

    Detectron2's default MODEL.DEVICE is "cuda"; the fallback lets the CPU-first configs and tools
    run anywhere (a warning is logged by callers that care).
    """
    import torch
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_tbd_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    resolve_teacher_paths(cfg, config_file)
    if cpu_fallback and cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def validate_distill_config(cfg: CN) -> None:
    """Check the ``MODEL.DISTILL`` keys (shared ones here, each registered distiller's own in its
    ``validate_config``); raise ConfigError naming the bad key."""
    from .distillers import registered_distillers

    d = cfg.MODEL.DISTILL
    if d.STOP_ITER >= 0 and d.STOP_ITER <= d.START_ITER:
        raise ConfigError(
            f"MODEL.DISTILL.STOP_ITER ({d.STOP_ITER}) must be -1 or > START_ITER ({d.START_ITER})."
        )
    if d.START_ITER < 0:
        raise ConfigError(f"MODEL.DISTILL.START_ITER must be >= 0, got {d.START_ITER}.")
    if d.WARMUP_ITERS < -1:
        raise ConfigError(f"MODEL.DISTILL.WARMUP_ITERS must be -1 (automatic) or >= 0, got "
                          f"{d.WARMUP_ITERS}.")
    if d.LOG_PERIOD < 0:
        raise ConfigError(f"MODEL.DISTILL.LOG_PERIOD must be >= 0 (0: off), got {d.LOG_PERIOD}.")
    auto = d.AUTO_WEIGHT
    if auto.ENABLED:
        if not isinstance(auto.ITERS, int) or auto.ITERS < 1:
            raise ConfigError(f"MODEL.DISTILL.AUTO_WEIGHT.ITERS must be a whole number >= 1, got "
                              f"{auto.ITERS!r}.")
        if d.START_ITER + auto.ITERS >= cfg.SOLVER.MAX_ITER:
            raise ConfigError(
                f"MODEL.DISTILL.AUTO_WEIGHT.ITERS ({auto.ITERS}) from START_ITER ({d.START_ITER}) "
                f"reaches SOLVER.MAX_ITER ({cfg.SOLVER.MAX_ITER}): the scales would never be used. "
                "Lower ITERS.")
        for name in d.LOSSES:
            target = auto.TARGET.get(name)
            if not isinstance(target, (int, float)) or not target > 0 or target == float("inf"):
                raise ConfigError(f"MODEL.DISTILL.AUTO_WEIGHT.TARGET.{name} must be a finite "
                                  f"number > 0, got {target!r}.")
    t = d.TEACHER
    if not isinstance(t.EVAL_MAX_IMAGES, int) or t.EVAL_MAX_IMAGES < 0:
        raise ConfigError(f"MODEL.DISTILL.TEACHER.EVAL_MAX_IMAGES must be 0 (all) or a whole "
                          f"number >= 1, got {t.EVAL_MAX_IMAGES!r}.")
    if not isinstance(t.CACHE_MB, (int, float)) or not 0 <= t.CACHE_MB < float("inf"):
        raise ConfigError(f"MODEL.DISTILL.TEACHER.CACHE_MB must be a number of megabytes >= 0 "
                          f"(0: no cache), got {t.CACHE_MB!r}.")
    if not isinstance(t.EVAL_MIN_AP, (int, float)) or not 0 <= t.EVAL_MIN_AP <= 100:
        raise ConfigError(f"MODEL.DISTILL.TEACHER.EVAL_MIN_AP is a COCO AP in percent (0-100), "
                          f"got {t.EVAL_MIN_AP!r}.")
    for distiller in registered_distillers().values():
        distiller.validate_config(cfg)


def resolve_warmup_iters(cfg: CN) -> int:
    """``MODEL.DISTILL.WARMUP_ITERS``, with -1 resolved to min(500, SOLVER.MAX_ITER // 10)."""
    w = cfg.MODEL.DISTILL.WARMUP_ITERS
    return min(500, cfg.SOLVER.MAX_ITER // 10) if w < 0 else int(w)


def student_config(cfg: CN) -> CN:
    """A stock-Detectron2 config of the student (e.g. RetinaNet for DistillMetaArch), without the
    project's keys (``MODEL.DISTILL``, ``SOLVER.CHECKPOINT_MAX_TO_KEEP``, and ``MODEL.FCOS``
    unless the student is an FCOS): stock ``get_cfg()`` rejects unknown keys, so a released
    student config must not carry them. (An FCOS release also needs its LazyConfig file: stock
    Detectron2 builds FCOS only from one; ``tbd.checkpoint.release``.)"""
    from .modeling.teacher import stock_meta_architecture

    out = cfg.clone()
    out.defrost()
    out.MODEL.META_ARCHITECTURE = stock_meta_architecture(out.MODEL.META_ARCHITECTURE)
    if "DISTILL" in out.MODEL:
        del out.MODEL["DISTILL"]
    if "CHECKPOINT_MAX_TO_KEEP" in out.SOLVER:
        del out.SOLVER["CHECKPOINT_MAX_TO_KEEP"]
    if out.MODEL.META_ARCHITECTURE != "FCOS" and "FCOS" in out.MODEL:
        del out.MODEL["FCOS"]
    return out


def flatten(node: CN, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf of a config (tuples as lists, as yaml writes them)."""
    out = {}
    for k, v in node.items():
        if isinstance(v, CN):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def changed_keys(cfg: CN, defaults: CN) -> dict[str, object]:
    """Dotted key -> value of the leaves of ``cfg`` that ``defaults`` lacks or has otherwise."""
    base = flatten(defaults)
    return {k: v for k, v in sorted(flatten(cfg).items()) if k not in base or base[k] != v}


def portable_dump(cfg: CN) -> str:
    """``cfg`` as yaml with only the keys whose value differs from stock Detectron2's defaults
    (plus ``VERSION``), so that Detectron2 versions with other sets of keys read it.

    A full ``dump()`` written by Detectron2 main lists main's extra keys, which v0.6's
    ``get_cfg()`` rejects ("Non-existent config key"); keys left at their defaults are not needed
    to rebuild the same model. For stock configs (no ``MODEL.DISTILL``).
    """
    import yaml
    from detectron2.config import get_cfg

    nested: dict = {}
    for key, value in {**changed_keys(cfg, get_cfg()), "VERSION": cfg.VERSION}.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return yaml.safe_dump(nested, sort_keys=True)
