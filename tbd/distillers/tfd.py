"""TFD: task-decoupled feature distillation, the second half of TBD (docs/METHOD.md, "TFD").

Registers the method "TBD" = HD + TFD. Keys: ``MODEL.DISTILL.TFD.*``.
"""

from __future__ import annotations

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from ..config import ConfigError
from .primitives import (
    build_adapters,
    masked_feature_loss,
    max_over_anchors,
    normalise_per_image,
)
from .registry import (
    DENSE_TEACHER_HEAD,
    DISTILL_LOSS_REGISTRY,
    Distiller,
    DistillInputs,
    check_choice,
    check_weights,
    register_method,
)

BALANCE_MODES = ("fixed", "dynamic")


@DISTILL_LOSS_REGISTRY.register()
class TFD(Distiller):
    """Task-decoupled feature distillation on the FPN levels the head uses.

    Mask per level: ``M = gamma * M_cls + (1 - gamma) * M_reg``, with ``M_cls`` the teacher's max
    score per location (FRS's mask) and ``M_reg`` the max over anchors of u* (the teacher box's
    best IoU with any GT). Loss: ``sum_l sum M ||F_T - Adapt(F_S)||^2 / max(sum M, eps)``.
    Both masks are per location and come from the teacher's own head on its own anchors (FCOS:
    points, its score including centerness), so any dense teacher works for any dense student.
    """

    needs = frozenset({DENSE_TEACHER_HEAD})
    loss_keys = {"loss_tfd": "MODEL.DISTILL.TFD.WEIGHT"}

    @classmethod
    def add_config(cls, cfg: CN) -> None:
        _C = cfg.MODEL.DISTILL
        _C.TFD = CN()
        # Weight of the task-decoupled feature imitation loss (FRS's feature weight) [ours].
        _C.TFD.WEIGHT = 0.005
        # Share of the classification-quality mask: M = GAMMA * M_cls + (1 - GAMMA) * M_reg.
        _C.TFD.GAMMA = 0.5
        # "fixed": mix the raw masks; "dynamic": first divide each mask by its own mass per image
        # and level, so that neither task dominates by scale alone [ours].
        _C.TFD.BALANCE_MODE = "fixed"
        # Kernel size of the student-to-teacher feature adapter (1 = 1x1 conv, 3 = FRS's 3x3).
        _C.TFD.ADAPTER_KERNEL = 1

    @classmethod
    def validate_config(cls, cfg: CN) -> None:
        d = cfg.MODEL.DISTILL.TFD
        check_weights(cfg, ["MODEL.DISTILL.TFD.WEIGHT"])
        check_choice(cfg, "MODEL.DISTILL.TFD.BALANCE_MODE", BALANCE_MODES)
        if not 0.0 <= d.GAMMA <= 1.0:
            raise ConfigError(f"MODEL.DISTILL.TFD.GAMMA must be in [0, 1], got {d.GAMMA}.")
        if d.ADAPTER_KERNEL not in (1, 3):
            raise ConfigError(
                f"MODEL.DISTILL.TFD.ADAPTER_KERNEL must be 1 or 3, got {d.ADAPTER_KERNEL}.")

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
        return {
            "adapters": build_adapters(list(student_shapes), student_shapes, teacher_shapes,
                                       d.ADAPTER_KERNEL),
            "weight": d.WEIGHT,
            "gamma": d.GAMMA,
            "balance_mode": d.BALANCE_MODE,
        }

    def masks(self, inputs: DistillInputs) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per level: (M, M_cls, M_reg), each [N, H, W], detached, fp32."""
        per_level = inputs.teacher_anchors_per_level
        u_star = inputs.teacher_best_iou.split(per_level, dim=1)
        score = inputs.teacher_scores.amax(dim=-1).split(per_level, dim=1)
        out = []
        for logits, s_l, u_l in zip(inputs.teacher_logits, score, u_star):
            h, w = logits.shape[-2:]
            m_cls = max_over_anchors(s_l, h, w)
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


register_method("TBD", ("HD", "TFD"))
