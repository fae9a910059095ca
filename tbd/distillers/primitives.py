"""Shared building blocks of the distillers: adapters, normalisers, masks and losses.

The distillers build on these, so none of them copies another.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.utils import comm
from fvcore.nn import giou_loss
from torch import Tensor, nn


def reduce_mean(x: Tensor) -> Tensor:
    """Sum a (detached) normaliser over processes and divide by the world size.

    N processes with B images each then get the same loss as one process with N*B images.
    """
    if comm.get_world_size() > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
        x = x / comm.get_world_size()
    return x


def build_adapters(
    names: list[str],
    student_shapes: dict[str, ShapeSpec],
    teacher_shapes: dict[str, ShapeSpec],
    kernel_size: int = 1,
) -> nn.ModuleDict:
    """One conv per level, student channels -> teacher channels, from the two output shapes."""
    adapters = nn.ModuleDict()
    for name in names:
        cs, ct = student_shapes[name].channels, teacher_shapes[name].channels
        adapters[name] = nn.Conv2d(cs, ct, kernel_size, padding=kernel_size // 2)
    return adapters


def differing_levels(student_shapes: dict[str, ShapeSpec],
                     teacher_shapes: dict[str, ShapeSpec]) -> list[str]:
    """The paired levels whose channel counts differ (they need an adapter)."""
    return [n for n in student_shapes if student_shapes[n].channels != teacher_shapes[n].channels]


def standardise_channels(feat: Tensor, eps: float = 1e-6) -> Tensor:
    """[N, C, H, W] minus each channel's mean over (N, H, W), over (its unbiased std + eps)."""
    n, c, h, w = feat.shape
    flat = feat.transpose(0, 1).reshape(c, -1)
    flat = (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, keepdim=True) + eps)
    return flat.reshape(c, n, h, w).transpose(0, 1)


def max_score_mask(logits: Tensor) -> Tensor:
    """FRS's feature-richness mask: max over the A*K channels of sigmoid(logits), [N, H, W]."""
    return logits.detach().float().sigmoid().amax(dim=1)


def max_over_anchors(values: Tensor, height: int, width: int) -> Tensor:
    """[N, H*W*A] per-anchor values in (y, x, a) order -> [N, H, W] maximum over anchors."""
    n = values.shape[0]
    return values.view(n, height, width, -1).amax(dim=-1)


def normalise_per_image(mask: Tensor, eps: float = 1e-12) -> Tensor:
    """Divide a [N, H, W] mask by its own mass per image; a zero-mass mask stays zero."""
    mass = mask.sum(dim=(1, 2), keepdim=True)
    return mask / mass.clamp_min(eps)


def masked_feature_loss(
    teacher_feat: Tensor, student_feat: Tensor, mask: Tensor, eps: float = 1e-12
) -> tuple[Tensor, Tensor]:
    """sum M * ||F_T - F_S||^2 (channels summed) / max(sum M over the batch, eps), in fp32.

    Returns the loss and the (all-reduced) mask mass used as its normaliser.
    """
    diff = (teacher_feat.float() - student_feat.float()).pow(2).sum(dim=1)
    mass = reduce_mean(mask.sum())
    return (mask * diff).sum() / mass.clamp_min(eps), mass


def weighted_bce_to_teacher(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """Per-anchor BCE(sigmoid(z_S), p_T) summed over classes, fp32 (safe under autocast)."""
    return F.binary_cross_entropy_with_logits(
        student_logits.float(), teacher_probs.float(), reduction="none"
    ).sum(dim=-1)


def giou_loss_per_box(pred: Tensor, target: Tensor) -> Tensor:
    """GIoU loss of matched box pairs [..., 4] (fvcore's op), fp32, no reduction."""
    shape = pred.shape[:-1]
    out = giou_loss(pred.float().reshape(-1, 4), target.float().reshape(-1, 4), reduction="none")
    return out.view(shape)


def weighted_mean(values: Tensor, weights: Tensor, min_norm: float = 1.0) -> Tensor:
    """sum(w * v) / max(sum w (all-reduced), min_norm); entries with w == 0 never contribute."""
    norm = reduce_mean(weights.sum()).clamp_min(min_norm)
    contrib = torch.where(weights > 0, weights * values, torch.zeros_like(values))
    return contrib.sum() / norm
