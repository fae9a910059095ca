"""Distillers. Importing this package registers HD, TFD, FRS, FGD, PKD, MGD, CrossKD and the
investigation variant CrossHD (and the methods TBD, FRS, FGD, PKD, MGD, CrossKD). A new distiller
is one file here plus one import line below."""

from . import cross_hd, crosskd, fgd, frs, hd, mgd, pkd, tfd  # noqa: F401  (registration)
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
