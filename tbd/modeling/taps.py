"""The taps of a dense detector: its FPN features and raw head outputs for a batch.

One function for everything that reads a detector's insides: the meta-arch (the teacher's forward),
the harmony analysis, the visualisation tool and the speed benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import ImageList
from torch import Tensor


@dataclass
class DenseTaps:
    """What a dense detector computes before its losses or post-processing.

    ``predictions`` are the head's outputs, each a per-level list ``[N, A*D, H, W]``: RetinaNet's
    are ``[logits, box deltas]``.
    """

    images: ImageList
    features: list[Tensor]  # the head's FPN levels, in ``head_in_features`` order
    predictions: list[list[Tensor]]

    @property
    def logits(self) -> list[Tensor]:
        return self.predictions[0]

    @property
    def deltas(self) -> list[Tensor]:
        return self.predictions[1]


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
