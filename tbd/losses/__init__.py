"""Distillation losses. Importing this package registers HD and TFD."""

from . import tbd  # noqa: F401  (registers HD, TFD)
from .registry import DISTILL_LOSS_REGISTRY, DistillInputs

__all__ = ["DISTILL_LOSS_REGISTRY", "DistillInputs"]
