"""The distiller registry and the tapped tensors every distiller receives."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.registry import Registry
from torch import Tensor

DISTILL_LOSS_REGISTRY = Registry("DISTILL_LOSS")
DISTILL_LOSS_REGISTRY.__doc__ = """
Registry for distillers: nn.Modules built as ``cls(cfg, student_shapes, teacher_shapes)`` (with
``@configurable``) whose ``forward(inputs: DistillInputs)`` returns ``(losses, diagnostics)``:
weighted ``loss_*`` tensors, and detached scalar tensors for the event storage.

Class attributes a distiller may set:
    requires_same_anchors (bool): paired anchors (same generator, same class count) are needed.
"""


@dataclass(eq=False)
class DistillInputs:
    """Student and teacher taps of one training step, plus the student's anchor labelling.

    Per-level lists follow ``level_names``. Teacher tensors carry no gradient. Derived teacher
    quantities (decoded boxes, probabilities, s, u, u*) are computed once, in fp32 and without
    gradient, and shared by all distillers of the step.
    """

    level_names: list[str]
    student_features: list[Tensor]  # [N, Cs, H, W]
    teacher_features: list[Tensor]  # [N, Ct, H, W]
    student_logits: list[Tensor]  # raw head output [N, A*K, H, W]
    student_deltas: list[Tensor]  # raw head output [N, A*4, H, W]
    teacher_logits: list[Tensor]
    teacher_deltas: list[Tensor]
    anchors: list[Boxes]  # per level, H*W*A boxes, ordered (y, x, a)
    gt_labels: Tensor  # [N, R] in {-1 (ignore), 0..K-1 (foreground), K (background)}
    matched_idxs: Tensor  # [N, R] index of the matched GT (meaningful on foreground)
    gt_instances: list[Instances]
    num_classes: int
    student_box2box: Box2BoxTransform
    teacher_box2box: Box2BoxTransform
    image_sizes: list[tuple[int, int]] = field(default_factory=list)

    def float(self) -> DistillInputs:
        """The taps in fp32 (a no-op for fp32 tensors): distillation runs in fp32, also when the
        forward ran under autocast (bf16/fp16 features, logits and deltas)."""
        names = ("student_features", "teacher_features", "student_logits", "student_deltas",
                 "teacher_logits", "teacher_deltas")
        return replace(self, **{n: [t.float() for t in getattr(self, n)] for n in names})

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

    @staticmethod
    def flatten_levels(per_level: list[Tensor], dim: int) -> Tensor:
        """[N, A*D, H, W] per level -> [N, R, D] in Detectron2's (y, x, a) anchor order."""
        out = []
        for x in per_level:
            n, _, h, w = x.shape
            out.append(x.view(n, -1, dim, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, dim))
        return torch.cat(out, dim=1)

    def decode(self, deltas: list[Tensor], box2box: Box2BoxTransform) -> Tensor:
        """Decode per-level raw deltas into boxes [N, R, 4] on the shared anchors."""
        d = self.flatten_levels(deltas, 4)
        n = d.shape[0]
        anchors = self.anchors_cat.unsqueeze(0).expand(n, -1, -1)
        return box2box.apply_deltas(d.reshape(-1, 4), anchors.reshape(-1, 4)).view(n, -1, 4)

    @cached_property
    def teacher_probs(self) -> Tensor:
        """[N, R, K] teacher scores (fp32)."""
        with torch.no_grad():
            return self.flatten_levels(self.teacher_logits, self.num_classes).float().sigmoid()

    @cached_property
    def teacher_boxes(self) -> Tensor:
        """[N, R, 4] teacher boxes decoded on the anchors (fp32)."""
        with torch.no_grad():
            return self.decode([d.float() for d in self.teacher_deltas], self.teacher_box2box)

    @cached_property
    def teacher_quality(self) -> tuple[Tensor, Tensor]:
        """(s, u), each [N, R]: teacher score for and IoU with the matched GT; 0 off foreground."""
        from .quality import teacher_cls_quality, teacher_loc_quality

        with torch.no_grad():
            s = teacher_cls_quality(self.teacher_probs, self.gt_labels, self.num_classes)
            u = teacher_loc_quality(
                self.teacher_boxes, self.gt_instances, self.matched_idxs, self.fg_mask
            )
        return s, u

    @cached_property
    def teacher_best_iou(self) -> Tensor:
        """[N, R] u*: max IoU of each teacher box with any GT of its image (0 without GT)."""
        with torch.no_grad():
            out = torch.zeros_like(self.gt_labels, dtype=torch.float32)
            for n, inst in enumerate(self.gt_instances):  # loop over images, not boxes
                if len(inst) > 0:
                    iou = pairwise_iou(Boxes(self.teacher_boxes[n]), inst.gt_boxes.to(out.device))
                    out[n] = iou.float().amax(dim=1)
            return out

