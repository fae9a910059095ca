"""TBD's two distillers: HD (Harmony-Score-weighted response distillation, METHOD.md section 4)
and TFD (task-decoupled feature distillation, section 5). TBD = HD + TFD.
"""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from .primitives import (
    build_adapters,
    giou_loss_per_box,
    masked_feature_loss,
    max_over_anchors,
    max_score_mask,
    normalise_per_image,
    weighted_bce_to_teacher,
    weighted_mean,
)
from .quality import harmony_score
from .registry import DISTILL_LOSS_REGISTRY, DistillInputs


def compute_harmony(inputs: DistillInputs, form: str, alpha: float, beta: float) -> Tensor:
    """Harmony Score [N, R] of the teacher on the student's foreground anchors."""
    s, u = inputs.teacher_quality
    num_groups = max([len(x) for x in inputs.gt_instances] + [1])
    return harmony_score(
        s, u, inputs.fg_mask, form, group=inputs.matched_idxs, num_groups=num_groups,
        alpha=alpha, beta=beta,
    )


@DISTILL_LOSS_REGISTRY.register()
class HD(nn.Module):
    """Harmony distillation: BCE to the teacher's scores and GIoU to its boxes, HS-weighted.

    ``loss_hd_cls = sum_i w_i BCE(p_S[i], p_T[i]) / max(sum w, 1)`` with ``w = HS`` on foreground
    anchors and ``BG_WEIGHT * max_c p_T`` on background ones; ``loss_hd_reg`` is the HS-weighted
    GIoU (or L1 on deltas) between student and teacher boxes on foreground anchors.
    """

    requires_same_anchors = True

    @configurable
    def __init__(
        self,
        *,
        cls_weight: float = 1.0,
        reg_weight: float = 1.0,
        bg_weight: float = 0.0,
        reg_loss: str = "giou",
        hs_form: str = "harmony",
        hs_alpha: float = 1.0,
        hs_beta: float = 2.0,
    ):
        super().__init__()
        self.cls_weight = cls_weight
        self.reg_weight = reg_weight
        self.bg_weight = bg_weight
        self.reg_loss = reg_loss
        self.hs_form = hs_form
        self.hs_alpha = hs_alpha
        self.hs_beta = hs_beta

    @classmethod
    def from_config(cls, cfg, student_shapes=None, teacher_shapes=None):
        d = cfg.MODEL.DISTILL
        return {
            "cls_weight": d.HD.CLS_WEIGHT,
            "reg_weight": d.HD.REG_WEIGHT,
            "bg_weight": d.HD.BG_WEIGHT,
            "reg_loss": d.HD.REG_LOSS,
            "hs_form": d.HS.FORM,
            "hs_alpha": d.HS.ALIGNED_ALPHA,
            "hs_beta": d.HS.ALIGNED_BETA,
        }

    def forward(self, inputs: DistillInputs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        fg, valid = inputs.fg_mask, inputs.valid_mask
        hs = compute_harmony(inputs, self.hs_form, self.hs_alpha, self.hs_beta)
        p_t = inputs.teacher_probs
        bg_w = self.bg_weight * p_t.amax(dim=-1)
        w = torch.where(fg, hs, torch.where(valid, bg_w, torch.zeros_like(hs)))

        z_s = inputs.flatten_levels(inputs.student_logits, inputs.num_classes)
        loss_cls = weighted_mean(weighted_bce_to_teacher(z_s, p_t), w)

        if self.reg_loss == "giou":
            b_s = inputs.decode(inputs.student_deltas, inputs.student_box2box)
            per_anchor = giou_loss_per_box(b_s, inputs.teacher_boxes)
        else:  # "l1" on deltas
            d_s = inputs.flatten_levels(inputs.student_deltas, 4).float()
            d_t = inputs.flatten_levels(inputs.teacher_deltas, 4).float()
            per_anchor = (d_s - d_t).abs().sum(dim=-1)
        loss_reg = weighted_mean(per_anchor, hs)

        num_fg = fg.sum().clamp_min(1)
        diag = {
            "hd/mean_hs_fg": hs.sum() / num_fg,
            "hd/mean_s_fg": inputs.teacher_quality[0].sum() / num_fg,
            "hd/mean_u_fg": inputs.teacher_quality[1].sum() / num_fg,
            "hd/cls_weight_mass": w.sum(),
        }
        losses = {
            "loss_hd_cls": self.cls_weight * loss_cls,
            "loss_hd_reg": self.reg_weight * loss_reg,
        }
        return losses, diag


@DISTILL_LOSS_REGISTRY.register()
class TFD(nn.Module):
    """Task-decoupled feature distillation on the FPN levels the head uses.

    Mask per level: ``M = gamma * M_cls + (1 - gamma) * M_reg``, with ``M_cls`` the teacher's max
    score per location (FRS's mask) and ``M_reg`` the max over anchors of u* (the teacher box's
    best IoU with any GT). Loss: ``sum_l sum M ||F_T - Adapt(F_S)||^2 / max(sum M, eps)``.
    """

    requires_same_anchors = False

    @configurable
    def __init__(
        self,
        *,
        adapters: nn.ModuleDict,
        weight: float = 0.005,
        gamma: float = 0.5,
        balance_mode: str = "fixed",
    ):
        super().__init__()
        self.adapters = adapters
        self.weight = weight
        self.gamma = gamma
        self.balance_mode = balance_mode

    @classmethod
    def from_config(
        cls,
        cfg,
        student_shapes: dict[str, ShapeSpec],
        teacher_shapes: dict[str, ShapeSpec],
    ):
        d = cfg.MODEL.DISTILL.TFD
        names = list(cfg.MODEL.RETINANET.IN_FEATURES)
        return {
            "adapters": build_adapters(names, student_shapes, teacher_shapes, d.ADAPTER_KERNEL),
            "weight": d.WEIGHT,
            "gamma": d.GAMMA,
            "balance_mode": d.BALANCE_MODE,
        }

    def masks(self, inputs: DistillInputs) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per level: (M, M_cls, M_reg), each [N, H, W], detached, fp32."""
        u_star = inputs.teacher_best_iou.split(inputs.num_anchors_per_level, dim=1)
        out = []
        for logits, u_l in zip(inputs.teacher_logits, u_star):
            h, w = logits.shape[-2:]
            m_cls = max_score_mask(logits)
            m_reg = max_over_anchors(u_l, h, w)
            if self.balance_mode == "dynamic":
                mix = self.gamma * normalise_per_image(m_cls)
                mix = mix + (1 - self.gamma) * normalise_per_image(m_reg)
            else:
                mix = self.gamma * m_cls + (1 - self.gamma) * m_reg
            out.append((mix, m_cls, m_reg))
        return out

    def forward(self, inputs: DistillInputs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        total = inputs.student_features[0].new_zeros((), dtype=torch.float32)
        diag = {}
        for name, f_s, f_t, (mask, m_cls, m_reg) in zip(
            inputs.level_names, inputs.student_features, inputs.teacher_features, self.masks(inputs)
        ):
            if f_s.shape[-2:] != f_t.shape[-2:]:
                raise RuntimeError(
                    f"TFD: FPN level {name} has student size {tuple(f_s.shape[-2:])} but teacher "
                    f"size {tuple(f_t.shape[-2:])}; both models must see the same padded input."
                )
            loss, mass = masked_feature_loss(f_t, self.adapters[name](f_s), mask)
            total = total + loss
            diag[f"tfd/loss_{name}"] = loss.detach()
            diag[f"tfd/mask_mass_{name}"] = mass.detach()
            diag[f"tfd/mask_cls_mass_{name}"] = m_cls.sum()
            diag[f"tfd/mask_reg_mass_{name}"] = m_reg.sum()
        return {"loss_tfd": self.weight * total}, diag
