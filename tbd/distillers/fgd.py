"""FGD (Yang et al., CVPR 2022), following its official code [peer] (docs/METHOD.md, "FGD").

One module per FPN level, on the FPN outputs: focal distillation (GT-box foreground/background
masks with the teacher's spatial and channel attention), attention imitation, and a global
relation term through a GcBlock-style context block per side. Masks are indexed [y, x] as in
the current official code. "Inheriting" (initialising the student from the teacher) is not
implemented: it needs equal shapes, which our light students do not have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def fgd_attention(feat: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """FGD attention: spatial [N, H, W] = H*W softmax(mean_c abs(F) / T), channel [N, C] =
    C softmax(mean_hw abs(F) / T)."""
    n, c, h, w = feat.shape
    value = feat.abs()
    spatial = value.mean(dim=1).view(n, -1)
    spatial = (h * w * F.softmax(spatial / temperature, dim=1)).view(n, h, w)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial, channel


def fgd_masks(
    boxes: list[Tensor], image_sizes: list[tuple[int, int]], height: int, width: int
) -> tuple[Tensor, Tensor]:
    """FGD's foreground and background masks [N, H, W] for one level.

    A GT box scaled to the grid covers columns floor(x1)..ceil(x2) and rows floor(y1)..ceil(y2)
    (inclusive) with value 1 / (rows * cols); overlaps keep the maximum. The background mask is 1
    where the foreground is 0, divided by the number of such positions.
    """
    n = len(boxes)
    device = boxes[0].device if n else torch.device("cpu")
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, -1)
    fg = torch.zeros(n, height, width, device=device)
    for i, (b, (img_h, img_w)) in enumerate(zip(boxes, image_sizes)):  # loop over images only
        if len(b) == 0:
            continue
        b = b.float()
        x1 = torch.floor(b[:, 0] * width / img_w).view(-1, 1, 1)
        x2 = torch.ceil(b[:, 2] * width / img_w).view(-1, 1, 1)
        y1 = torch.floor(b[:, 1] * height / img_h).view(-1, 1, 1)
        y2 = torch.ceil(b[:, 3] * height / img_h).view(-1, 1, 1)
        value = 1.0 / ((y2 + 1 - y1) * (x2 + 1 - x1))
        inside = (ys >= y1) & (ys <= y2) & (xs >= x1) & (xs <= x2)  # [M, H, W]
        fg[i] = torch.where(inside, value, torch.zeros_like(value)).amax(dim=0)
    bg = (fg == 0).float()
    count = bg.sum(dim=(1, 2), keepdim=True)
    bg = torch.where(count > 0, bg / count.clamp_min(1), bg)
    return fg, bg


class ContextBlock(nn.Module):
    """FGD's global context block: attention pooling + channel-add transform (GcBlock)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        attn = F.softmax(self.conv_mask(x).view(n, 1, h * w), dim=2)  # [N, 1, HW]
        context = torch.bmm(x.view(n, c, h * w), attn.transpose(1, 2)).view(n, c, 1, 1)
        return x + self.channel_add(context)


@DISTILL_LOSS_REGISTRY.register()
class FGD(Distiller):
    """Focal and global distillation on every FPN level the head uses (paired features only)."""

    needs: frozenset[str] = frozenset()
    loss_keys = {"loss_fgd_fg": "MODEL.DISTILL.FGD.ALPHA_FG",
                 "loss_fgd_bg": "MODEL.DISTILL.FGD.BETA_BG",
                 "loss_fgd_attn": "MODEL.DISTILL.FGD.GAMMA_ATTN",
                 "loss_fgd_global": "MODEL.DISTILL.FGD.LAMBDA_GLOBAL"}

    @classmethod
    def add_config(cls, cfg: CN) -> None:
        _C = cfg.MODEL.DISTILL
        # FGD, LOSSES: ["FGD"]. Defaults: the official RetinaNet weights.
        _C.FGD = CN()
        # Weight of the foreground focal (attention-weighted, GT-box-masked) feature term.
        _C.FGD.ALPHA_FG = 1e-3
        # Weight of the background focal feature term.
        _C.FGD.BETA_BG = 5e-4
        # Weight of the spatial + channel attention imitation term.
        _C.FGD.GAMMA_ATTN = 5e-4
        # Weight of the global (context block) relation term.
        _C.FGD.LAMBDA_GLOBAL = 5e-6
        # Temperature of the attention softmaxes.
        _C.FGD.TEMPERATURE = 0.5

    @classmethod
    def validate_config(cls, cfg: CN) -> None:
        check_weights(cfg, [f"MODEL.DISTILL.FGD.{k}" for k in (
            "ALPHA_FG", "BETA_BG", "GAMMA_ATTN", "LAMBDA_GLOBAL")])
        t = cfg.MODEL.DISTILL.FGD.TEMPERATURE
        if not t > 0:
            raise ConfigError(f"MODEL.DISTILL.FGD.TEMPERATURE must be > 0, got {t}.")

    @configurable
    def __init__(
        self,
        *,
        align: nn.ModuleDict,
        student_blocks: nn.ModuleDict,
        teacher_blocks: nn.ModuleDict,
        alpha_fg: float = 1e-3,
        beta_bg: float = 5e-4,
        gamma_attn: float = 5e-4,
        lambda_global: float = 5e-6,
        temperature: float = 0.5,
    ):
        super().__init__()
        self.align = align
        self.student_blocks = student_blocks
        self.teacher_blocks = teacher_blocks
        self.alpha_fg = alpha_fg
        self.beta_bg = beta_bg
        self.gamma_attn = gamma_attn
        self.lambda_global = lambda_global
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg, student_shapes: dict[str, ShapeSpec],
                    teacher_shapes: dict[str, ShapeSpec]):
        d = cfg.MODEL.DISTILL.FGD
        names = list(student_shapes)
        differ = differing_levels(student_shapes, teacher_shapes)
        return {
            "align": build_adapters(differ, student_shapes, teacher_shapes, kernel_size=1),
            "student_blocks": nn.ModuleDict(
                {n: ContextBlock(teacher_shapes[n].channels) for n in names}),
            "teacher_blocks": nn.ModuleDict(
                {n: ContextBlock(teacher_shapes[n].channels) for n in names}),
            "alpha_fg": d.ALPHA_FG,
            "beta_bg": d.BETA_BG,
            "gamma_attn": d.GAMMA_ATTN,
            "lambda_global": d.LAMBDA_GLOBAL,
            "temperature": d.TEMPERATURE,
        }

    def level_terms(self, name: str, f_s: Tensor, f_t: Tensor, fg: Tensor, bg: Tensor
                    ) -> dict[str, Tensor]:
        """The four unweighted FGD terms of one level, each divided by the image count N."""
        if name in self.align:
            f_s = self.align[name](f_s)
        f_s, f_t = f_s.float(), f_t.detach().float()
        n = f_s.shape[0]
        s_t, c_t = fgd_attention(f_t, self.temperature)
        s_s, c_s = fgd_attention(f_s, self.temperature)
        weight = s_t.unsqueeze(1) * c_t.view(n, -1, 1, 1)
        sq = (f_s - f_t).pow(2) * weight
        return {
            "fg": (sq * fg.unsqueeze(1)).sum() / n,
            "bg": (sq * bg.unsqueeze(1)).sum() / n,
            "attn": ((c_s - c_t).abs().sum() + (s_s - s_t).abs().sum()) / n,
            "global": (self.student_blocks[name](f_s) - self.teacher_blocks[name](f_t))
            .pow(2).sum() / n,
        }

    def forward(self, inputs: DistillInputs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        boxes = [x.gt_boxes.tensor for x in inputs.gt_instances]
        sizes = inputs.image_sizes or [tuple(inputs.student_features[0].shape[-2:])] * len(boxes)
        totals = {k: inputs.student_features[0].new_zeros((), dtype=torch.float32)
                  for k in ("fg", "bg", "attn", "global")}
        diag = {}
        for name, f_s, f_t in zip(inputs.level_names, inputs.student_features,
                                  inputs.teacher_features):
            fg, bg = fgd_masks(boxes, sizes, *f_t.shape[-2:])
            terms = self.level_terms(name, f_s, f_t, fg, bg)
            for k, v in terms.items():
                totals[k] = totals[k] + v
                diag[f"fgd/{k}_{name}"] = v.detach()
        return {
            "loss_fgd_fg": self.alpha_fg * totals["fg"],
            "loss_fgd_bg": self.beta_bg * totals["bg"],
            "loss_fgd_attn": self.gamma_attn * totals["attn"],
            "loss_fgd_global": self.lambda_global * totals["global"],
        }, diag


register_method("FGD", ("FGD",))

__all__ = ["FGD", "ContextBlock", "fgd_attention", "fgd_masks"]
