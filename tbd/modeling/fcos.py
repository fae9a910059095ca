"""FCOS from a yacs config, and the distilling FCOS student.

Detectron2 (v0.6 and main) builds its FCOS only from LazyConfig: the class has no
``from_config`` and is not in ``META_ARCH_REGISTRY``. Users of ``train_net.py --config-file``
need yacs keys, so this module adds ``MODEL.FCOS.*`` and registers:

* ``FCOS``: Detectron2's own FCOS class with a ``from_config`` (same modules, same parameter
  names, same losses and inference), so its checkpoints are stock FCOS checkpoints. It is
  registered under Detectron2's name only while that name is free, so a future Detectron2 that
  registers its own FCOS keeps it.
* ``DistillFCOS``: that FCOS as a student of ``DistillMixin``, trained with a frozen teacher and
  the registered distillers; it releases and evaluates as ``FCOS``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS as StockFCOS
from detectron2.modeling.meta_arch.fcos import FCOSHead
from detectron2.structures import Boxes, Instances
from torch import Tensor
from torch.profiler import record_function

from .meta_arch import DetectionTargets, DistillMixin
from .taps import DenseTaps

logger = logging.getLogger(__name__)

# The loss keys of Detectron2's FCOS (which no distiller may return).
FCOS_LOSS_KEYS = ("loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr")


def add_fcos_config(cfg: CN) -> None:
    """Add the ``MODEL.FCOS`` keys; defaults are the arguments of Detectron2's FCOS and of its
    ``common/models/fcos.py`` LazyConfig, except the head's norm (see NORM)."""
    _C = cfg
    _C.MODEL.FCOS = CN()
    # Number of foreground classes.
    _C.MODEL.FCOS.NUM_CLASSES = 80
    # FPN levels the head runs on (with build_retinanet_resnet_fpn_backbone: p3-p7).
    _C.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Convs per subnet of the head (classification and box/centerness).
    _C.MODEL.FCOS.NUM_CONVS = 4
    # Normalisation in the head: "" (none), "BN" (one BN per level, Detectron2's RetinaNetHead),
    # "GN" (the FCOS paper's; Detectron2 v0.6's RetinaNetHead cannot build it, main can).
    _C.MODEL.FCOS.NORM = ""
    # Prior probability of the classification output at initialisation (focal-loss init).
    _C.MODEL.FCOS.PRIOR_PROB = 0.01
    # Focal loss alpha and gamma.
    _C.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    # Radius (in strides) around a GT box's centre within which locations are positive.
    _C.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    # Inference: score threshold (on sqrt(class score * centerness)), candidates per level
    # before NMS, NMS IoU threshold. Detections per image: TEST.DETECTIONS_PER_IMAGE.
    _C.MODEL.FCOS.SCORE_THRESH_TEST = 0.2
    _C.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    _C.MODEL.FCOS.NMS_THRESH_TEST = 0.6


def fcos_arguments(cfg: CN) -> dict:
    """The keyword arguments of Detectron2's FCOS (backbone and head built) from ``cfg``."""
    f = cfg.MODEL.FCOS
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    missing = [n for n in f.IN_FEATURES if n not in shapes]
    if missing:
        from ..config import ConfigError

        raise ConfigError(f"MODEL.FCOS.IN_FEATURES has {missing}, which the backbone "
                          f"({cfg.MODEL.BACKBONE.NAME}) does not output; it has {sorted(shapes)}.")
    input_shape = [shapes[n] for n in f.IN_FEATURES]
    channels = {s.channels for s in input_shape}
    if len(channels) != 1:
        from ..config import ConfigError

        raise ConfigError(f"MODEL.FCOS.IN_FEATURES {list(f.IN_FEATURES)} have different widths "
                          f"{sorted(channels)}; an FCOS head shares its convs across levels.")
    head = FCOSHead(input_shape=input_shape, conv_dims=[channels.pop()] * f.NUM_CONVS,
                    num_classes=f.NUM_CLASSES, norm=f.NORM, prior_prob=f.PRIOR_PROB)
    return {
        "backbone": backbone,
        "head": head,
        "head_in_features": list(f.IN_FEATURES),
        "num_classes": f.NUM_CLASSES,
        "center_sampling_radius": f.CENTER_SAMPLING_RADIUS,
        "focal_loss_alpha": f.FOCAL_LOSS_ALPHA,
        "focal_loss_gamma": f.FOCAL_LOSS_GAMMA,
        "test_score_thresh": f.SCORE_THRESH_TEST,
        "test_topk_candidates": f.TOPK_CANDIDATES_TEST,
        "test_nms_thresh": f.NMS_THRESH_TEST,
        "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        "pixel_mean": cfg.MODEL.PIXEL_MEAN,
        "pixel_std": cfg.MODEL.PIXEL_STD,
    }


class FCOS(StockFCOS):
    """Detectron2's FCOS, buildable from a yacs config (``MODEL.META_ARCHITECTURE: FCOS``).

    Nothing else differs: the modules, parameter names, losses and inference are the stock
    class's, so a stock FCOS (LazyConfig) loads its checkpoints. ``input_format`` (INPUT.FORMAT,
    as RetinaNet keeps it) is what a teacher's or visualiser's input is converted from.
    """

    @configurable
    def __init__(self, *, input_format: str = "BGR", **kwargs):
        super().__init__(**kwargs)
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg):
        return {**fcos_arguments(cfg), "input_format": cfg.INPUT.FORMAT}

    @torch.no_grad()
    def label_anchors(self, anchors: list[Boxes], gt_instances: list[Instances]):
        """Stock labelling; on Detectron2 v0.6, whose FCOS fails on an image without boxes
        (a max over an empty dimension), such an image gets all-background labels, as main
        gives it. Images with boxes are labelled by the stock code either way."""
        if _STOCK_LABELS_EMPTY_IMAGES or all(len(x) > 0 for x in gt_instances):
            return super().label_anchors(anchors, gt_instances)
        labels, boxes = [], []
        num = sum(len(a) for a in anchors)
        for inst in gt_instances:
            if len(inst) > 0:
                one_labels, one_boxes = super().label_anchors(anchors, [inst])
                labels += one_labels
                boxes += one_boxes
            else:
                device = anchors[0].tensor.device
                labels.append(torch.full((num,), self.num_classes, dtype=torch.long,
                                         device=device))
                boxes.append(Boxes(torch.zeros(num, 4, device=device)))  # v0.6 returns Boxes
        return labels, boxes


# Detectron2 main labels images without boxes as background; v0.6 (whose per-image matching is
# ``FCOS.match_anchors``, renamed ``_match_anchors`` with the fix) fails on them.
_STOCK_LABELS_EMPTY_IMAGES = not hasattr(StockFCOS, "match_anchors")

if "FCOS" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(FCOS)
else:  # a Detectron2 that registers its own FCOS: keep it (it reads its own keys)
    logger.debug("META_ARCH_REGISTRY already has an FCOS; the project's yacs FCOS is not "
                 "registered under that name.")


def matched_gt_indices(gt_labels: list[Tensor], gt_boxes: list, gt_instances: list[Instances],
                       background: int) -> Tensor:
    """[N, R] index of the GT each location is matched to (-1 on background), recovered from the
    stock labelling: the matched box and class are copies of that GT's.

    Detectron2's FCOS computes the indices inside ``label_anchors`` and drops them, with another
    private helper in v0.6 (``match_anchors``) than in main (``_match_anchors``); recovering them
    from the public result works with both. Two GTs with the same box and class are the same
    target for every distiller (same s, same u), so either index is right.
    """
    out = []
    for labels, boxes, inst in zip(gt_labels, gt_boxes, gt_instances):
        b = boxes.tensor if isinstance(boxes, Boxes) else boxes
        idx = torch.full_like(labels, -1)
        if len(inst) > 0:
            g = inst.gt_boxes.tensor.to(b.device)
            same = (b[:, None, :] == g[None]).all(-1) & (labels[:, None] == inst.gt_classes[None])
            found = same.any(dim=1) & (labels != background)
            idx = torch.where(found, same.float().argmax(dim=1), idx)
        out.append(idx)
    return torch.stack(out)


@META_ARCH_REGISTRY.register()
class DistillFCOS(DistillMixin, FCOS):
    """FCOS student + frozen teacher + distillers; ``MODEL.DISTILL.LOSSES: []`` is stock FCOS."""

    stock_architecture = "FCOS"

    @configurable
    def __init__(self, *, distill: dict, **kwargs):
        """
        Args:
            distill: the arguments of ``DistillMixin.init_distillation``.
            kwargs: FCOS's arguments (the student).
        """
        super().__init__(**kwargs)
        self.init_distillation(**distill)

    @classmethod
    def from_config(cls, cfg):
        ret = {**fcos_arguments(cfg), "input_format": cfg.INPUT.FORMAT}
        ret["distill"] = cls.distillation_from_config(cfg, SimpleNamespace(
            family="FCOS", anchor_generator=_anchor_generator(ret), **ret))
        return ret

    def detection_targets(self, features: list[Tensor], gt_instances: list[Instances],
                          with_matches: bool) -> DetectionTargets:
        """Stock points and ``label_anchors`` (FCOS's assignment), the GT indices when asked."""
        with record_function("tbd.label_anchors"):
            anchors = self.anchor_generator(features)
            gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        matched = (matched_gt_indices(gt_labels, gt_boxes, gt_instances, self.num_classes)
                   if with_matches else None)
        return DetectionTargets(anchors, gt_labels, gt_boxes, matched)

    def detection_losses(self, student: DenseTaps, targets: DetectionTargets
                         ) -> dict[str, Tensor]:
        """Stock FCOS losses (focal, GIoU, centerness) on the stock assignment."""
        logits, deltas, centerness = self._transpose_dense_predictions(
            student.predictions, [self.num_classes, 4, 1])
        return self.losses(targets.anchors, logits, targets.gt_labels, deltas, targets.gt_boxes,
                           centerness)

    def centerness_targets(self, targets: DetectionTargets) -> Tensor:
        """[N, R] FCOS's centerness target of each location (meaningful on positives)."""
        with torch.no_grad():
            return self.compute_ctrness_targets(targets.anchors, targets.gt_boxes)


def _anchor_generator(args: dict):
    """The point generator a (not yet built) FCOS with ``args`` will use: Detectron2's FCOS
    builds it in ``__init__`` from the head levels' strides, one point per location."""
    from detectron2.modeling.anchor_generator import DefaultAnchorGenerator

    shapes = args["backbone"].output_shape()
    strides = [shapes[k].stride for k in args["head_in_features"]]
    return DefaultAnchorGenerator(sizes=[[s] for s in strides], aspect_ratios=[1.0],
                                  strides=strides)
