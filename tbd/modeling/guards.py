"""What watches a distillation step: the non-finite diagnosis, the first-step report of the
terms, and the diagnostics buffer that writes to the event storage once per log period."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor

from ..distillers import DistillInputs

logger = logging.getLogger(__name__)

# What a diverging student's error message suggests: per-parameter clipping at 10 stopped the
# benchmarks' divergence and stall (projects/TBD/benchmarks/README.md, "Gradient spike and
# clipping check").
DIVERGED_FIX = ("enable gradient clipping (SOLVER.CLIP_GRADIENTS.ENABLED True, CLIP_TYPE norm, "
                "CLIP_VALUE 10), lower SOLVER.BASE_LR or lower the distillation weights")


def current_iter() -> Optional[int]:
    """The trainer's iteration, or None outside a trainer (no EventStorage)."""
    try:
        return get_event_storage().iter
    except AssertionError:
        return None


def diagnose(inputs: DistillInputs) -> tuple[list[str], str]:
    """Which taps are not finite, and the likely cause and fix, for an error message."""
    tensors = {
        "teacher FPN features": inputs.teacher_features,
        "teacher head outputs": list(inputs.teacher_logits) + list(inputs.teacher_deltas),
        "student FPN features": inputs.student_features,
        "student head outputs": list(inputs.student_logits) + list(inputs.student_deltas),
    }
    nonfinite = [n for n, ts in tensors.items()
                 if not all(bool(torch.isfinite(t).all()) for t in ts)]
    if any(n.startswith("teacher") for n in nonfinite):
        hint = ("the teacher produces non-finite outputs: check MODEL.DISTILL.TEACHER.WEIGHTS "
                "and that the teacher runs in its own precision")
    elif nonfinite:
        hint = f"the student diverged: {DIVERGED_FIX}"
    else:
        largest = {n: max((float(t.detach().abs().max()) for t in ts if t.numel()), default=0.0)
                   for n, ts in tensors.items()}
        sizes = ", ".join(f"{n} {v:.3g}" for n, v in largest.items())
        student = max(v for n, v in largest.items() if n.startswith("student"))
        teacher = max(v for n, v in largest.items() if n.startswith("teacher"))
        if student > 1e3 * max(teacher, 1.0):  # e.g. |F_S|^2 overflows fp32 above ~1e19
            hint = (f"the inputs are finite but the student's are huge (largest |value|: "
                    f"{sizes}): the student is diverging; {DIVERGED_FIX}")
        else:
            hint = (f"the inputs are finite (largest |value|: {sizes}), so the term itself "
                    "overflowed: lower its weight (MODEL.DISTILL.*) and report it with this "
                    "message")
    return nonfinite, hint


def raise_if_inputs_not_finite(inputs: DistillInputs, it: Optional[int]) -> None:
    """Raise the diagnosis as FloatingPointError when a tap is not finite (a distiller that
    failed on such inputs, e.g. fvcore's GIoU on NaN boxes, then says why)."""
    nonfinite, hint = diagnose(inputs)
    if nonfinite:
        raise FloatingPointError(f"A distiller failed at iteration {it} on non-finite inputs: "
                                 f"{nonfinite}; {hint}.")


def check_finite(raw: dict[str, Tensor], inputs: DistillInputs, it: Optional[int]) -> None:
    """Raise FloatingPointError naming the non-finite distillation term(s) and likely cause.

    With several processes the verdict is all-reduced, so every process stops at the same step
    instead of the others waiting in the next collective until its timeout.
    """
    if not raw:
        return
    values = torch.stack([v.detach().float() for v in raw.values()])
    flag = (~torch.isfinite(values)).any().float().reshape(1)
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(flag)
    if float(flag.item()) == 0.0:
        return
    bad = [k for k, v in raw.items() if not torch.isfinite(v.detach()).all()]
    if not bad:
        raise FloatingPointError(
            f"A distillation loss is not finite at iteration {it} on another process (rank "
            f"{comm.get_rank()} is finite); see that process's message."
        )
    nonfinite, hint = diagnose(inputs)
    raise FloatingPointError(
        f"Distillation loss {bad} is not finite at iteration {it} "
        f"(values {[float(raw[k].detach()) for k in bad]}). Non-finite inputs: "
        f"{nonfinite or 'none'}; {hint}."
    )


class DistillDiagnostics:
    """Logs the weighted terms once at the first step, and buffers the distillers' diagnostics
    to write their means to the event storage every ``log_period`` iterations (one batched
    device-to-host copy per period)."""

    def __init__(self, log_period: int):
        self.log_period = log_period
        self._buffer: dict[str, list[Tensor]] = {}
        self._logged_first = False

    def record(self, it: Optional[int], raw: dict[str, Tensor], diag: dict[str, Tensor],
               factor: float) -> None:
        if not self._logged_first:
            self._logged_first = True
            logger.info(
                "Distillation terms at the first step (weighted, before the schedule factor "
                "%.3f): %s. Use them to set the MODEL.DISTILL weights on a new dataset.",
                factor, {k: round(float(v.detach()), 6) for k, v in raw.items()},
            )
        if it is None or self.log_period <= 0:
            return
        for k, v in diag.items():
            self._buffer.setdefault(k, []).append(v.detach().float())
        if (it + 1) % self.log_period == 0:
            keys = sorted(self._buffer)
            means = torch.stack([torch.stack(self._buffer[k]).mean() for k in keys]).tolist()
            storage = get_event_storage()
            for k, m in zip(keys, means):
                storage.put_scalar(f"distill/{k}", m, smoothing_hint=False)
            storage.put_scalar("distill/factor", factor, smoothing_hint=False)
            self._buffer.clear()
