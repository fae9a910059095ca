"""CrossHD: HD's Harmony-Score-weighted losses on CrossKD's crossed outputs [ours], an
investigation variant (docs/METHOD.md, "CrossHD"). Registers the distiller "CrossHD", no named
method. Keys: ``MODEL.DISTILL.CROSS_HD.*``, and ``MODEL.DISTILL.HS.*`` for the Harmony Score.

HD pulls the student's own head towards the teacher's outputs, a head that must also fit the
ground truth; CrossKD sends the student's head maps through the teacher's frozen last layers and
distils those crossed outputs instead, so the student's predictions answer to the ground truth
alone. CrossHD takes HD's terms (foreground anchors, HS weights, BCE and GIoU) and CrossKD's
place for them, the crossed outputs. With "TFD" it is TBD with crossed outputs: it tells apart
where HD acts from what it weights, the two ways TBD and CrossKD differ.
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from .crosskd import CrossedHead
from .hd import harmony_diagnostics, harmony_weights
from .primitives import giou_loss_per_box, weighted_bce_to_teacher, weighted_mean
from .registry import DISTILL_LOSS_REGISTRY, GT_MATCHES, DistillInputs, check_weights


@DISTILL_LOSS_REGISTRY.register()
class CrossHD(CrossedHead):
    """HD on crossed outputs.

    ``loss_cross_hd_cls = sum_{i in F} HS_i BCE(p_X[i], p_T[i]) / max(sum HS, 1)`` and
    ``loss_cross_hd_reg`` the HS-weighted GIoU between the crossed boxes (decoded with the
    teacher's box transform) and the teacher's, on the student's foreground anchors: HD's terms
    with the student's logits and boxes replaced by the crossed ones.
    """

    needs = CrossedHead.needs | {GT_MATCHES}
    index_key = "MODEL.DISTILL.CROSS_HD.TEACHER_INDEX"
    loss_keys = {"loss_cross_hd_cls": "MODEL.DISTILL.CROSS_HD.CLS_WEIGHT",
                 "loss_cross_hd_reg": "MODEL.DISTILL.CROSS_HD.REG_WEIGHT"}

    @classmethod
    def add_config(cls, cfg: CN) -> None:
        _C = cfg.MODEL.DISTILL
        # CrossHD, LOSSES: ["CrossHD"] (with "TFD": TBD with crossed outputs). Defaults: HD's
        # weights and CrossKD's crossing depth.
        _C.CROSS_HD = CN()
        # How many of the teacher's head convs (per subnet) the student's maps skip, as
        # MODEL.DISTILL.CROSSKD.TEACHER_INDEX.
        _C.CROSS_HD.TEACHER_INDEX = 3
        # Weight of the HS-weighted BCE between the crossed and the teacher's scores.
        _C.CROSS_HD.CLS_WEIGHT = 1.0
        # Weight of the HS-weighted GIoU between the crossed and the teacher's boxes.
        _C.CROSS_HD.REG_WEIGHT = 1.0

    @classmethod
    def validate_config(cls, cfg: CN) -> None:
        check_weights(cfg, ["MODEL.DISTILL.CROSS_HD.CLS_WEIGHT",
                            "MODEL.DISTILL.CROSS_HD.REG_WEIGHT"])
        cls.validate_index(cfg)

    @configurable
    def __init__(self, *, adapters: nn.ModuleDict, teacher_index: int = 3,
                 cls_weight: float = 1.0, reg_weight: float = 1.0, hs_form: str = "harmony",
                 hs_alpha: float = 1.0, hs_beta: float = 2.0):
        super().__init__()
        self.adapters = adapters
        self.teacher_index = teacher_index
        self.cls_weight = cls_weight
        self.reg_weight = reg_weight
        self.hs_form = hs_form
        self.hs_alpha = hs_alpha
        self.hs_beta = hs_beta

    @classmethod
    def from_config(cls, cfg, student_shapes: dict[str, ShapeSpec],
                    teacher_shapes: dict[str, ShapeSpec]):
        d = cfg.MODEL.DISTILL
        return {"adapters": cls.build_adapters(student_shapes, teacher_shapes),
                "teacher_index": d.CROSS_HD.TEACHER_INDEX, "cls_weight": d.CROSS_HD.CLS_WEIGHT,
                "reg_weight": d.CROSS_HD.REG_WEIGHT, "hs_form": d.HS.FORM,
                "hs_alpha": d.HS.ALIGNED_ALPHA, "hs_beta": d.HS.ALIGNED_BETA}

    def forward(self, inputs: DistillInputs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        logits, deltas = self.crossed(inputs)
        # HD's weights, foreground anchors only (its default BG_WEIGHT 0).
        hs, w = harmony_weights(inputs, self.hs_form, self.hs_alpha, self.hs_beta, 0.0)
        z_x = inputs.flatten_levels(logits, inputs.num_classes)
        loss_cls = weighted_mean(weighted_bce_to_teacher(z_x, inputs.teacher_probs), w)
        b_x = inputs.decode(deltas, inputs.teacher_box2box)
        loss_reg = weighted_mean(giou_loss_per_box(b_x, inputs.teacher_boxes), hs)
        return {"loss_cross_hd_cls": self.cls_weight * loss_cls,
                "loss_cross_hd_reg": self.reg_weight * loss_reg}, \
            harmony_diagnostics(inputs, hs, w, "cross_hd")
