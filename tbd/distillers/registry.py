"""The distiller registry, the base class every distiller derives from, and the tapped tensors
every distiller receives.

A distiller is one file: a ``Distiller`` subclass registered in ``DISTILL_LOSS_REGISTRY`` that
declares its config keys (``add_config``), checks them (``validate_config``) and says what a
student/teacher pair must offer for it to work (``needs``). ``tbd.config.add_tbd_config`` collects
the keys of every registered distiller, and the meta-arch checks ``needs`` when it is built.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Optional

import torch
from detectron2.config import CfgNode
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.registry import Registry
from torch import Tensor, nn

from ..config import ConfigError

DISTILL_LOSS_REGISTRY = Registry("DISTILL_LOSS")
DISTILL_LOSS_REGISTRY.__doc__ = """
Registry for distillers: ``Distiller`` subclasses built as ``cls(cfg, student_shapes,
teacher_shapes)`` (with ``@configurable``) whose ``forward(inputs: DistillInputs)`` returns
``(losses, diagnostics)``: weighted ``loss_*`` tensors, and detached scalar tensors for the event
storage. ``MODEL.DISTILL.LOSSES`` lists the registered names a student is trained with.
"""

# What a distiller may need from a (student, teacher) pair; checked when the meta-arch is built.
SAME_CLASSES = "same_classes"
SAME_ANCHORS = "same_anchors"
SAME_FAMILY = "same_family"
DENSE_TEACHER_HEAD = "dense_teacher_head"
GT_MATCHES = "gt_matches"
HEAD_INTERNALS = "head_internals"
NEEDS = {
    SAME_CLASSES: "the same number of classes (per-class scores are compared one to one)",
    SAME_ANCHORS: "identical anchors (MODEL.ANCHOR_GENERATOR, or FCOS's points: outputs are "
                  "paired anchor by anchor)",
    SAME_FAMILY: "a teacher of the student's family (RetinaNet -> RetinaNet, FCOS -> FCOS: the "
                 "scores and boxes mean the same)",
    DENSE_TEACHER_HEAD: "a dense teacher head (RetinaNet or FCOS: per-location scores and boxes) "
                        "on all the student's head levels",
    GT_MATCHES: "the GT index each student anchor is matched to (computed only when needed)",
    HEAD_INTERNALS: "RetinaNet-style heads (cls_subnet, bbox_subnet; FCOS's too) whose inner maps "
                    "are read",
}

# The detector families a pair is made of: students (the distilling meta-architectures) and
# teachers (what ``build_teacher`` accepts). "GeneralizedRCNN" is a Faster R-CNN with an FPN.
STUDENT_FAMILIES = ("RetinaNet", "FCOS")
DENSE_FAMILIES = ("RetinaNet", "FCOS")
TEACHER_FAMILIES = ("RetinaNet", "FCOS", "GeneralizedRCNN")


def family_supports(needs: Iterable[str], student: str, teacher: str) -> bool:
    """Whether a distiller with ``needs`` can distil a ``teacher``-family teacher into a
    ``student``-family student (the checks of sizes, classes and anchors come on top)."""
    needs = set(needs)
    dense_needed = bool(needs & {DENSE_TEACHER_HEAD, HEAD_INTERNALS, SAME_ANCHORS, SAME_FAMILY})
    if dense_needed and teacher not in DENSE_FAMILIES:
        return False
    # Anchors of RetinaNet (A per location, IoU-matched) and FCOS (one point) never coincide.
    if needs & {SAME_FAMILY, SAME_ANCHORS} and student != teacher:
        return False
    return True


def supported_pairs(needs: Iterable[str]) -> list[str]:
    """The "teacher -> student" family pairs a distiller with ``needs`` supports."""
    needs = tuple(needs)
    return [f"{t} -> {s}" for s in STUDENT_FAMILIES for t in TEACHER_FAMILIES
            if family_supports(needs, s, t)]

# Named methods as users and the benchmarks compare them: name -> MODEL.DISTILL.LOSSES. Each
# distiller's file registers the methods it makes up (``register_method``); "baseline" is the
# student alone.
METHODS: dict[str, tuple[str, ...]] = {"baseline": ()}


def register_method(name: str, losses: Iterable[str]) -> None:
    """Name a combination of registered distillers (e.g. "TBD" = HD + TFD)."""
    if name in METHODS and METHODS[name] != tuple(losses):
        raise KeyError(f"Method {name!r} is already registered as {METHODS[name]}.")
    METHODS[name] = tuple(losses)


def config_value(cfg: CfgNode, key: str):
    """The value of the dotted ``key`` (e.g. "MODEL.DISTILL.HD.CLS_WEIGHT") in ``cfg``."""
    value = cfg
    for part in key.split("."):
        value = value[part]
    return value


def check_weights(cfg: CfgNode, keys: Iterable[str]) -> None:
    """Raise ConfigError unless every dotted ``keys`` entry of ``cfg`` is a finite number >= 0."""
    for key in keys:
        value = config_value(cfg, key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}.")


def check_choice(cfg: CfgNode, key: str, choices: Iterable) -> None:
    """Raise ConfigError unless the dotted ``key`` of ``cfg`` is one of ``choices``."""
    value = config_value(cfg, key)
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is unknown; use one of {choices}.")


class Distiller(nn.Module):
    """Base class of the registered distillers.

    Subclasses set ``needs`` (a subset of ``NEEDS``), implement ``add_config`` / ``validate_config``
    for their own keys under ``MODEL.DISTILL``, ``from_config(cfg, student_shapes,
    teacher_shapes)`` with ``@configurable``, and ``forward(inputs) -> (losses, diagnostics)``.
    Every parameter (adapters, generators) must take part in every step: DDP runs without
    ``find_unused_parameters``.
    """

    needs: frozenset[str] = frozenset()
    # loss key it returns -> the config key that weights it (named by the guards' warnings)
    loss_keys: dict[str, str] = {}

    @classmethod
    def add_config(cls, cfg: CfgNode) -> None:
        """Add this distiller's keys, with defaults and a comment each, to ``cfg`` in place."""

    @classmethod
    def validate_config(cls, cfg: CfgNode) -> None:
        """Raise ValueError naming the key if one of this distiller's keys is invalid."""


def registered_distillers() -> dict[str, type[Distiller]]:
    """Name -> class of every registered distiller, in registration order."""
    return dict(DISTILL_LOSS_REGISTRY)


@dataclass(eq=False)
class DistillInputs:
    """Student and teacher taps of one training step, plus the student's anchor labelling.

    Per-level lists follow ``level_names``. Teacher tensors carry no gradient. Student tensors
    are the ones the student's own detection loss uses (one forward for both). Derived teacher
    quantities (decoded boxes, probabilities, s, u, u*) are computed once, in fp32 and without
    gradient, and shared by all distillers of the step.
    """

    level_names: list[str]
    student_features: list[Tensor]  # [N, Cs, H, W]
    teacher_features: list[Tensor]  # [N, Ct, H, W]
    student_logits: list[Tensor]  # raw head output [N, A*K, H, W]
    student_deltas: list[Tensor]  # raw head output [N, A*4, H, W]
    teacher_logits: list[Tensor]  # empty when no distiller of the step reads the teacher's head
    teacher_deltas: list[Tensor]
    anchors: list[Boxes]  # the student's, per level, H*W*A boxes, ordered (y, x, a)
    gt_labels: Tensor  # [N, R] in {-1 (ignore), 0..K-1 (foreground), K (background)}
    matched: Optional[Tensor]  # [N, R] matched GT index (on foreground), if a distiller needs it
    gt_instances: list[Instances]
    num_classes: int
    student_box2box: Box2BoxTransform
    teacher_box2box: Box2BoxTransform
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    # Head internals, for distillers that declare HEAD_INTERNALS: each head's maps before the
    # activation of the crossing conv ({"cls": [...], "box": [...]}, one per level), and the
    # teacher's head, which they run further (frozen).
    student_internals: Optional[dict[str, list[Tensor]]] = None
    teacher_internals: Optional[dict[str, list[Tensor]]] = None
    teacher_head: Optional[nn.Module] = None
    # The teacher's own anchors (points for FCOS) per level; None: the student's. They differ
    # only in a mixed pair (an FCOS teacher for a RetinaNet student, or the converse).
    teacher_anchors: Optional[list[Boxes]] = None
    # An FCOS teacher's centerness logits per level [N, 1, H, W]; None for RetinaNet.
    teacher_centerness: Optional[list[Tensor]] = None
    # An FCOS student's centerness targets [N, R] (meaningful on foreground); None otherwise.
    centerness_targets: Optional[Tensor] = None

    def float(self) -> DistillInputs:
        """The taps in fp32 (a no-op for fp32 tensors): distillation runs in fp32, also when the
        forward ran under autocast (bf16/fp16 features, logits and deltas)."""
        names = ("student_features", "teacher_features", "student_logits", "student_deltas",
                 "teacher_logits", "teacher_deltas")
        out = {n: [t.float() for t in getattr(self, n)] for n in names}
        if self.teacher_centerness is not None:
            out["teacher_centerness"] = [t.float() for t in self.teacher_centerness]
        for n in ("student_internals", "teacher_internals"):
            maps = getattr(self, n)
            if maps is not None:
                out[n] = {k: [t.float() for t in v] for k, v in maps.items()}
        return replace(self, **out)

    @property
    def num_images(self) -> int:
        return self.gt_labels.shape[0]

    @property
    def num_anchors_per_level(self) -> list[int]:
        return [len(a) for a in self.anchors]

    @cached_property
    def fg_mask(self) -> Tensor:
        """[N, R] foreground anchors of the student's own labelling."""
        return (self.gt_labels >= 0) & (self.gt_labels != self.num_classes)

    @cached_property
    def valid_mask(self) -> Tensor:
        """[N, R] anchors that are not ignored."""
        return self.gt_labels >= 0

    @cached_property
    def anchors_cat(self) -> Tensor:
        return Boxes.cat(self.anchors).tensor

    @property
    def teacher_anchors_per_level(self) -> list[int]:
        return [len(a) for a in (self.teacher_anchors or self.anchors)]

    @cached_property
    def teacher_anchors_cat(self) -> Tensor:
        return Boxes.cat(self.teacher_anchors).tensor if self.teacher_anchors else self.anchors_cat

    @property
    def matched_idxs(self) -> Tensor:
        """[N, R] index of the GT each anchor is matched to (meaningful on foreground anchors).

        Present only when a distiller of the step declares ``GT_MATCHES`` in its ``needs``.
        """
        if self.matched is None:
            raise RuntimeError("DistillInputs.matched_idxs is only computed when a distiller "
                               f"declares {GT_MATCHES!r} in its `needs`.")
        return self.matched

    @staticmethod
    def flatten_levels(per_level: list[Tensor], dim: int) -> Tensor:
        """[N, A*D, H, W] per level -> [N, R, D] in Detectron2's (y, x, a) anchor order."""
        return torch.cat([permute_to_N_HWA_K(x, dim) for x in per_level], dim=1)

    def decode(self, deltas: list[Tensor], box2box: Box2BoxTransform,
               anchors: Optional[Tensor] = None) -> Tensor:
        """Decode per-level raw deltas into boxes [N, R, 4] on ``anchors`` ([R, 4]; default: the
        student's)."""
        d = self.flatten_levels(deltas, 4)
        n = d.shape[0]
        anchors = (self.anchors_cat if anchors is None else anchors).unsqueeze(0).expand(n, -1, -1)
        return box2box.apply_deltas(d.reshape(-1, 4), anchors.reshape(-1, 4)).view(n, -1, 4)

    @cached_property
    def teacher_probs(self) -> Tensor:
        """[N, R, K] the teacher's class probabilities, sigmoid of its logits (fp32): the targets
        of response distillation."""
        with torch.no_grad():
            return self.flatten_levels(self.teacher_logits, self.num_classes).float().sigmoid()

    @cached_property
    def teacher_scores(self) -> Tensor:
        """[N, R, K] the teacher's detection scores, as its inference ranks boxes: the class
        probabilities for RetinaNet, ``sqrt(p * sigmoid(centerness))`` for FCOS (fp32). The
        quality s, the Harmony Score and TFD's classification mask read these [ours]."""
        if self.teacher_centerness is None:
            return self.teacher_probs
        with torch.no_grad():
            ctr = self.flatten_levels(self.teacher_centerness, 1).float().sigmoid()
            return (self.teacher_probs * ctr).sqrt()

    @cached_property
    def teacher_boxes(self) -> Tensor:
        """[N, R_t, 4] teacher boxes decoded on its own anchors (fp32)."""
        with torch.no_grad():
            return self.decode([d.float() for d in self.teacher_deltas], self.teacher_box2box,
                               self.teacher_anchors_cat)

    @cached_property
    def teacher_quality(self) -> tuple[Tensor, Tensor]:
        """(s, u), each [N, R]: teacher score for and IoU with the matched GT; 0 off foreground."""
        from .quality import teacher_cls_quality, teacher_loc_quality

        with torch.no_grad():
            s = teacher_cls_quality(self.teacher_scores, self.gt_labels, self.num_classes)
            u = teacher_loc_quality(
                self.teacher_boxes, self.gt_instances, self.matched_idxs, self.fg_mask
            )
        return s, u

    @cached_property
    def teacher_best_iou(self) -> Tensor:
        """[N, R_t] u*: max IoU of each teacher box with any GT of its image (0 without GT)."""
        with torch.no_grad():
            out = self.teacher_boxes.new_zeros(self.teacher_boxes.shape[:2])
            for n, inst in enumerate(self.gt_instances):  # loop over images, not boxes
                if len(inst) > 0:
                    iou = pairwise_iou(Boxes(self.teacher_boxes[n]), inst.gt_boxes.to(out.device))
                    out[n] = iou.float().amax(dim=1)
            return out

