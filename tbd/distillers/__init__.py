"""Distillers. Importing this package registers HD, TFD, FRS and FGD (and the methods TBD, FRS,
FGD). A new distiller is one file here plus one import line below."""

from . import fgd, frs, hd, tfd  # noqa: F401  (registration)
from .registry import (
    DISTILL_LOSS_REGISTRY,
    METHODS,
    NEEDS,
    Distiller,
    DistillInputs,
    register_method,
    registered_distillers,
)

__all__ = [
    "DISTILL_LOSS_REGISTRY",
    "METHODS",
    "NEEDS",
    "DistillInputs",
    "Distiller",
    "register_method",
    "registered_distillers",
]
