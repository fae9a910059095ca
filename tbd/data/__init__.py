"""Synthetic data for demos, tests and benchmarks."""

from .loader import (
    DataError,
    ResumableTrainLoader,
    build_resumable_train_loader,
    check_dataset,
    load_train_dicts,
)
from .registration import add_dataset_arguments, register_datasets
from .shapes import (
    SHAPE_CLASSES,
    ShapesSpec,
    ensure_generated,
    generate_shapes,
    is_shapes_dataset,
    register_default_shapes,
    register_shapes,
    render_image,
)

__all__ = [
    "DataError",
    "add_dataset_arguments",
    "register_datasets",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "check_dataset",
    "load_train_dicts",
    "SHAPE_CLASSES",
    "ShapesSpec",
    "ensure_generated",
    "generate_shapes",
    "is_shapes_dataset",
    "register_default_shapes",
    "register_shapes",
    "render_image",
]
