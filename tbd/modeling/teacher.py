"""Everything about the teacher: build, load (with its report), freeze, the out-of-tree holder,
the pair's compatibility check, the teacher's own preprocessing, its fingerprint and the resume
comparison.

The teacher is always rebuilt from ``MODEL.DISTILL.TEACHER.{CONFIG,WEIGHTS,OPTS}``, also on
``--resume``: it is never part of the student's checkpoints. Detectron2's checkpointer is not
strict, so the load is checked here key by key and shape by shape, and a teacher that did not load
fully is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.modeling.meta_arch import GeneralizedRCNN, RetinaNet
from detectron2.modeling.meta_arch.fcos import FCOS as StockFCOS
from detectron2.structures import ImageList
from detectron2.utils.file_io import PathManager
from torch import nn

from ..checkpoint.io import sha256_file
from ..checkpoint.training import LoadReport, load_with_report
from ..config import ConfigError, changed_keys
from ..data.loader import NUM_CLASSES_KEYS
from ..distillers.registry import (
    DENSE_TEACHER_HEAD,
    HEAD_INTERNALS,
    NEEDS,
    SAME_ANCHORS,
    SAME_CLASSES,
    TEACHER_FAMILIES,
    Distiller,
    family_supports,
    supported_pairs,
)

logger = logging.getLogger(__name__)

SUPPORTED_PAIRS = ("teachers: RetinaNet, FCOS (dense heads) or GeneralizedRCNN (Faster R-CNN "
                   "with an FPN: features only); students: RetinaNet (DistillMetaArch) or FCOS "
                   "(DistillFCOS). Each distiller's pairs: docs/METHOD.md, 'Supported pairs'")

# The head-level keys per family, named in error messages.
IN_FEATURES_KEYS = {"RetinaNet": "MODEL.RETINANET.IN_FEATURES", "FCOS": "MODEL.FCOS.IN_FEATURES"}


def detector_family(model) -> str:
    """"RetinaNet", "FCOS" or "GeneralizedRCNN" (subclasses included); the class name otherwise.
    A student's parts (a namespace) carry their ``family``."""
    if isinstance(model, RetinaNet):
        return "RetinaNet"
    if isinstance(model, StockFCOS):
        return "FCOS"
    if isinstance(model, GeneralizedRCNN):
        return "GeneralizedRCNN"
    return getattr(model, "family", type(model).__name__)


class TeacherError(ValueError):
    """The teacher's config or weights cannot be used; the message says which key and why."""


class TeacherHolder:
    """Keeps the teacher out of the student's module tree (a plain attribute, not an nn.Module):
    it is then in no ``state_dict()``, ``parameters()``, optimizer or DDP, and no ``train()``
    call reaches it."""

    def __init__(self, model: Optional[nn.Module]):
        self.model = model


def stock_meta_architecture(name: str) -> str:
    """The stock Detectron2 meta-architecture a (possibly distilling) one trains and releases as:
    a distillation meta-arch declares it as ``stock_architecture``; others are their own."""
    try:
        cls = META_ARCH_REGISTRY.get(name)
    except KeyError:
        return name
    return getattr(cls, "stock_architecture", name)


def resolve_config_path(path: str) -> str:
    """A yaml path that exists, or a Detectron2 model-zoo config name; raise TeacherError if not.

    A model zoo that cannot be imported is reported with its cause (Detectron2 main's
    ``model_zoo`` imports ``pkg_resources``, which ``setuptools>=82`` no longer has).
    """
    if not path:
        raise TeacherError(
            "MODEL.DISTILL.TEACHER.CONFIG is empty: set it to the teacher's yaml file or a "
            "model-zoo name such as COCO-Detection/retinanet_R_101_FPN_3x.yaml."
        )
    if os.path.isfile(path):
        return path
    try:
        from detectron2 import model_zoo
    except ImportError as e:
        raise TeacherError(
            f"MODEL.DISTILL.TEACHER.CONFIG={path!r}: no such file (relative paths are resolved "
            f"from the working directory {os.getcwd()}), and Detectron2's model zoo, which would "
            f"resolve a zoo name, cannot be imported: {type(e).__name__}: {e}. With Detectron2 "
            "main, install setuptools<82 (its model_zoo imports pkg_resources)."
        ) from e
    try:
        zoo_path = model_zoo.get_config_file(path)
    except RuntimeError:  # "... not available in Model Zoo!"
        zoo_path = None
    if zoo_path and os.path.isfile(zoo_path):
        return zoo_path
    raise TeacherError(
        f"MODEL.DISTILL.TEACHER.CONFIG={path!r}: no such file (relative paths are resolved from "
        f"the working directory {os.getcwd()}) and not a Detectron2 model-zoo config name."
    )


def load_teacher_config(cfg: CfgNode) -> CfgNode:
    """The teacher's own config: its yaml, then TEACHER.OPTS; device follows the student's."""
    t = cfg.MODEL.DISTILL.TEACHER
    path = resolve_config_path(t.CONFIG)
    tcfg = _default_config()  # with the project's keys: a distilled student can be a teacher
    try:
        tcfg.merge_from_file(path)
        tcfg.merge_from_list(list(t.OPTS))
    except Exception as e:
        raise TeacherError(
            f"MODEL.DISTILL.TEACHER.CONFIG={t.CONFIG!r} could not be read as a Detectron2 config "
            f"(with MODEL.DISTILL.TEACHER.OPTS={list(t.OPTS)}): {e}"
        ) from e
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    # A distilled student is a stock detector.
    tcfg.MODEL.META_ARCHITECTURE = stock_meta_architecture(tcfg.MODEL.META_ARCHITECTURE)
    tcfg.MODEL.WEIGHTS = ""
    tcfg.freeze()
    return tcfg


def _weights_exist(path: str) -> bool:
    return "://" in path or os.path.isfile(path)


def load_teacher_weights(model: nn.Module, weights: str) -> LoadReport:
    """Load ``weights`` into ``model`` and report missing/unexpected/mismatched keys."""
    try:
        return load_with_report(model, weights)
    except Exception as e:
        raise TeacherError(
            f"MODEL.DISTILL.TEACHER.WEIGHTS={weights!r} could not be loaded ({type(e).__name__}: "
            f"{e}). Is the file complete and a Detectron2/PyTorch checkpoint?"
        ) from e


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and requires_grad=False on every parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_teacher(cfg: CfgNode) -> tuple[nn.Module, CfgNode, LoadReport | None]:
    """Build the frozen teacher described by ``cfg.MODEL.DISTILL.TEACHER`` and load its weights.

    Raises TeacherError for a missing/unreadable config, missing/partial weights (unless
    ``ALLOW_RANDOM_INIT``), or a teacher that is not a RetinaNet, an FCOS or a GeneralizedRCNN.
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
    if detector_family(model) not in TEACHER_FAMILIES:
        raise TeacherError(
            f"MODEL.DISTILL.TEACHER.CONFIG={t.CONFIG!r} builds a {type(model).__name__} "
            f"(MODEL.META_ARCHITECTURE={tcfg.MODEL.META_ARCHITECTURE!r}); supported pairs: "
            f"{SUPPORTED_PAIRS}."
        )
    report = None
    if t.WEIGHTS:
        report = load_teacher_weights(model, t.WEIGHTS)
        logger.info(report.summary("Teacher load report"))
        if not report.complete:
            raise TeacherError(
                f"MODEL.DISTILL.TEACHER.WEIGHTS={t.WEIGHTS!r} did not load fully into the teacher "
                f"built from {t.CONFIG!r}: {len(report.missing)} missing and "
                f"{len(report.shape_mismatch)} shape-mismatched keys. Are the weights for this "
                f"config?\n{report.summary('Teacher load report')}"
            )
        if report.unexpected:
            logger.warning(
                "Teacher checkpoint has %d keys the teacher does not use (ignored): %s",
                len(report.unexpected), report.unexpected[:10],
            )
    else:
        logger.warning("Teacher has RANDOM weights (MODEL.DISTILL.TEACHER.ALLOW_RANDOM_INIT=True).")
    return freeze(model), tcfg, report


# What decides a teacher's outputs on an input: its model and input sections, without the device
# and the weights path (the weights are hashed by content) or the keys of a distilled teacher's
# own distillation. Only keys whose value differs from Detectron2's defaults are fingerprinted, so
# that a Detectron2 version with more (default) keys gives the same fingerprint.
_FINGERPRINT_SECTIONS = ("MODEL.", "INPUT.")
_FINGERPRINT_IGNORED = ("MODEL.DEVICE", "MODEL.WEIGHTS", "MODEL.DISTILL.")
FINGERPRINT_VERSION = 2


def _default_config() -> CfgNode:
    """Detectron2's defaults with the project's keys."""
    from ..config import add_tbd_config

    c = get_cfg()
    add_tbd_config(c)
    return c


def output_keys(c: CfgNode) -> dict[str, object]:
    """The model and input keys of ``c`` that differ from Detectron2's defaults (dotted names)."""
    return {k: v for k, v in changed_keys(c, _default_config()).items()
            if k.startswith(_FINGERPRINT_SECTIONS) and not k.startswith(_FINGERPRINT_IGNORED)}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()


def teacher_fingerprint(cfg: CfgNode) -> dict:
    """What identifies the teacher of ``cfg``: sha256 of its weights file, of the model and input
    keys its yaml sets, and of what ``MODEL.DISTILL.TEACHER.OPTS`` changes on top.

    Stored in every training checkpoint; ``--resume`` with another teacher is refused, naming
    which of the three changed. Independent of the device, of paths and of the Detectron2 version
    (keys a version adds at their defaults are not part of it).
    """
    t = cfg.MODEL.DISTILL.TEACHER
    own = _default_config()
    own.merge_from_file(resolve_config_path(t.CONFIG))
    merged = own.clone()
    merged.merge_from_list(list(t.OPTS))
    own_keys, merged_keys = output_keys(own), output_keys(merged)
    overrides = {k: merged_keys.get(k) for k in sorted(set(own_keys) | set(merged_keys))
                 if own_keys.get(k) != merged_keys.get(k)}
    return {
        "version": FINGERPRINT_VERSION,
        "config": t.CONFIG,
        "config_sha256": _digest(own_keys),
        "overrides": list(t.OPTS),
        "overrides_sha256": _digest(overrides),
        "weights": t.WEIGHTS,
        "weights_sha256": sha256_file(PathManager.get_local_path(t.WEIGHTS)) if t.WEIGHTS
        else None,
    }


def teacher_is_frozen(model: nn.Module) -> bool:
    return not model.training and not any(p.requires_grad for p in model.parameters())


def _levels(shapes: dict, names: list[str]) -> str:
    return ", ".join(f"{n} (stride {shapes[n].stride})" for n in names)


def check_compatible(student, teacher: nn.Module, distillers: dict[str, type[Distiller]],
                     levels: Optional[list[str]] = None) -> list[tuple[str, str]]:
    """Raise TeacherError (naming the key) if the pair cannot be distilled with ``distillers``;
    return the paired FPN levels ``[(student level, teacher level)]``.

    ``student``: the student or its parts (``family``, ``backbone``, ``head_in_features``,
    ``num_classes``, ``anchor_generator``); ``distillers``: name -> distiller class or module;
    ``levels``: the student levels whose features are distilled (MODEL.DISTILL.LEVELS; empty:
    the head's). Levels are paired by stride (a Faster R-CNN FPN has p2-p6, RetinaNet p3-p7).
    What else is checked follows the distillers' ``needs``. Run once, when the meta-arch is built.
    """
    s_family, t_family = detector_family(student), detector_family(teacher)
    head_levels = list(student.head_in_features)
    levels = list(levels) if levels else head_levels
    s_shapes, t_shapes = student.backbone.output_shape(), teacher.backbone.output_shape()

    def needing(need: str) -> list[str]:
        return [n for n, d in distillers.items() if need in getattr(d, "needs", ())]

    for name, d in distillers.items():
        needs = getattr(d, "needs", ())
        if not family_supports(needs, s_family, t_family):
            what = "; ".join(NEEDS[n] for n in sorted(needs)
                             if not family_supports({n}, s_family, t_family))
            raise TeacherError(
                f"{name} cannot distil a {t_family} teacher into a {s_family} student: it needs "
                f"{what}. Pairs {name} supports (teacher -> student): "
                f"{', '.join(supported_pairs(needs))}. Choose another distiller in "
                "MODEL.DISTILL.LOSSES or another teacher (MODEL.DISTILL.TEACHER.CONFIG).")
    unknown = [n for n in levels if n not in head_levels]
    if unknown:
        raise ConfigError(f"MODEL.DISTILL.LEVELS has {unknown}, which are not head levels of the "
                          f"student ({IN_FEATURES_KEYS.get(s_family, 'IN_FEATURES')}="
                          f"{head_levels}).")
    head_users = sorted(set(needing(DENSE_TEACHER_HEAD) + needing(HEAD_INTERNALS)))
    if head_users and levels != head_levels:
        raise ConfigError(
            f"MODEL.DISTILL.LEVELS={levels} leaves out head levels, but {head_users} read the "
            f"teacher's head on every level of the student's ({head_levels}): leave LEVELS empty "
            "or use feature distillers only.")
    by_stride = {}
    for n in sorted(t_shapes, key=lambda k: t_shapes[k].stride):
        by_stride.setdefault(t_shapes[n].stride, n)
    pairs = []
    for n in levels:
        match = by_stride.get(s_shapes[n].stride)
        if match is None:
            both = [m for m in levels if s_shapes[m].stride in by_stride]
            raise TeacherError(
                f"FPN level {n} (stride {s_shapes[n].stride}) of the student has no teacher level "
                f"of that stride; the teacher's backbone has {_levels(t_shapes, sorted(t_shapes))}"
                f". Set MODEL.DISTILL.LEVELS to the student levels both have ({both}), with "
                "feature distillers only.")
        pairs.append((n, match))
    if head_users:
        t_head = [t_shapes[f].stride for f in teacher.head_in_features]
        s_head = [s_shapes[f].stride for f in head_levels]
        if t_head != s_head:
            raise TeacherError(
                f"{head_users} pair the two heads level by level, but the student's head runs on "
                f"{_levels(s_shapes, head_levels)} and the teacher's on "
                f"{_levels(t_shapes, list(teacher.head_in_features))} "
                f"({IN_FEATURES_KEYS.get(t_family, 'IN_FEATURES')} of the teacher).")

    if needing(SAME_CLASSES) and student.num_classes != teacher.num_classes:
        raise TeacherError(
            f"{NUM_CLASSES_KEYS.get(s_family)} differs: student {student.num_classes}, teacher "
            f"{teacher.num_classes}; {needing(SAME_CLASSES)} distil per-class scores and need "
            "them equal."
        )
    if needing(SAME_ANCHORS):
        sa, ta = student.anchor_generator, teacher.anchor_generator
        s_anchors = [a.tolist() for a in sa.cell_anchors]
        t_anchors = [a.tolist() for a in ta.cell_anchors]
        if s_anchors != t_anchors or sa.strides != ta.strides or sa.offset != ta.offset:
            raise TeacherError(
                "MODEL.ANCHOR_GENERATOR settings (SIZES, ASPECT_RATIOS, OFFSET) differ between "
                f"student and teacher; {needing(SAME_ANCHORS)} pair anchors one to one and need "
                "identical anchors."
            )
    return pairs


def teacher_images(teacher: nn.Module, batched_inputs: list[dict], student_images: ImageList,
                   student_format: str, teacher_format: str) -> ImageList:
    """The teacher's input: its own channel order and normalisation, padded like the student's.

    Both models must see the same padded canvas so that their FPN levels have equal sizes.
    """
    images = []
    for x in batched_inputs:
        img = x["image"].to(teacher.pixel_mean.device)
        if teacher_format != student_format:
            img = img.flip(0)  # BGR <-> RGB
        images.append((img - teacher.pixel_mean) / teacher.pixel_std)
    tensor = ImageList.from_tensors(images, teacher.backbone.size_divisibility).tensor
    th, tw = student_images.tensor.shape[-2:]
    if tensor.shape[-2] > th or tensor.shape[-1] > tw:
        raise TeacherError(
            "The teacher pads inputs to a larger size than the student (size_divisibility "
            f"{teacher.backbone.size_divisibility} vs student {tuple(student_images.tensor.shape)}"
            "); use FPN settings with the same divisibility."
        )
    padded = torch.nn.functional.pad(tensor, (0, tw - tensor.shape[-1], 0, th - tensor.shape[-2]))
    return ImageList(padded, list(student_images.image_sizes))


def _short(sha: Optional[str]) -> str:
    return sha[:12] if sha else "none"


def check_same_teacher(saved: Optional[dict], current: Optional[dict], checkpoint: str) -> None:
    """Raise TeacherError if a checkpoint's teacher differs from the current one, naming which of
    its weights, config and overrides changed."""
    if not saved and not current:
        return
    if not saved or not current:
        was = "no teacher" if not saved else f"the teacher {saved.get('config')!r}"
        now = "no teacher" if not current else f"the teacher {current.get('config')!r}"
        raise TeacherError(
            f"--resume: {checkpoint} was trained with {was}, but MODEL.DISTILL now gives {now} "
            "(MODEL.DISTILL.LOSSES). Resume with the losses it was trained with, or start a new "
            "run in another OUTPUT_DIR with MODEL.WEIGHTS=<checkpoint>, without --resume.")
    changed = []
    if saved.get("weights_sha256") != current.get("weights_sha256"):
        changed.append(f"weights (MODEL.DISTILL.TEACHER.WEIGHTS: {saved.get('weights')!r}, sha256 "
                       f"{_short(saved.get('weights_sha256'))}, now {current.get('weights')!r}, "
                       f"{_short(current.get('weights_sha256'))})")
    if saved.get("version", 1) < FINGERPRINT_VERSION:
        logger.warning("%s holds a teacher fingerprint of an older version of this project: only "
                       "the teacher's weights are compared, not its config.", checkpoint)
    else:
        if saved.get("config_sha256") != current.get("config_sha256"):
            changed.append(f"config (MODEL.DISTILL.TEACHER.CONFIG: {saved.get('config')!r} set "
                           "other model or input keys than "
                           f"{current.get('config')!r} does)")
        if saved.get("overrides_sha256") != current.get("overrides_sha256"):
            changed.append(f"overrides (MODEL.DISTILL.TEACHER.OPTS: {saved.get('overrides')}, "
                           f"now {current.get('overrides')})")
    if not changed:
        return
    raise TeacherError(
        f"--resume: {checkpoint} was trained with another teacher; changed: {'; '.join(changed)}. "
        "A distillation resumes with its own teacher: give it the teacher it was trained with. "
        "To go on from this student with this teacher on purpose, start a new run in another "
        "OUTPUT_DIR with MODEL.WEIGHTS=<checkpoint>, without --resume."
    )


def check_resume_teacher(checkpoint: str, model: nn.Module) -> None:
    """On ``--resume``: refuse ``checkpoint`` if it was trained with another teacher than
    ``model``'s (compared by fingerprint; checkpoints of other trainers carry none)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False).get("trainer", {})
    if "tbd" in state:
        check_same_teacher(state["tbd"].get("teacher"),
                           getattr(model, "teacher_fingerprint", None), checkpoint)


# Parameters under this prefix are the bottom-up backbone (ResNet), which inheriting leaves alone:
# FGD and MGD copy the teacher's neck (Detectron2: ``backbone.fpn_*``, ``backbone.top_block``)
# and head.
_BOTTOM_UP = "backbone.bottom_up."


@dataclass
class InheritReport:
    """What inheriting did: names copied, and the student's others with the teacher's shape."""

    copied: list[str] = field(default_factory=list)
    other_shape: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    not_in_teacher: list[str] = field(default_factory=list)

    def summary(self) -> str:
        more = " ..." if len(self.copied) > 8 else ""
        return (f"Inherited {len(self.copied)} tensors from the teacher (its FPN and head, where "
                f"names and shapes match): {self.copied[:8]}{more}"
                f"; {len(self.other_shape)} with other shapes kept their initialisation "
                + ", ".join(f"{k} student{a} teacher{b}" for k, a, b in self.other_shape[:5])
                + f"; {len(self.not_in_teacher)} the teacher lacks.")


@torch.no_grad()
def inherit_from_teacher(student: nn.Module, teacher: nn.Module) -> InheritReport:
    """Copy every teacher tensor outside the bottom-up backbone (parameters and buffers, e.g. BN
    statistics) whose name and shape match the student's into the student."""
    t_state = teacher.state_dict()
    report = InheritReport()
    for name, value in student.state_dict().items():
        if name.startswith(_BOTTOM_UP) or name.startswith("distillers."):
            continue
        if name not in t_state:
            report.not_in_teacher.append(name)
        elif tuple(t_state[name].shape) != tuple(value.shape):
            report.other_shape.append((name, tuple(value.shape), tuple(t_state[name].shape)))
        else:
            value.copy_(t_state[name])
            report.copied.append(name)
    logger.info(report.summary())
    return report
