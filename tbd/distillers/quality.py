"""Teacher qualities (s, u) and the Harmony Score forms (docs/METHOD.md, "Harmony Score") [ours].

All functions are pure tensor code: no Python loops over anchors or boxes.
"""

from __future__ import annotations

import torch
from detectron2.structures import Boxes, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from torch import Tensor

HS_FORMS = ("harmony", "aligned", "consistency")


def teacher_cls_quality(probs: Tensor, gt_labels: Tensor, num_classes: int) -> Tensor:
    """s_i = p_T[i, c_j(i)] on foreground anchors, 0 elsewhere. probs [N, R, K], labels [N, R]."""
    fg = (gt_labels >= 0) & (gt_labels != num_classes)
    idx = gt_labels.clamp(0, num_classes - 1).unsqueeze(-1)
    s = probs.gather(-1, idx).squeeze(-1)
    return torch.where(fg, s, torch.zeros_like(s))


def teacher_loc_quality(
    boxes: Tensor, gt_instances: list[Instances], matched_idxs: Tensor, fg: Tensor
) -> Tensor:
    """u_i = IoU(b_T[i], g_j(i)) on foreground anchors, 0 elsewhere. boxes [N, R, 4]."""
    n, r, _ = boxes.shape
    max_gt = max([len(x) for x in gt_instances] + [1])
    gt = boxes.new_zeros((n, max_gt, 4))  # padded GT boxes, one row of zeros if none
    for i, inst in enumerate(gt_instances):
        if len(inst) > 0:
            gt[i, : len(inst)] = inst.gt_boxes.tensor.to(gt)
    idx = matched_idxs.clamp(min=0, max=max_gt - 1).unsqueeze(-1).expand(-1, -1, 4)
    matched = gt.gather(1, idx)
    u = elementwise_iou(boxes.reshape(-1, 4), matched.reshape(-1, 4)).view(n, r)
    return torch.where(fg, u, torch.zeros_like(u))


def elementwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matched box pairs [M, 4] x [M, 4] (XYXY) with Detectron2's op; 0 for empty unions."""
    return torch.nan_to_num(matched_pairwise_iou(Boxes(a), Boxes(b)), nan=0.0).clamp(min=0.0)


def harmony_score(
    s: Tensor,
    u: Tensor,
    fg: Tensor,
    form: str,
    *,
    group: Tensor | None = None,
    num_groups: int | None = None,
    alpha: float = 1.0,
    beta: float = 2.0,
) -> Tensor:
    """Harmony Score per anchor, 0 off foreground; detached (it is a weight, never a gradient).

    Args:
        s, u: [N, R] teacher classification and localisation qualities.
        fg: [N, R] bool, foreground anchors.
        form: "harmony" (s^u * u^s, 0 if s or u is 0), "aligned" (s^alpha * u^beta rescaled per
            GT so its best anchor gets that GT's best u), or "consistency" ((1-|s-u|) max(s, u)).
        group: [N, R] matched-GT index; required by "aligned" (per image, per GT).
        num_groups: an upper bound on the GT count per image (avoids a device sync if given).
    """
    s = s.detach().float()
    u = u.detach().float()
    zero = torch.zeros_like(s)
    if form == "harmony":
        pos = (s > 0) & (u > 0)
        tiny = torch.finfo(s.dtype).tiny
        val = torch.exp(u * torch.log(s.clamp_min(tiny)) + s * torch.log(u.clamp_min(tiny)))
        hs = torch.where(pos, val, zero)
    elif form == "consistency":
        hs = (1.0 - (s - u).abs()) * torch.maximum(s, u)
    elif form == "aligned":
        if group is None:
            raise ValueError("harmony_score(form='aligned') needs the matched-GT index `group`.")
        t = torch.where(fg, s.pow(alpha) * u.pow(beta), zero)
        n, r = s.shape
        num_gt = num_groups if num_groups else (int(group.max().item()) + 1 if group.numel() else 1)
        num_gt = max(num_gt, 1)
        key = (torch.arange(n, device=s.device).unsqueeze(1) * num_gt + group.clamp(min=0))
        key = torch.where(fg, key, torch.zeros_like(key)).view(-1)
        size = n * num_gt
        max_t = zero.new_zeros(size).scatter_reduce(
            0, key, torch.where(fg, t, zero).view(-1), reduce="amax", include_self=True
        )
        max_u = zero.new_zeros(size).scatter_reduce(
            0, key, torch.where(fg, u, zero).view(-1), reduce="amax", include_self=True
        )
        hs = (t.view(-1) * max_u[key] / (max_t[key] + 1e-9)).view(n, r)
    else:
        raise ValueError(f"Unknown Harmony Score form {form!r}.")
    return torch.where(fg, hs, zero)
