"""PKD (Cao et al., NeurIPS 2022), following mmrazor's ``PKDLoss`` and its RetinaNet config [peer]
(docs/METHOD.md, "PKD"). Registers the method "PKD". Keys: ``MODEL.DISTILL.PKD.*``.

Per FPN level, both maps are standardised per channel over (N, H, W) and compared by mean
squared error over 2, which equals 1 - Pearson's r of the two maps: the student imitates the
teacher's feature *relations*, not its magnitudes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from .primitives import build_adapters, differing_levels, standardise_channels
from .registry import (
    DISTILL_LOSS_REGISTRY,
    Distiller,
    DistillInputs,
    check_weights,
    register_method,
)


def pearson_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """mean((z(F_S) - z(F_T))^2) / 2, the student resized bilinearly to the teacher's size."""
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear")
    return F.mse_loss(standardise_channels(student), standardise_channels(teacher)) / 2


@DISTILL_LOSS_REGISTRY.register()
class PKD(Distiller):
    """Pearson-correlation feature imitation on every FPN level the head uses."""

    needs: frozenset[str] = frozenset()  # paired FPN features only
    loss_keys = {"loss_pkd": "MODEL.DISTILL.PKD.WEIGHT"}

    @classmethod
    def add_config(cls, cfg: CN) -> None:
        _C = cfg.MODEL.DISTILL
        # PKD, LOSSES: ["PKD"].
        _C.PKD = CN()
        # Weight of each level's Pearson term (10: the official RetinaNet config).
        _C.PKD.WEIGHT = 10.0

    @classmethod
    def validate_config(cls, cfg: CN) -> None:
        check_weights(cfg, ["MODEL.DISTILL.PKD.WEIGHT"])

    @configurable
    def __init__(self, *, adapters: nn.ModuleDict, weight: float = 10.0):
        super().__init__()
        self.adapters = adapters
        self.weight = weight

    @classmethod
    def from_config(cls, cfg, student_shapes: dict[str, ShapeSpec],
                    teacher_shapes: dict[str, ShapeSpec]):
        # The official code has equal widths; a 1x1 adapter where they differ is ours.
        differ = differing_levels(student_shapes, teacher_shapes)
        return {"adapters": build_adapters(differ, student_shapes, teacher_shapes),
                "weight": cfg.MODEL.DISTILL.PKD.WEIGHT}

    def forward(self, inputs: DistillInputs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        total = inputs.student_features[0].new_zeros((), dtype=torch.float32)
        diag = {}
        for name, f_s, f_t in zip(inputs.level_names, inputs.student_features,
                                  inputs.teacher_features):
            if name in self.adapters:
                f_s = self.adapters[name](f_s)
            loss = pearson_loss(f_s.float(), f_t.detach().float())
            total = total + loss
            diag[f"pkd/loss_{name}"] = loss.detach()
        return {"loss_pkd": self.weight * total}, diag


register_method("PKD", ("PKD",))
