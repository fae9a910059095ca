"""Modeling: the distillation meta-architectures, the teacher, the taps and the step's guards."""

from .fcos import FCOS, DistillFCOS
from .meta_arch import DistillMetaArch, DistillMixin
from .taps import DenseTaps, batch_taps, dense_taps
from .teacher import TeacherError, build_teacher, teacher_is_frozen

__all__ = [
    "DenseTaps",
    "DistillFCOS",
    "DistillMetaArch",
    "DistillMixin",
    "FCOS",
    "TeacherError",
    "batch_taps",
    "build_teacher",
    "dense_taps",
    "teacher_is_frozen",
]
