"""Distillation losses. Importing this package registers HD, TFD, FRS and FGD."""

from . import fgd, frs, tbd  # noqa: F401  (registration)
from .registry import DISTILL_LOSS_REGISTRY, DistillInputs

__all__ = ["DISTILL_LOSS_REGISTRY", "DistillInputs"]
