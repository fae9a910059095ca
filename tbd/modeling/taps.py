"""The taps of a dense detector: its FPN features and raw head outputs for a batch.

One function for everything that reads a detector's insides: the meta-arch (the teacher's forward),
the harmony analysis, the visualisation tool and the speed benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList
from torch import Tensor, nn


@dataclass
class DenseTaps:
    """What a dense detector computes before its losses or post-processing.

    ``predictions`` are the head's outputs, each a per-level list ``[N, A*D, H, W]``: RetinaNet's
    are ``[logits, box deltas]``, FCOS's ``[logits, box deltas, centerness]``; empty for a teacher
    whose head is not read (a Faster R-CNN teacher, or feature distillers only).
    """

    images: ImageList
    features: list[Tensor]  # the head's FPN levels, in ``head_in_features`` order
    predictions: list[list[Tensor]]
    # Head internals recorded by a ``HeadInternals`` during the forward: {"cls": [...], "box":
    # [...]}, one map per level, when a distiller needs them.
    internals: Optional[dict[str, list[Tensor]]] = field(default=None)
    # The model's own anchors (points for FCOS) per level, when its head outputs are decoded.
    anchors: Optional[list[Boxes]] = field(default=None)

    @property
    def logits(self) -> list[Tensor]:
        return self.predictions[0]

    @property
    def deltas(self) -> list[Tensor]:
        return self.predictions[1]

    @property
    def centerness(self) -> Optional[list[Tensor]]:
        """FCOS's centerness logits per level ``[N, 1, H, W]``; None for a head without them."""
        return self.predictions[2] if len(self.predictions) > 2 else None


def dense_taps(model: DenseDetector, images: ImageList) -> DenseTaps:
    """Backbone and head of ``model`` on already preprocessed ``images`` (gradient as the caller
    sets it): the same calls as ``DenseDetector.forward``."""
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    return DenseTaps(images, features, list(model.head(features)))


def batch_taps(model: DenseDetector, batched_inputs: list[dict]) -> DenseTaps:
    """``dense_taps`` of ``model`` on a batch of dataset-mapper dicts, with its own
    preprocessing."""
    return dense_taps(model, model.preprocess_image(batched_inputs))


# ------------------------------------------------------------------------------ head internals
def head_subnets(head: nn.Module) -> dict[str, nn.Sequential]:
    """The classification and box subnets of a RetinaNet-style head (Detectron2's
    ``RetinaNetHead``: ``cls_subnet`` and ``bbox_subnet``, each conv [norm] ReLU, repeated)."""
    if not (hasattr(head, "cls_subnet") and hasattr(head, "bbox_subnet")):
        raise TypeError(f"{type(head).__name__} is not a RetinaNet-style head (cls_subnet, "
                        "bbox_subnet, cls_score, bbox_pred).")
    return {"cls": head.cls_subnet, "box": head.bbox_subnet}


def head_depth(head: nn.Module) -> int:
    """How many convs each subnet of a RetinaNet-style head has."""
    return sum(isinstance(m, nn.ReLU) for m in head_subnets(head)["cls"])


def _blocks(subnet: nn.Sequential) -> list[list[nn.Module]]:
    """The subnet split after each ReLU: one [conv, (norm), ReLU] block per conv."""
    blocks, current = [], []
    for m in subnet:
        current.append(m)
        if isinstance(m, nn.ReLU):
            blocks.append(current)
            current = []
    return blocks


class HeadInternals:
    """Records, while attached and the head is in training mode, each level's map of both subnets
    of a RetinaNet-style head just before the activation of its ``index``-th conv (``index`` 0:
    the head's input, the FPN feature). ``take()`` returns and forgets them."""

    def __init__(self, head: nn.Module, index: int):
        depth = head_depth(head)
        if not 0 <= index <= depth:
            raise ValueError(f"head index {index} outside 0..{depth} (the head has {depth} "
                             "convs per subnet)")
        self.head, self.index = head, index
        self.maps: dict[str, list[Tensor]] = {"cls": [], "box": []}
        self._hooks: list = []

    def attach(self, always: bool = False) -> HeadInternals:
        """Start recording (``always``: also in eval mode, e.g. for a frozen teacher)."""
        for key, subnet in head_subnets(self.head).items():
            def record(x: Tensor, key=key):
                if always or self.head.training:
                    self.maps[key].append(x)

            if self.index == 0:
                hook = subnet.register_forward_pre_hook(lambda m, inp, r=record: r(inp[0]))
            else:
                relu = _blocks(subnet)[self.index - 1][-1]
                hook = relu.register_forward_hook(lambda m, inp, out, r=record: r(inp[0]))
            self._hooks.append(hook)
        return self

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def take(self) -> dict[str, list[Tensor]]:
        maps, self.maps = self.maps, {"cls": [], "box": []}
        return maps


def head_from(head: nn.Module, maps: dict[str, list[Tensor]], index: int
              ) -> tuple[list[Tensor], list[Tensor]]:
    """A RetinaNet-style head's outputs (logits, deltas per level) computed from its subnets' maps
    just before the activation of conv ``index`` (``index`` 0: from its input)."""
    out = {}
    for key, subnet in head_subnets(head).items():
        rest = [m for block in _blocks(subnet)[index:] for m in block]
        final = head.cls_score if key == "cls" else head.bbox_pred
        level_out = []
        for x in maps[key]:
            if index > 0:
                x = nn.functional.relu(x)
            for m in rest:
                x = m(x)
            level_out.append(final(x))
        out[key] = level_out
    return out["cls"], out["box"]
