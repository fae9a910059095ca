"""Harmony analysis: statistics by hand, dense predictions of a crafted model, the CLI tool."""

import json
import math

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, pairwise_iou

from tbd.analysis import collect_score_iou, harmony_maps, summarize

from .conftest import make_batch, save_weights, tiny_retinanet_cfg, write_cfg


def test_summarize_hand_computed():
    stats = summarize(np.array([0.9, 0.5, 0.6]), np.array([0.8, 0.9, 0.6]), delta=0.2)
    assert stats.num_predictions == 3
    assert stats.harmonious_proportion == pytest.approx(2 / 3)  # |d| = 0.1, 0.4, 0.0
    # ranks: scores (3, 1, 2), IoUs (2, 3, 1): rho = 1 - 6 * 6 / (3 * 8) = -0.5
    assert stats.score_iou_spearman == pytest.approx(-0.5)


def test_summarize_undefined_values_are_none():
    stats = summarize(np.zeros(0), np.zeros(0))
    assert stats.harmonious_proportion is None and stats.score_iou_spearman is None
    assert json.loads(stats.to_json())["score_iou_spearman"] is None


def _constant_model(bias: float):
    """Tiny RetinaNet predicting score sigmoid(bias) everywhere and boxes = anchors."""
    model = build_model(tiny_retinanet_cfg())
    for m in (model.head.cls_score, model.head.bbox_pred):
        torch.nn.init.zeros_(m.weight)
        torch.nn.init.zeros_(m.bias)
    torch.nn.init.constant_(model.head.cls_score.bias, bias)
    return model.eval()


def test_collect_score_iou_on_crafted_model():
    model = _constant_model(bias=0.4)
    batch = make_batch(num_images=2, empty=(1,))
    scores, ious = collect_score_iou(model, batch, iou_thresh=0.5)
    with torch.no_grad():
        feats = model.backbone(model.preprocess_image(batch).tensor)
        anchors = Boxes.cat(model.anchor_generator([feats[f] for f in model.head_in_features]))
    best = pairwise_iou(anchors, batch[0]["instances"].gt_boxes).max(dim=1).values
    expected = np.sort(best[best >= 0.5].numpy())
    assert len(expected) > 0
    assert np.allclose(np.sort(ious), expected, atol=1e-6)
    assert np.allclose(scores, 1 / (1 + math.exp(-0.4)))


def test_harmony_maps_shapes_and_range():
    model = _constant_model(bias=2.0)
    maps = harmony_maps(model, make_batch(num_images=1))
    assert len(maps[0]) == 5  # p3..p7
    assert maps[0][0].shape == (8, 8)  # 64 px / stride 8
    assert float(maps[0][0].max()) > 0 and float(maps[0][0].max()) <= 1


def test_non_dense_model_rejected():
    with pytest.raises(TypeError, match=r"dense detector \(RetinaNet or FCOS\)"):
        collect_score_iou(torch.nn.Linear(1, 1), [])


def test_analyze_harmony_tool(tmp_path, tiny_datasets):
    cfg = tiny_retinanet_cfg()
    cfg.DATASETS.TEST = (tiny_datasets[1],)
    weights = save_weights(_constant_model(bias=0.0), tmp_path / "m.pth")
    from tbd_tools import analyze_harmony as tool

    out = tmp_path / "harmony"
    tool.main(["--config-file", write_cfg(cfg, tmp_path / "c.yaml"), "--output", str(out),
               "MODEL.WEIGHTS", weights])
    stats = json.loads((out / "harmony.json").read_text())
    assert stats["num_predictions"] > 0 and 0 <= stats["harmonious_proportion"] <= 1
    assert (out / "score_iou_scatter.png").stat().st_size > 0
    assert (out / "hs_heatmaps.png").stat().st_size > 0


def test_visualize_tool(tmp_path, tiny_datasets):
    from .conftest import tiny_distill_cfg

    cfg = tiny_distill_cfg(tmp_path)
    cfg.DATASETS.TEST = (tiny_datasets[1],)
    from tbd_tools import visualize as tool

    out = tmp_path / "vis"
    assert tool.main(["--config-file", write_cfg(cfg, tmp_path / "d.yaml"), "--output", str(out),
                      "--num-images", "2", "--score-thresh", "0.0"]) == 0
    pngs = sorted(out.glob("vis_*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 0 for p in pngs)
