"""CrossKD (Wang et al., CVPR 2024), following its official RetinaNet detector and KD losses
[peer] (docs/METHOD.md, "CrossKD"). Registers the method "CrossKD". Keys:
``MODEL.DISTILL.CROSSKD.*``.

The student's head maps at some depth are re-standardised to the teacher's statistics at the
matching depth and passed through the rest of the teacher's head: the "crossed" outputs are
compared with the teacher's own. The student's own head keeps its detection loss; the teacher's
layers, frozen, only carry the gradient back to the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from ..config import ConfigError
from .primitives import giou_loss_per_box, reduce_mean, standardise_channels
from .registry import (
    DENSE_TEACHER_HEAD,
    DISTILL_LOSS_REGISTRY,
    HEAD_INTERNALS,
    SAME_ANCHORS,
    SAME_CLASSES,
    SAME_FAMILY,
    Distiller,
    DistillInputs,
    check_weights,
    config_value,
    register_method,
)


def match_statistics(student: Tensor, teacher: Tensor) -> Tensor:
    """``student`` standardised per channel over (N, H, W), then given the teacher's per-channel
    mean and (unbiased) std: the official ``align_scale``."""
    c = teacher.shape[1]
    t = teacher.detach().transpose(0, 1).reshape(c, -1)
    mean = t.mean(dim=1).view(1, c, 1, 1)
    std = t.std(dim=1).view(1, c, 1, 1)
    return standardise_channels(student) * std + mean


def quality_focal_kd(logits: Tensor, teacher_probs: Tensor, beta: float = 1.0) -> Tensor:
    """Per anchor, sum over classes of BCE(z, p_T) * |sigmoid(z) - p_T|^beta (fp32)."""
    z = logits.float()
    scale = (z.sigmoid() - teacher_probs).abs().pow(beta)
    return (F.binary_cross_entropy_with_logits(z, teacher_probs, reduction="none") * scale).sum(-1)


def student_index(student_depth: int, teacher_depth: int, teacher_index: int) -> int:
    """The student's crossing depth for a teacher crossed after ``teacher_index`` of its convs:
    the one as far from the output, ``student_depth - (teacher_depth - teacher_index)``, at least
    0 (the FPN feature) [ours; the official heads have equal depths, where both indices agree]."""
    return max(student_depth - (teacher_depth - teacher_index), 0)


class CrossedHead(Distiller):
    """Base of the distillers that read the teacher head's outputs from the student's maps.

    The student's head maps at a depth are re-standardised to the teacher's statistics at the
    matching depth (after a 1x1 conv per subnet where the widths differ) and run through the rest
    of the teacher's head, frozen. Subclasses set ``adapters`` and ``teacher_index`` and name the
    key of the crossing depth in ``index_key``.
    """

    needs = frozenset({SAME_CLASSES, SAME_ANCHORS, SAME_FAMILY, DENSE_TEACHER_HEAD,
                       HEAD_INTERNALS})
    index_key = "MODEL.DISTILL.CROSSKD.TEACHER_INDEX"
    adapters: nn.ModuleDict
    teacher_index: int

    @classmethod
    def validate_index(cls, cfg: CN) -> None:
        """Raise ConfigError unless the crossing depth is an integer >= 0 (its upper bound, the
        teacher head's depth, is checked when the model is built: ``head_indices``)."""
        value = config_value(cfg, cls.index_key)
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{cls.index_key} must be an integer >= 0 (at most the teacher's "
                              f"MODEL.RETINANET.NUM_CONVS), got {value!r}.")

    @staticmethod
    def build_adapters(student_shapes: dict[str, ShapeSpec],
                       teacher_shapes: dict[str, ShapeSpec]) -> nn.ModuleDict:
        """A RetinaNet head keeps its input width (the FPN's); where the widths differ, a 1x1
        conv per subnet brings the student's maps to the teacher's width first [ours]."""
        cs = next(iter(student_shapes.values())).channels
        ct = next(iter(teacher_shapes.values())).channels
        return nn.ModuleDict({k: nn.Conv2d(cs, ct, 1) for k in ("cls", "box")} if cs != ct
                             else {})

    def head_indices(self, student_head: nn.Module, teacher_head: nn.Module) -> tuple[int, int]:
        """(student, teacher) crossing depths for these heads; the meta-arch records the heads'
        maps there."""
        from ..modeling.taps import head_depth  # here: tbd.modeling imports the distillers

        t_depth = head_depth(teacher_head)
        if self.teacher_index > t_depth:
            raise ConfigError(f"{self.index_key}={self.teacher_index} exceeds the teacher head's "
                              f"{t_depth} convs per subnet.")
        return student_index(head_depth(student_head), t_depth, self.teacher_index), \
            self.teacher_index

    def crossed(self, inputs: DistillInputs) -> tuple[list[Tensor], list[Tensor]]:
        """The teacher head's outputs from the student's maps (per level logits, deltas)."""
        from ..modeling.taps import head_from

        maps = {}
        for key in ("cls", "box"):
            per_level = []
            for s, t in zip(inputs.student_internals[key], inputs.teacher_internals[key]):
                if key in self.adapters:
                    s = self.adapters[key](s)
                per_level.append(match_statistics(s.float(), t.float()))
            maps[key] = per_level
        return head_from(inputs.teacher_head, maps, self.teacher_index)


@DISTILL_LOSS_REGISTRY.register()
class CrossKD(CrossedHead):
    """Cross-head knowledge distillation for RetinaNet-style heads (RetinaNet's and FCOS's).

    On FCOS, as the official ``CrossKDFCOS``: the crossed head's logits and boxes are distilled
    as on RetinaNet (the teacher's FCOS head also yields a crossed centerness, which is not
    distilled), normalised by the sum of the student's centerness targets over its positives
    instead of their number [peer].
    """

    loss_keys = {"loss_crosskd_cls": "MODEL.DISTILL.CROSSKD.CLS_WEIGHT",
                 "loss_crosskd_reg": "MODEL.DISTILL.CROSSKD.REG_WEIGHT"}

    @classmethod
    def add_config(cls, cfg: CN) -> None:
        _C = cfg.MODEL.DISTILL
        # CrossKD, LOSSES: ["CrossKD"]. Defaults: the official RetinaNet config.
        _C.CROSSKD = CN()
        # How many of the teacher's head convs (per subnet) the student's maps skip: they enter
        # the teacher's head after its TEACHER_INDEX-th conv (official: 3 of 4). The student's
        # maps are taken as far from its output (student convs - (teacher convs - this)) [ours].
        _C.CROSSKD.TEACHER_INDEX = 3
        # Weight of the quality-focal KD on the crossed logits.
        _C.CROSSKD.CLS_WEIGHT = 1.0
        # Weight of the GIoU KD on the crossed boxes.
        _C.CROSSKD.REG_WEIGHT = 1.0
        # Exponent of the quality-focal modulating factor |p - p_T|.
        _C.CROSSKD.BETA = 1.0

    @classmethod
    def validate_config(cls, cfg: CN) -> None:
        check_weights(cfg, ["MODEL.DISTILL.CROSSKD.CLS_WEIGHT", "MODEL.DISTILL.CROSSKD.REG_WEIGHT",
                            "MODEL.DISTILL.CROSSKD.BETA"])
        cls.validate_index(cfg)

    @configurable
    def __init__(self, *, adapters: nn.ModuleDict, teacher_index: int = 3,
                 cls_weight: float = 1.0, reg_weight: float = 1.0, beta: float = 1.0):
        super().__init__()
        self.adapters = adapters
        self.teacher_index = teacher_index
        self.cls_weight = cls_weight
        self.reg_weight = reg_weight
        self.beta = beta

    @classmethod
    def from_config(cls, cfg, student_shapes: dict[str, ShapeSpec],
                    teacher_shapes: dict[str, ShapeSpec]):
        d = cfg.MODEL.DISTILL.CROSSKD
        return {"adapters": cls.build_adapters(student_shapes, teacher_shapes),
                "teacher_index": d.TEACHER_INDEX, "cls_weight": d.CLS_WEIGHT,
                "reg_weight": d.REG_WEIGHT, "beta": d.BETA}

    def forward(self, inputs: DistillInputs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        logits, deltas = self.crossed(inputs)
        valid = inputs.valid_mask
        if inputs.centerness_targets is None:
            num_pos = reduce_mean(inputs.fg_mask.sum().float()).clamp_min(1.0)
        else:  # FCOS [peer: the official CrossKDFCOS's avg_factor, floored at 1e-6]
            ctr = torch.where(inputs.fg_mask, inputs.centerness_targets.float(),
                              torch.zeros_like(inputs.centerness_targets.float()))
            num_pos = reduce_mean(ctr.sum()).clamp_min(1e-6)
        p_t = inputs.teacher_probs
        z_x = inputs.flatten_levels(logits, inputs.num_classes)
        cls = (quality_focal_kd(z_x, p_t, self.beta) * valid).sum() / num_pos
        b_x = inputs.decode(deltas, inputs.teacher_box2box)
        weight = torch.where(valid, p_t.amax(dim=-1), torch.zeros_like(p_t[..., 0]))
        giou = giou_loss_per_box(b_x, inputs.teacher_boxes)
        reg = torch.where(weight > 0, weight * giou, torch.zeros_like(giou)).sum() / num_pos
        diag = {"crosskd/num_pos": num_pos.detach(), "crosskd/reg_weight_mass": weight.sum()}
        return {"loss_crosskd_cls": self.cls_weight * cls,
                "loss_crosskd_reg": self.reg_weight * reg}, diag


register_method("CrossKD", ("CrossKD",))
