"""Synthetic data for demos, tests and benchmarks."""

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
    "SHAPE_CLASSES",
    "ShapesSpec",
    "ensure_generated",
    "generate_shapes",
    "is_shapes_dataset",
    "register_default_shapes",
    "register_shapes",
    "render_image",
]
