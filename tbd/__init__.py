"""TBD: Task-Balanced Distillation for Detectron2.

Importing this package registers DistillMetaArch, DistillFCOS and a yacs-buildable FCOS
(META_ARCH_REGISTRY), the distillers (DISTILL_LOSS_REGISTRY) and the synthetic ``tbd_shapes_*``
datasets.
"""

from .config import add_tbd_config, student_config, validate_distill_config
from .data import register_default_shapes
from .distillers import DISTILL_LOSS_REGISTRY, METHODS, Distiller
from .modeling import DistillFCOS, DistillMetaArch, DistillMixin, TeacherError, build_teacher

register_default_shapes()

__version__ = "0.1.0"
__all__ = [
    "DISTILL_LOSS_REGISTRY",
    "METHODS",
    "DistillFCOS",
    "DistillMetaArch",
    "DistillMixin",
    "Distiller",
    "TeacherError",
    "add_tbd_config",
    "build_teacher",
    "student_config",
    "validate_distill_config",
]
