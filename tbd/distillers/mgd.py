"""MGD (Yang et al., ECCV 2022), following its official code and RetinaNet config [peer]
(docs/METHOD.md, "MGD"). Registers the method "MGD". Keys: ``MODEL.DISTILL.MGD.*``.

Per FPN level, a random share ``LAMBDA`` of the student's locations is masked out and a small
generation block must rebuild the teacher's full feature map from what is left: the student
learns features from which the teacher's can be generated.
"""

from __future__ import annotations

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from ..config import ConfigError
from .primitives import build_adapters, differing_levels
from .registry import (
    DISTILL_LOSS_REGISTRY,
    Distiller,
    DistillInputs,
    check_weights,
    register_method,
)


def generation_block(channels: int) -> nn.Sequential:
    """MGD's generator: 3x3 conv, ReLU, 3x3 conv, at the teacher's width."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(channels, channels, 3, padding=1))


def random_keep_mask(shape: tuple[int, int, int], drop: float, generator: torch.Generator
                     ) -> Tensor:
    """[N, 1, H, W] of 0 (probability ``drop``) and 1, drawn on the CPU from ``generator``."""
    n, h, w = shape
    u = torch.rand((n, 1, h, w), generator=generator)
    return (u <= 1 - drop).float()


@DISTILL_LOSS_REGISTRY.register()
class MGD(Distiller):
    """Masked generative distillation on every FPN level the head uses.

    The masks come from a generator of this module, seeded by ``SEED`` (or ``cfg.SEED``) and kept
    as the buffer ``rng_state``: it is saved in every training checkpoint, so that ``--resume``
    draws the masks an uninterrupted run draws. All processes share the seed, and so the masks.
    """

    needs: frozenset[str] = frozenset()  # paired FPN features only
    loss_keys = {"loss_mgd": "MODEL.DISTILL.MGD.ALPHA"}

    @classmethod
    def add_config(cls, cfg: CN) -> None:
        _C = cfg.MODEL.DISTILL
        # MGD, LOSSES: ["MGD"]. Defaults: the official RetinaNet config.
        _C.MGD = CN()
        # Weight of the generation loss (sum of squared errors / N, summed over levels).
        _C.MGD.ALPHA = 2e-5
        # Share of student locations masked out at each step.
        _C.MGD.LAMBDA = 0.65
        # Seed of the mask generator; -1: the run's SEED (0 if that is random too).
        _C.MGD.SEED = -1

    @classmethod
    def validate_config(cls, cfg: CN) -> None:
        check_weights(cfg, ["MODEL.DISTILL.MGD.ALPHA"])
        lam = cfg.MODEL.DISTILL.MGD.LAMBDA
        if not 0.0 <= lam < 1.0:
            raise ConfigError(f"MODEL.DISTILL.MGD.LAMBDA must be in [0, 1), got {lam}.")

    @configurable
    def __init__(self, *, align: nn.ModuleDict, generators: nn.ModuleDict, alpha: float = 2e-5,
                 drop: float = 0.65, seed: int = 0):
        super().__init__()
        self.align = align
        self.generators = generators
        self.alpha = alpha
        self.drop = drop
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("rng_state", g.get_state())

    @classmethod
    def from_config(cls, cfg, student_shapes: dict[str, ShapeSpec],
                    teacher_shapes: dict[str, ShapeSpec]):
        d = cfg.MODEL.DISTILL.MGD
        differ = differing_levels(student_shapes, teacher_shapes)
        seed = d.SEED if d.SEED >= 0 else max(cfg.SEED, 0)
        return {
            "align": build_adapters(differ, student_shapes, teacher_shapes),
            "generators": nn.ModuleDict({n: generation_block(teacher_shapes[n].channels)
                                         for n in student_shapes}),
            "alpha": d.ALPHA,
            "drop": d.LAMBDA,
            "seed": seed,
        }

    def forward(self, inputs: DistillInputs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        g = torch.Generator()
        g.set_state(self.rng_state.cpu())
        total = inputs.student_features[0].new_zeros((), dtype=torch.float32)
        diag = {}
        for name, f_s, f_t in zip(inputs.level_names, inputs.student_features,
                                  inputs.teacher_features):
            if name in self.align:
                f_s = self.align[name](f_s)
            n, _, h, w = f_t.shape
            mask = random_keep_mask((n, h, w), self.drop, g).to(f_s.device)
            generated = self.generators[name](f_s * mask)
            loss = (generated.float() - f_t.detach().float()).pow(2).sum() / n
            total = total + loss
            diag[f"mgd/loss_{name}"] = loss.detach()
        self.rng_state.copy_(g.get_state())
        return {"loss_mgd": self.alpha * total}, diag


register_method("MGD", ("MGD",))
