"""FRS (Du et al., NeurIPS 2021), following its official code [peer] (docs/METHOD.md, "FRS").

Per FPN level: mask ``m = max_{A*K} sigmoid(z_T)`` (no GT), a 3x3 adapter, a masked feature term
and a masked element-wise BCE term on the raw logits, both normalised by ``sum m``. No regression
term. TFD's classification mask is exactly this mask (shared primitive).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from ..config import ConfigError
from .primitives import build_adapters, masked_feature_loss, max_score_mask, reduce_mean
from .registry import (
    DENSE_TEACHER_HEAD,
    DISTILL_LOSS_REGISTRY,
    SAME_ANCHORS,
    SAME_CLASSES,
    Distiller,
    DistillInputs,
    check_weights,
    register_method,
)


@DISTILL_LOSS_REGISTRY.register()
class FRS(Distiller):
    """Feature-richness score distillation: score-masked feature and classification imitation."""

    # The classification term compares [N, A*K, H, W] logits element by element.
    needs = frozenset({SAME_CLASSES, SAME_ANCHORS, DENSE_TEACHER_HEAD})
    loss_keys = {"loss_frs_feat": "MODEL.DISTILL.FRS.FEAT_WEIGHT",
                 "loss_frs_cls": "MODEL.DISTILL.FRS.CLS_WEIGHT"}

    @classmethod
    def add_config(cls, cfg: CN) -> None:
        _C = cfg.MODEL.DISTILL
        # FRS, LOSSES: ["FRS"]. Defaults: the official RetinaNet weights.
        _C.FRS = CN()
        # Weight of the score-masked feature imitation term.
        _C.FRS.FEAT_WEIGHT = 0.005
        # Weight of the score-masked classification (BCE to teacher scores) term.
        _C.FRS.CLS_WEIGHT = 0.02
        # Kernel size of FRS's feature adapter (3 in the official code).
        _C.FRS.ADAPTER_KERNEL = 3

    @classmethod
    def validate_config(cls, cfg: CN) -> None:
        check_weights(cfg, ["MODEL.DISTILL.FRS.FEAT_WEIGHT", "MODEL.DISTILL.FRS.CLS_WEIGHT"])
        k = cfg.MODEL.DISTILL.FRS.ADAPTER_KERNEL
        if k not in (1, 3):
            raise ConfigError(f"MODEL.DISTILL.FRS.ADAPTER_KERNEL must be 1 or 3, got {k}.")

    @configurable
    def __init__(self, *, adapters: nn.ModuleDict, feat_weight: float = 0.005,
                 cls_weight: float = 0.02):
        super().__init__()
        self.adapters = adapters
        self.feat_weight = feat_weight
        self.cls_weight = cls_weight

    @classmethod
    def from_config(cls, cfg, student_shapes: dict[str, ShapeSpec],
                    teacher_shapes: dict[str, ShapeSpec]):
        d = cfg.MODEL.DISTILL.FRS
        return {
            "adapters": build_adapters(list(student_shapes), student_shapes, teacher_shapes,
                                       d.ADAPTER_KERNEL),
            "feat_weight": d.FEAT_WEIGHT,
            "cls_weight": d.CLS_WEIGHT,
        }

    def forward(self, inputs: DistillInputs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        feat = inputs.student_features[0].new_zeros((), dtype=torch.float32)
        cls = feat.clone()
        diag = {}
        for name, f_s, f_t, z_s, z_t in zip(
            inputs.level_names, inputs.student_features, inputs.teacher_features,
            inputs.student_logits, inputs.teacher_logits,
        ):
            mask = max_score_mask(z_t)  # [N, H, W]
            loss_f, mass = masked_feature_loss(f_t, self.adapters[name](f_s), mask)
            bce = F.binary_cross_entropy_with_logits(
                z_s.float(), z_t.detach().float().sigmoid(), reduction="none"
            )
            loss_c = (bce * mask.unsqueeze(1)).sum() / mass.clamp_min(1e-12)
            feat = feat + loss_f
            cls = cls + loss_c
            diag[f"frs/mask_mass_{name}"] = reduce_mean(mask.sum()).detach()
        return {
            "loss_frs_feat": self.feat_weight * feat,
            "loss_frs_cls": self.cls_weight * cls,
        }, diag


register_method("FRS", ("FRS",))
