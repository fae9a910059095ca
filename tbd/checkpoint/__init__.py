"""Checkpoints: atomic file IO (``io``), training checkpoints (``training``) and releases
(``release``)."""

from .io import (
    atomic_torch_save,
    atomic_write_text,
    is_complete_checkpoint,
    remove_stale_temporaries,
    sha256_file,
)
from .release import (
    ReleaseError,
    export_student,
    student_state_dict,
    trace_student,
    verify_release_file,
)
from .training import (
    DISTILLER_PREFIX,
    CheckpointError,
    StudentCheckpointer,
    TrainingCheckpointer,
    strip_distiller_keys,
)

__all__ = [
    "DISTILLER_PREFIX",
    "CheckpointError",
    "ReleaseError",
    "StudentCheckpointer",
    "TrainingCheckpointer",
    "atomic_torch_save",
    "atomic_write_text",
    "export_student",
    "is_complete_checkpoint",
    "remove_stale_temporaries",
    "sha256_file",
    "strip_distiller_keys",
    "student_state_dict",
    "trace_student",
    "verify_release_file",
]
