"""FRS baseline (Du et al., NeurIPS 2021), as METHOD.md section 8 specifies it [peer].

Per FPN level: mask ``m = max_{A*K} sigmoid(z_T)`` (no GT), a 3x3 adapter, a masked feature term
and a masked element-wise BCE term on the raw logits, both normalised by ``sum m``. No regression
term. TFD's classification mask is exactly this mask (shared primitive).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from .primitives import build_adapters, masked_feature_loss, max_score_mask, reduce_mean
from .registry import DISTILL_LOSS_REGISTRY, DistillInputs


@DISTILL_LOSS_REGISTRY.register()
class FRS(nn.Module):
    """Feature-richness score distillation: score-masked feature and classification imitation."""

    requires_same_anchors = True  # the classification term compares [N, A*K, H, W] logits

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
        names = list(cfg.MODEL.RETINANET.IN_FEATURES)
        return {
            "adapters": build_adapters(names, student_shapes, teacher_shapes, d.ADAPTER_KERNEL),
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
