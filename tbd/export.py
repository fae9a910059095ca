"""Tracing export of a released student with Detectron2's TracingAdapter."""

from __future__ import annotations

import torch
from detectron2.modeling.meta_arch import RetinaNet


def trace_student(model: RetinaNet, sample_inputs: list[dict]) -> tuple[torch.jit.ScriptModule,
                                                                          object]:
    """torch.jit.trace the student's inference (no post-processing) via TracingAdapter.

    Returns the traced module and the adapter (whose ``flattened_inputs`` feed it and whose
    ``outputs_schema`` rebuilds Instances). Needs ``detectron2.export`` importable: official
    Detectron2, or v0.6 with scripts/setup.sh's install edit 7 (caffe2 made optional).
    """
    from detectron2.export import TracingAdapter

    model.eval()
    adapter = TracingAdapter(model, sample_inputs)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    return traced, adapter
