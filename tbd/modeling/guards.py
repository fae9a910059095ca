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


class TermWatch:
    """Says when distillation is not really on: warns once, naming the term and the key to
    change, when a term is 0 at every one of the first ``window`` steps (no foreground anchor, no
    box, a weight of 0), or stays below 1% or above 100 times the detection loss; and checks at
    the first step that every process computes the same terms. Its values stay on the device
    until the window ends (one host copy then)."""

    LOW, HIGH = 0.01, 100.0

    def __init__(self, window: int, keys: dict[str, str], ratios: bool = True):
        self.window = window
        self.keys = keys  # loss key -> the config key that weights it
        self.ratios = ratios  # False: report only terms that stay 0
        self.steps = 0
        self._stats: Optional[Tensor] = None  # [3, T]: max |value|, min and max ratio

    @property
    def done(self) -> bool:
        return self.steps >= self.window

    def update(self, raw: dict[str, Tensor], detection: Tensor) -> None:
        if self.done or not raw:
            return
        if self.steps == 0:
            self._check_processes(sorted(raw))
        values = torch.stack([v.detach().float() for v in raw.values()])
        ratio = values.abs() / detection.detach().float().abs().clamp_min(1e-12)
        now = torch.stack([values.abs(), ratio, ratio])
        if self._stats is None:
            self._stats = now
        else:
            self._stats = torch.stack([torch.maximum(self._stats[0], now[0]),
                                       torch.minimum(self._stats[1], now[1]),
                                       torch.maximum(self._stats[2], now[2])])
        self.steps += 1
        if self.done:
            self._report(list(raw))

    def _report(self, names: list[str]) -> None:
        largest, low, high = self._stats.tolist()
        for name, m, lo, hi in zip(names, largest, low, high):
            key = self.keys.get(name, "its MODEL.DISTILL weight")
            if m == 0:
                logger.warning(
                    "Distillation term %s was 0 at each of the first %d steps: it trains nothing "
                    "(no foreground anchor or GT box in the batches, or a weight of 0?). Check %s, "
                    "the anchors (MODEL.ANCHOR_GENERATOR) and the annotations.",
                    name, self.steps, key)
            elif not self.ratios:
                continue
            elif hi < self.LOW:
                logger.warning(
                    "Distillation term %s stayed below %.0f%% of the detection loss over the first "
                    "%d steps (at most %.2g times it): it barely trains. Raise %s.",
                    name, 100 * self.LOW, self.steps, hi, key)
            elif lo > self.HIGH:
                logger.warning(
                    "Distillation term %s stayed above %.0f times the detection loss over the "
                    "first %d steps (at least %.3g times it): it drowns the detection loss. Lower "
                    "%s.", name, self.HIGH, self.steps, lo, key)

    @staticmethod
    def _check_processes(names: list[str]) -> None:
        if comm.get_world_size() == 1:
            return
        everyone = comm.all_gather(names)
        if any(n != names for n in everyone):
            raise RuntimeError("The processes compute different distillation terms "
                               f"(per rank: {everyone}): check that every process was started "
                               "with the same config (MODEL.DISTILL.LOSSES).")
