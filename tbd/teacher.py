"""Build, load and freeze the teacher from its own config and weights.

The teacher is always rebuilt from ``MODEL.DISTILL.TEACHER.{CONFIG,WEIGHTS,OPTS}``, also on
``--resume``: it is never part of the student's checkpoints. Detectron2's checkpointer is not
strict, so the load is checked here key by key and shape by shape, and a teacher that did not load
fully is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.utils.file_io import PathManager
from torch import nn

from .checkpoint import sha256_file

logger = logging.getLogger(__name__)

SUPPORTED_PAIRS = "RetinaNet-type dense detectors (RetinaNet or a subclass) -> RetinaNet student"


class TeacherError(ValueError):
    """The teacher's config or weights cannot be used; the message says which key and why."""


@dataclass
class TeacherLoadReport:
    """What a teacher checkpoint load did: keys the model lacked, extra keys, shape mismatches."""

    weights: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.shape_mismatch

    def summary(self) -> str:
        lines = [f"Teacher load report for {self.weights}:"]
        lines.append(f"  missing keys ({len(self.missing)}): {self.missing[:10]}")
        lines.append(f"  unexpected keys ({len(self.unexpected)}): {self.unexpected[:10]}")
        lines.append(
            f"  shape mismatches ({len(self.shape_mismatch)}): "
            + ", ".join(f"{k} ckpt{a} vs model{b}" for k, a, b in self.shape_mismatch[:10])
        )
        return "\n".join(lines)


class _ReportingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that keeps the incompatible-keys result instead of only logging it."""

    incompatible = None

    def _load_model(self, checkpoint):  # fvcore/detectron2 hook, stable since detectron2 v0.2
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def resolve_config_path(path: str) -> str:
    """A yaml path that exists, or a Detectron2 model-zoo config name; raise TeacherError if not."""
    if not path:
        raise TeacherError(
            "MODEL.DISTILL.TEACHER.CONFIG is empty: set it to the teacher's yaml file or a "
            "model-zoo name such as COCO-Detection/retinanet_R_101_FPN_3x.yaml."
        )
    if os.path.isfile(path):
        return path
    try:
        from detectron2 import model_zoo

        zoo_path = model_zoo.get_config_file(path)
    except Exception:  # noqa: BLE001 - any failure means "not a zoo name"
        zoo_path = None
    if zoo_path and os.path.isfile(zoo_path):
        return zoo_path
    raise TeacherError(
        f"MODEL.DISTILL.TEACHER.CONFIG={path!r}: no such file (relative paths are resolved from "
        f"the working directory {os.getcwd()}) and not a Detectron2 model-zoo config name."
    )


def load_teacher_config(cfg: CfgNode) -> CfgNode:
    """The teacher's own config: its yaml, then TEACHER.OPTS; device follows the student's."""
    from .config import add_tbd_config

    t = cfg.MODEL.DISTILL.TEACHER
    path = resolve_config_path(t.CONFIG)
    tcfg = get_cfg()
    add_tbd_config(tcfg)  # so that a TBD config (e.g. a distilled student) can be a teacher
    try:
        tcfg.merge_from_file(path)
        tcfg.merge_from_list(list(t.OPTS))
    except Exception as e:
        raise TeacherError(
            f"MODEL.DISTILL.TEACHER.CONFIG={t.CONFIG!r} could not be read as a Detectron2 config "
            f"(with MODEL.DISTILL.TEACHER.OPTS={list(t.OPTS)}): {e}"
        ) from e
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    if tcfg.MODEL.META_ARCHITECTURE == "DistillMetaArch":
        tcfg.MODEL.META_ARCHITECTURE = "RetinaNet"  # a distilled student is a plain RetinaNet
    tcfg.MODEL.WEIGHTS = ""
    tcfg.freeze()
    return tcfg


def _weights_exist(path: str) -> bool:
    return "://" in path or os.path.isfile(path)


def load_teacher_weights(model: nn.Module, weights: str) -> TeacherLoadReport:
    """Load ``weights`` into ``model`` and report missing/unexpected/mismatched keys."""
    ckpt = _ReportingCheckpointer(model)
    try:
        ckpt.load(weights, checkpointables=[])
    except Exception as e:
        raise TeacherError(
            f"MODEL.DISTILL.TEACHER.WEIGHTS={weights!r} could not be loaded ({type(e).__name__}: "
            f"{e}). Is the file complete and a Detectron2/PyTorch checkpoint?"
        ) from e
    report = TeacherLoadReport(weights=weights)
    inc = ckpt.incompatible
    if inc is not None:
        report.missing = sorted(inc.missing_keys)
        report.unexpected = sorted(inc.unexpected_keys)
        report.shape_mismatch = [(k, tuple(a), tuple(b)) for k, a, b in inc.incorrect_shapes]
    return report


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and requires_grad=False on every parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_teacher(cfg: CfgNode) -> tuple[RetinaNet, CfgNode, TeacherLoadReport | None]:
    """Build the frozen teacher described by ``cfg.MODEL.DISTILL.TEACHER`` and load its weights.

    Raises TeacherError for a missing/unreadable config, missing/partial weights (unless
    ``ALLOW_RANDOM_INIT``), or a teacher that is not a RetinaNet-type detector.
    """
    t = cfg.MODEL.DISTILL.TEACHER
    if not t.WEIGHTS and not t.ALLOW_RANDOM_INIT:
        raise TeacherError(
            "MODEL.DISTILL.TEACHER.WEIGHTS is empty: a distillation needs a trained teacher. Set "
            "it to the teacher's checkpoint (or MODEL.DISTILL.TEACHER.ALLOW_RANDOM_INIT=True for "
            "tests)."
        )
    if t.WEIGHTS and not _weights_exist(t.WEIGHTS):
        raise TeacherError(
            f"MODEL.DISTILL.TEACHER.WEIGHTS={t.WEIGHTS!r}: file not found (working directory "
            f"{os.getcwd()}). Train the teacher first or fix the path."
        )
    tcfg = load_teacher_config(cfg)
    model = build_model(tcfg)
    if not isinstance(model, RetinaNet):
        raise TeacherError(
            f"MODEL.DISTILL.TEACHER.CONFIG={t.CONFIG!r} builds a {type(model).__name__} "
            f"(MODEL.META_ARCHITECTURE={tcfg.MODEL.META_ARCHITECTURE!r}); supported pairs: "
            f"{SUPPORTED_PAIRS}."
        )
    report = None
    if t.WEIGHTS:
        report = load_teacher_weights(model, t.WEIGHTS)
        logger.info(report.summary())
        if not report.complete:
            raise TeacherError(
                f"MODEL.DISTILL.TEACHER.WEIGHTS={t.WEIGHTS!r} did not load fully into the teacher "
                f"built from {t.CONFIG!r}: {len(report.missing)} missing and "
                f"{len(report.shape_mismatch)} shape-mismatched keys. Are the weights for this "
                f"config?\n{report.summary()}"
            )
        if report.unexpected:
            logger.warning(
                "Teacher checkpoint has %d keys the teacher does not use (ignored): %s",
                len(report.unexpected), report.unexpected[:10],
            )
    else:
        logger.warning("Teacher has RANDOM weights (MODEL.DISTILL.TEACHER.ALLOW_RANDOM_INIT=True).")
    return freeze(model), tcfg, report


def teacher_fingerprint(cfg: CfgNode, tcfg: CfgNode) -> dict:
    """sha256 of the teacher's merged config (device excluded) and of its weights file.

    Stored in every training checkpoint; ``--resume`` with another teacher is refused.
    """
    c = tcfg.clone()
    c.defrost()
    c.MODEL.DEVICE = ""  # resuming on another device is the same teacher
    weights = cfg.MODEL.DISTILL.TEACHER.WEIGHTS
    return {
        "config": cfg.MODEL.DISTILL.TEACHER.CONFIG,
        "config_sha256": hashlib.sha256(c.dump().encode()).hexdigest(),
        "weights": weights,
        "weights_sha256": sha256_file(PathManager.get_local_path(weights)) if weights else None,
    }


def teacher_is_frozen(model: nn.Module) -> bool:
    return not model.training and not any(p.requires_grad for p in model.parameters())
