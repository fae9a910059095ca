"""The paper's motivating measurement (docs/METHOD.md, "Harmony analysis") for any
RetinaNet-type detector.

Over every anchor's raw prediction (before the score threshold and NMS) whose decoded box has
IoU >= ``iou_thresh`` with some GT: take the GT it overlaps most, ``s`` = the prediction's score
for that GT's class, and report the share with ``|s - IoU| <= delta`` (harmonious predictions)
and the Spearman correlation of score and IoU.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.modeling.meta_arch.fcos import FCOS as StockFCOS
from detectron2.structures import Boxes, pairwise_iou
from tqdm import tqdm

from ..distillers.quality import harmony_score
from ..distillers.registry import DistillInputs
from ..modeling.taps import batch_taps

logger = logging.getLogger(__name__)


@dataclass
class HarmonyStats:
    """Summary of the score-IoU agreement; undefined values are None (JSON null)."""

    num_predictions: int
    harmonious_proportion: float | None
    score_iou_spearman: float | None
    mean_score: float | None
    mean_iou: float | None
    delta: float
    iou_thresh: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _check_dense(model) -> RetinaNet:
    if not isinstance(model, (RetinaNet, StockFCOS)):
        raise TypeError(
            f"Harmony analysis needs a dense detector (RetinaNet or FCOS); got "
            f"{type(model).__name__}."
        )
    return model


@torch.no_grad()
def dense_predictions(model: RetinaNet, batched_inputs: list[dict]):
    """Per-anchor scores [N, R, K] and boxes [N, R, 4] (input-image coordinates), plus anchors.

    The scores are those the model ranks its boxes by: sigmoid of the logits for RetinaNet,
    ``sqrt(p * sigmoid(centerness))`` for FCOS (as HD's s, docs/METHOD.md)."""
    _check_dense(model)
    taps = batch_taps(model, batched_inputs)
    feats, logits, deltas = taps.features, taps.logits, taps.deltas
    anchors = model.anchor_generator(feats)
    probs = DistillInputs.flatten_levels(logits, model.num_classes).float().sigmoid()
    if taps.centerness is not None:
        ctr = DistillInputs.flatten_levels(taps.centerness, 1).float().sigmoid()
        probs = (probs * ctr).sqrt()
    d = DistillInputs.flatten_levels(deltas, 4).float()
    n = d.shape[0]
    a = Boxes.cat(anchors).tensor.unsqueeze(0).expand(n, -1, -1)
    boxes = model.box2box_transform.apply_deltas(d.reshape(-1, 4), a.reshape(-1, 4)).view(n, -1, 4)
    shapes = [(f.shape[-2], f.shape[-1]) for f in feats]
    return probs, boxes, [len(x) for x in anchors], shapes


def _gt(inp: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """GT boxes (in the model-input frame, as DatasetMapper writes them) and classes."""
    if "instances" not in inp:
        raise KeyError("Harmony analysis needs GT 'instances' in its inputs: use "
                       "tbd.analysis.harmony.build_analysis_loader (a test loader drops them).")
    inst = inp["instances"].to(device)
    return inst.gt_boxes.tensor, inst.gt_classes


@torch.no_grad()
def collect_score_iou(model: RetinaNet, batched_inputs: list[dict], iou_thresh: float = 0.5
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(score, IoU) of every anchor prediction with IoU >= iou_thresh to some GT of its image."""
    probs, boxes, _, _ = dense_predictions(model, batched_inputs)
    scores, ious = [], []
    for n, inp in enumerate(batched_inputs):
        gt_boxes, gt_classes = _gt(inp, boxes.device)
        if len(gt_boxes) == 0:
            continue
        iou = pairwise_iou(Boxes(boxes[n]), Boxes(gt_boxes))  # [R, M]
        best, j = iou.max(dim=1)
        keep = best >= iou_thresh
        s = probs[n].gather(1, gt_classes[j].unsqueeze(1)).squeeze(1)
        scores.append(s[keep].cpu())
        ious.append(best[keep].cpu())
    if not scores:
        return np.zeros(0), np.zeros(0)
    return torch.cat(scores).numpy(), torch.cat(ious).numpy()


def summarize(scores: np.ndarray, ious: np.ndarray, delta: float = 0.2,
              iou_thresh: float = 0.5) -> HarmonyStats:
    """Harmonious proportion and Spearman correlation; None where undefined."""
    n = int(len(scores))
    spearman = None
    if n >= 3 and np.ptp(scores) > 0 and np.ptp(ious) > 0:
        from scipy.stats import spearmanr

        spearman = float(spearmanr(scores, ious).statistic)
    return HarmonyStats(
        num_predictions=n,
        harmonious_proportion=float(np.mean(np.abs(scores - ious) <= delta)) if n else None,
        score_iou_spearman=spearman,
        mean_score=float(scores.mean()) if n else None,
        mean_iou=float(ious.mean()) if n else None,
        delta=delta,
        iou_thresh=iou_thresh,
    )


@torch.no_grad()
def harmony_maps(model: RetinaNet, batched_inputs: list[dict], form: str = "harmony"
                 ) -> list[list[torch.Tensor]]:
    """Per image, per level: the model's own HS, max over anchors per location [H, W].

    HS uses the model's own score for the best-overlapping GT's class (s) and its IoU (u), on
    anchors whose box overlaps some GT; 0 elsewhere.
    """
    probs, boxes, per_level, shapes = dense_predictions(model, batched_inputs)
    out = []
    for n, inp in enumerate(batched_inputs):
        gt_boxes, gt_classes = _gt(inp, boxes.device)
        r = boxes.shape[1]
        if len(gt_boxes):
            iou = pairwise_iou(Boxes(boxes[n]), Boxes(gt_boxes))
            u, j = iou.max(dim=1)
            s = probs[n].gather(1, gt_classes[j].unsqueeze(1)).squeeze(1)
        else:
            u = s = torch.zeros(r, device=boxes.device)
        fg = (u > 0).unsqueeze(0)
        hs = harmony_score(s.unsqueeze(0), u.unsqueeze(0), fg, form,
                           group=torch.zeros_like(fg, dtype=torch.long))[0]
        maps = [x.view(h, w, -1).amax(dim=-1).cpu()
                for x, (h, w) in zip(hs.split(per_level), shapes)]
        out.append(maps)
    return out


def build_analysis_loader(cfg, dataset_name: str):
    """A test-style loader (resize only, batch 1, dataset order) that keeps GT instances."""
    from detectron2.data import DatasetMapper, build_detection_test_loader
    from detectron2.data import transforms as T

    mapper = DatasetMapper(
        is_train=True,  # keeps annotations; augmentations below are the test ones (no flip)
        augmentations=[T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)],
        image_format=cfg.INPUT.FORMAT,
    )
    return build_detection_test_loader(cfg, dataset_name, mapper=mapper)


def analyze_harmony(model: RetinaNet, data_loader, output_dir: str | Path | None = None,
                    delta: float = 0.2, iou_thresh: float = 0.5, max_images: int | None = None,
                    num_heatmaps: int = 4) -> HarmonyStats:
    """Run the analysis over a test loader; write harmony.json and PNG plots if output_dir."""
    model = _check_dense(model)
    was_training = model.training
    model.eval()
    scores, ious, heat_inputs = [], [], []
    seen = 0
    try:
        total = min(len(data_loader), max_images) if max_images else len(data_loader)
        for batch in tqdm(data_loader, desc="Harmony analysis", unit="batch", total=total,
                          disable=None):
            s, i = collect_score_iou(model, batch, iou_thresh)
            scores.append(s)
            ious.append(i)
            if len(heat_inputs) < num_heatmaps:
                heat_inputs.extend(batch[: num_heatmaps - len(heat_inputs)])
            seen += len(batch)
            if max_images and seen >= max_images:
                break
    finally:
        model.train(was_training)
    scores_a = np.concatenate(scores) if scores else np.zeros(0)
    ious_a = np.concatenate(ious) if ious else np.zeros(0)
    stats = summarize(scores_a, ious_a, delta, iou_thresh)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "harmony.json").write_text(stats.to_json())
        _plot_scatter(scores_a, ious_a, stats, out / "score_iou_scatter.png")
        if heat_inputs:
            _plot_heatmaps(model, heat_inputs, out / "hs_heatmaps.png")
    return stats


def _plot_scatter(scores, ious, stats: HarmonyStats, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(ious, scores, s=2, alpha=0.3)
    ax.plot([stats.iou_thresh, 1], [stats.iou_thresh, 1], "k--", lw=0.8)
    ax.set_xlabel("IoU with best GT")
    ax.set_ylabel("score for that GT's class")
    ax.set_xlim(stats.iou_thresh, 1)
    ax.set_ylim(0, 1)
    hp = stats.harmonious_proportion
    rho = stats.score_iou_spearman
    ax.set_title(f"harmonious {hp if hp is None else round(hp, 3)}, "
                 f"spearman {rho if rho is None else round(rho, 3)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_heatmaps(model: RetinaNet, inputs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = harmony_maps(model, inputs)
    fig, axes = plt.subplots(2, len(inputs), figsize=(2.5 * len(inputs), 5), squeeze=False)
    for k, (inp, m) in enumerate(zip(inputs, maps)):
        img = inp["image"].permute(1, 2, 0).numpy()
        if getattr(model, "input_format", "BGR") == "BGR":
            img = img[:, :, ::-1]
        axes[0, k].imshow(np.clip(img / 255.0, 0, 1))
        for b in inp["instances"].gt_boxes.tensor.tolist():
            axes[0, k].add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1],
                                               fill=False, color="lime", lw=1))
        axes[1, k].imshow(m[0].numpy(), vmin=0, vmax=1, cmap="magma")
        axes[0, k].axis("off")
        axes[1, k].axis("off")
    axes[1, 0].set_title("own HS, finest level", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
