"""Automatic loss weights (``MODEL.DISTILL.AUTO_WEIGHT``) [ours].

Published loss weights are tuned for one dataset, resolution and detector; on another, a term can
be a thousandth of the detection loss or a thousand times it. With the switch on, the first
``ITERS`` iterations from ``MODEL.DISTILL.START_ITER`` measure, for each distiller, the mean over
steps of (sum of its weighted terms) / (detection loss), with the configured weights (and the
warm-up factor on top, as always). At the first step after that window each distiller gets one
scale, ``TARGET.<name> / measured ratio``, applied to all its terms from then on.

One scale per distiller, not per term: the relative weights inside a distiller (FGD's attention
and global terms against its feature term, HD's classification against regression) are part of
the method as published and stay as configured; only the distiller's total is brought to the
target.

The state (the running sums and the scales) lives in buffers of each distiller module
(``distillers.<name>.auto_*``), so checkpoints hold it, ``--resume`` continues it exactly, and
releases drop it with the rest of ``distillers.*``. With several processes, each measured step
all-reduces the distillers' totals and the detection loss (one small all-reduce), so the ratio is
the one a single process with the whole batch measures, and every process holds the same sums,
checkpoints and scales.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_SUM, _SCALE, _FIXED = "auto_ratio_sum", "auto_scale", "auto_fixed"


class AutoWeight:
    """Measures each distiller's weighted total against the detection loss, then scales it."""

    def __init__(self, distillers: nn.ModuleDict, targets: dict[str, float], start_iter: int,
                 iters: int, weight_keys: Optional[dict[str, list[str]]] = None):
        """
        Args:
            distillers: the meta-arch's distillers; buffers are registered on each.
            targets: distiller name -> target ratio of its total to the detection loss.
            start_iter: first measured iteration (MODEL.DISTILL.START_ITER).
            iters: number of measured iterations.
            weight_keys: distiller name -> the config keys of its weights (for the report).
        """
        self.distillers = distillers
        self.targets = {n: float(targets[n]) for n in distillers}
        self.start_iter, self.iters = int(start_iter), int(iters)
        self.weight_keys = weight_keys or {}
        for d in distillers.values():
            d.register_buffer(_SUM, torch.zeros(()))
            d.register_buffer(_SCALE, torch.ones(()))
            d.register_buffer(_FIXED, torch.zeros((), dtype=torch.bool))
        self._fixed: Optional[bool] = None  # host copy of the flags, read lazily (after a resume)
        self._scales_cache: Optional[dict[str, float]] = None

    @property
    def end_iter(self) -> int:
        """The first iteration that uses the scales."""
        return self.start_iter + self.iters

    def fixed(self) -> bool:
        """Whether the scales are set (read from the buffers until they are)."""
        if not self._fixed:
            self._fixed = all(bool(getattr(d, _FIXED)) for d in self.distillers.values())
        return self._fixed

    def scales(self) -> dict[str, float]:
        return {n: float(getattr(d, _SCALE)) for n, d in self.distillers.items()}

    def __call__(self, terms: dict[str, dict[str, Tensor]], detection: Tensor,
                 it: Optional[int]) -> dict[str, dict[str, Tensor]]:
        """``terms``: distiller name -> its weighted terms at iteration ``it``; returns them
        scaled (unchanged during the measurement window and outside a trainer)."""
        if it is None or it < self.start_iter:
            return terms
        if it < self.end_iter:  # measuring: the running sums stay on the device
            names = list(terms)
            values = torch.stack([sum(v.detach().float() for v in terms[n].values())
                                  for n in names] + [detection.detach().float().abs()])
            if comm.get_world_size() > 1:
                # Each process's losses are its share of the total batch's (their mean is the
                # loss of one process with the whole batch): the ratio of the means is that
                # process's ratio, and every process keeps the same sums (and checkpoint).
                torch.distributed.all_reduce(values)
                values /= comm.get_world_size()
            ratios = values[:-1] / values[-1].clamp_min(1e-12)
            for name, ratio in zip(names, ratios):
                getattr(self.distillers[name], _SUM).add_(ratio)
            return terms
        if not self.fixed():
            self._set_scales()
        out = {}
        for name, d_terms in terms.items():
            scale = getattr(self.distillers[name], _SCALE)
            out[name] = {k: v * scale for k, v in d_terms.items()}
        storage = get_event_storage()
        for name, value in self._host_scales.items():
            storage.put_scalar(f"auto_weight/{name}", value, smoothing_hint=False)
        return out

    def _set_scales(self) -> None:
        names = list(self.distillers)
        sums = torch.stack([getattr(self.distillers[n], _SUM) for n in names])
        ratios = (sums / max(self.iters, 1)).tolist()
        for name, ratio in zip(names, ratios):
            d = self.distillers[name]
            if ratio > 0:
                getattr(d, _SCALE).fill_(self.targets[name] / ratio)
            else:
                logger.warning("AUTO_WEIGHT: distiller %s was 0 over its %d measured steps; its "
                               "scale stays 1 (it has nothing to scale).", name, self.iters)
            getattr(d, _FIXED).fill_(True)
        self._fixed = True
        self._scales_cache = self.scales()
        logger.info("AUTO_WEIGHT set after %d measured iterations:\n%s", self.iters,
                    self.report(ratios=dict(zip(names, ratios))))

    @property
    def _host_scales(self) -> dict[str, float]:
        """The scales as floats, copied to the host once (after a resume: at its first step)."""
        if self._scales_cache is None:
            self._scales_cache = self.scales()
        return self._scales_cache

    def report(self, ratios: Optional[dict[str, float]] = None) -> str:
        """One line per distiller: measured ratio, target, scale, and the weight keys that give
        the same training without the switch (each configured weight times the scale)."""
        lines = []
        for name, scale in self.scales().items():
            measured = "" if ratios is None else f"measured ratio {ratios[name]:.4g}, "
            keys = ", ".join(self.weight_keys.get(name, [])) or "its MODEL.DISTILL weights"
            lines.append(f"  {name}: {measured}target {self.targets[name]:g}, scale {scale:.4g} "
                         f"(multiply {keys} by it to train the same without AUTO_WEIGHT)")
        return "\n".join(lines)

    def summary(self) -> dict:
        """What the checkpoint holds, for a results file."""
        return {"fixed": self.fixed(), "iters": self.iters, "start_iter": self.start_iter,
                "targets": self.targets, "scales": self.scales()}
