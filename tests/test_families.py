"""FCOS students and teachers, Faster R-CNN teachers, and the per-distiller pair capabilities.

Every (student family, teacher family, distiller) combination either trains one step on tiny
models or is refused when the model is built, naming the distiller and the pairs it supports.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.fcos import FCOS as StockFCOS
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import tbd
from tbd.config import ConfigError
from tbd.distillers.registry import (
    DistillInputs,
    family_supports,
    registered_distillers,
    supported_pairs,
)
from tbd.modeling.fcos import matched_gt_indices
from tbd.modeling.teacher import TeacherError

from .conftest import make_batch, save_weights, tiny_retinanet_cfg, write_cfg
from .test_train_net import _run, _tiny_train_cfg

ALL_PAIRS = ["RetinaNet -> RetinaNet", "FCOS -> RetinaNet", "GeneralizedRCNN -> RetinaNet",
             "RetinaNet -> FCOS", "FCOS -> FCOS", "GeneralizedRCNN -> FCOS"]
# Written out by hand from each distiller's needs (docs/METHOD.md, "Supported pairs").
EXPECTED_PAIRS = {
    "HD": ["RetinaNet -> RetinaNet", "FCOS -> FCOS"],
    "CrossKD": ["RetinaNet -> RetinaNet", "FCOS -> FCOS"],
    "CrossHD": ["RetinaNet -> RetinaNet", "FCOS -> FCOS"],
    "FRS": ["RetinaNet -> RetinaNet", "FCOS -> FCOS"],
    "TFD": ["RetinaNet -> RetinaNet", "FCOS -> RetinaNet", "RetinaNet -> FCOS", "FCOS -> FCOS"],
    "FGD": ALL_PAIRS,
    "PKD": ALL_PAIRS,
    "MGD": ALL_PAIRS,
}
STUDENTS = {"RetinaNet": "DistillMetaArch", "FCOS": "DistillFCOS"}
TEACHERS = ("RetinaNet", "FCOS", "GeneralizedRCNN")


def tiny_fcos_cfg(fpn_channels: int = 16, num_convs: int = 1):
    cfg = tiny_retinanet_cfg(fpn_channels, num_convs)
    cfg.MODEL.META_ARCHITECTURE = "FCOS"
    cfg.MODEL.FCOS.NUM_CLASSES = 5
    cfg.MODEL.FCOS.NUM_CONVS = num_convs
    return cfg


def tiny_rcnn_cfg():
    """A tiny Faster R-CNN with an FPN (p2-p6), R18."""
    cfg = tiny_retinanet_cfg(32, 2)
    m = cfg.MODEL
    m.META_ARCHITECTURE = "GeneralizedRCNN"
    m.BACKBONE.NAME = "build_resnet_fpn_backbone"
    m.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    m.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    m.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    m.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    m.RPN.BATCH_SIZE_PER_IMAGE = 32
    m.ROI_HEADS.NAME = "StandardROIHeads"
    m.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    m.ROI_HEADS.NUM_CLASSES = 5
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    m.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    m.ROI_BOX_HEAD.NUM_FC = 1
    m.ROI_BOX_HEAD.FC_DIM = 32
    return cfg


def teacher_cfg(family: str):
    return {"RetinaNet": lambda: tiny_retinanet_cfg(32, 2), "FCOS": lambda: tiny_fcos_cfg(32, 2),
            "GeneralizedRCNN": tiny_rcnn_cfg}[family]()


def pair_cfg(tmp_path, student: str, teacher: str, losses):
    cfg = tiny_fcos_cfg() if student == "FCOS" else tiny_retinanet_cfg()
    cfg.MODEL.META_ARCHITECTURE = STUDENTS[student]
    cfg.MODEL.DISTILL.LOSSES = list(losses)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = write_cfg(teacher_cfg(teacher), tmp_path / "t.yaml")
    cfg.MODEL.DISTILL.TEACHER.ALLOW_RANDOM_INIT = True
    cfg.MODEL.DISTILL.TEACHER.EVAL_BEFORE_TRAIN = False
    cfg.MODEL.DISTILL.WARMUP_ITERS = 0
    cfg.MODEL.DISTILL.CROSSKD.TEACHER_INDEX = 1  # the tiny teachers have 2 head convs
    cfg.MODEL.DISTILL.CROSS_HD.TEACHER_INDEX = 1
    if teacher == "GeneralizedRCNN":  # its FPN has no p7 (stride 128)
        cfg.MODEL.DISTILL.LEVELS = ["p3", "p4", "p5", "p6"]
    return cfg


def test_supported_pairs_follow_the_needs():
    for name, cls in registered_distillers().items():
        assert supported_pairs(cls.needs) == EXPECTED_PAIRS[name], name


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("student", sorted(STUDENTS))
def test_every_pair_and_distiller_steps_or_is_refused(tmp_path, student, teacher):
    batch = make_batch(2)
    for name, cls in registered_distillers().items():
        cfg = pair_cfg(tmp_path, student, teacher, [name])
        if not family_supports(cls.needs, student, teacher):
            with pytest.raises(TeacherError) as err:
                build_model(cfg)
            msg = str(err.value)
            assert msg.startswith(f"{name} cannot distil a {teacher} teacher into a {student}")
            assert ", ".join(EXPECTED_PAIRS[name]) in msg
            continue
        model = build_model(cfg)
        model.train()
        with EventStorage(0):
            losses = model(batch)
        keys = set(cls.loss_keys)
        assert keys <= set(losses), (name, sorted(losses))
        total = sum(losses.values())
        assert math.isfinite(total.item()), (name, losses)
        total.backward()
        adapters = [p for p in model.distillers.parameters()]
        assert all(p.grad is not None for p in adapters), name  # every adapter takes part


def test_levels_are_paired_by_stride_with_clear_errors(tmp_path):
    cfg = pair_cfg(tmp_path, "RetinaNet", "GeneralizedRCNN", ["PKD"])
    cfg.MODEL.DISTILL.LEVELS = []
    with pytest.raises(TeacherError, match=r"FPN level p7 \(stride 128\) of the student has no "
                       r"teacher level of that stride.*MODEL\.DISTILL\.LEVELS.*'p6'\]"):
        build_model(cfg)
    cfg.MODEL.DISTILL.LEVELS = ["p3", "p9"]
    with pytest.raises(ConfigError, match=r"MODEL\.DISTILL\.LEVELS has \['p9'\]"):
        build_model(cfg)
    cfg = pair_cfg(tmp_path, "RetinaNet", "RetinaNet", ["TFD"])
    cfg.MODEL.DISTILL.LEVELS = ["p3", "p4"]
    with pytest.raises(ConfigError, match=r"leaves out head levels, but \['TFD'\]"):
        build_model(cfg)
    # a subset with feature distillers only: the teacher's p4 (stride 16) pairs with p4
    cfg = pair_cfg(tmp_path, "FCOS", "GeneralizedRCNN", ["MGD"])
    cfg.MODEL.DISTILL.LEVELS = ["p4", "p6"]
    model = build_model(cfg)
    assert model.distill_levels == ["p4", "p6"] and model.teacher_levels == ["p4", "p6"]
    assert not model.uses_teacher_head  # the R-CNN heads never run


def test_refused_pair_writes_nothing(tmp_path, tiny_datasets):
    cfg = _tiny_train_cfg(pair_cfg(tmp_path, "FCOS", "RetinaNet", ["HD"]), tiny_datasets,
                          tmp_path / "out", iters=2)
    with pytest.raises((SystemExit, TeacherError), match="HD cannot distil a RetinaNet teacher"):
        _run(cfg, tmp_path)
    assert not (tmp_path / "out").exists()


def _stock_fcos(model) -> StockFCOS:
    """Detectron2's own FCOS class around ``model``'s modules and settings."""
    return StockFCOS(
        backbone=model.backbone, head=model.head, head_in_features=model.head_in_features,
        num_classes=model.num_classes, center_sampling_radius=model.center_sampling_radius,
        focal_loss_alpha=model.focal_loss_alpha, focal_loss_gamma=model.focal_loss_gamma,
        test_score_thresh=model.test_score_thresh, pixel_mean=model.pixel_mean.tolist(),
        pixel_std=model.pixel_std.tolist())


def test_distill_fcos_detection_losses_are_stock(tmp_path):
    """Without distillers, and with TBD on, DistillFCOS's FCOS losses are stock FCOS's."""
    batch = make_batch(2, seed=3)
    for losses in ([], ["HD", "TFD"]):
        cfg = pair_cfg(tmp_path, "FCOS", "FCOS", losses)
        model = build_model(cfg).train()
        stock = _stock_fcos(model).train()
        with EventStorage(0):
            ours = model(batch)
            ref = stock(batch)
        assert set(ref) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
        for k in ref:
            assert torch.equal(ours[k], ref[k]), (losses, k)
        assert (set(ours) - set(ref)) == ({"loss_hd_cls", "loss_hd_reg", "loss_tfd"} if losses
                                          else set())


def test_fcos_images_without_boxes_are_background(tmp_path):
    model = build_model(tiny_fcos_cfg()).train()
    batch = make_batch(2, empty=(1,))
    with EventStorage(0):
        losses = model(batch)
    assert all(math.isfinite(v.item()) for v in losses.values())
    feats = [f for f in model.backbone(model.preprocess_image(batch).tensor).values()]
    anchors = model.anchor_generator(feats)
    labels, _ = model.label_anchors(anchors, [b["instances"] for b in batch])
    assert (labels[1] == model.num_classes).all() and (labels[0] < model.num_classes).any()


def test_matched_gt_indices_by_hand():
    """Two GTs: locations labelled with GT 1's box and class get index 1, background -1; two GTs
    with the same box but other classes are told apart by the class."""
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [20, 20, 40, 40]]))
    inst.gt_classes = torch.tensor([0, 1, 2])
    labels = torch.tensor([5, 1, 0, 2, 5])
    boxes = torch.tensor([[0.0, 0, 0, 0], [20, 20, 40, 40], [0, 0, 10, 10], [20, 20, 40, 40],
                          [0, 0, 10, 10]])
    idx = matched_gt_indices([labels], [Boxes(boxes)], [inst], background=5)
    assert idx.tolist() == [[-1, 1, 0, 2, -1]]
    empty = inst[:0]
    assert matched_gt_indices([labels], [boxes], [empty], 5).tolist() == [[-1] * 5]


def _fcos_inputs(logit: float, ctr: float) -> DistillInputs:
    k = 2
    z = torch.full((1, k, 1, 1), logit)
    inst = Instances((8, 8))
    inst.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 8.0, 8.0]]))
    inst.gt_classes = torch.tensor([1])
    return DistillInputs(
        level_names=["p3"], student_features=[], teacher_features=[], student_logits=[z],
        student_deltas=[torch.zeros(1, 4, 1, 1)], teacher_logits=[z],
        teacher_deltas=[torch.zeros(1, 4, 1, 1)],
        anchors=[Boxes(torch.tensor([[0.0, 0.0, 8.0, 8.0]]))], gt_labels=torch.tensor([[1]]),
        matched=torch.tensor([[0]]), gt_instances=[inst], num_classes=k,
        student_box2box=None, teacher_box2box=None,
        teacher_centerness=[torch.full((1, 1, 1, 1), ctr)])


def test_fcos_teacher_score_includes_centerness_by_hand():
    """s = sqrt(p * sigmoid(ctr)): p = 0.5, centerness 0.5 -> 0.5; centerness ~0 -> ~0, while
    the distillation targets stay the class probabilities."""
    x = _fcos_inputs(0.0, 0.0)
    assert x.teacher_scores[0, 0].tolist() == [0.5, 0.5]
    assert x.teacher_probs[0, 0].tolist() == [0.5, 0.5]
    low = _fcos_inputs(math.log(0.64 / 0.36), -math.log(3.0))  # p = 0.64, sigmoid(ctr) = 0.25
    assert low.teacher_scores[0, 0, 1].item() == pytest.approx(0.4, abs=1e-6)


def test_crosskd_on_fcos_normalises_by_centerness_targets(tmp_path):
    """Doubling the centerness targets halves both CrossKD terms (the official FCOS variant's
    normaliser is their sum over the positives)."""
    cfg = pair_cfg(tmp_path, "FCOS", "FCOS", ["CrossKD"])
    model = build_model(cfg)
    model.train()  # the student's head maps are recorded in training mode
    inputs = model.distill_inputs(make_batch(2, seed=5))
    assert inputs.centerness_targets is not None and inputs.fg_mask.any()
    one, _ = model.distillers["CrossKD"](inputs.float())
    doubled = inputs.float()
    doubled.centerness_targets = inputs.centerness_targets * 2
    two, _ = model.distillers["CrossKD"](doubled)
    for k in one:
        assert two[k].item() == pytest.approx(one[k].item() / 2, rel=1e-5), k


def _tool(name):
    return importlib.import_module(f"tbd_tools.{name}")


def test_fcos_release_loads_in_stock_detectron2_with_the_same_ap(tmp_path, tiny_datasets):
    """A briefly trained TBD FCOS student: --eval-only AP, export, then stock Detectron2 (its
    FCOS built from the release's LazyConfig, no project import needed) gives the same AP and
    the same detections."""
    cfg = _tiny_train_cfg(pair_cfg(tmp_path, "FCOS", "FCOS", ["HD", "TFD"]), tiny_datasets,
                          tmp_path / "out", iters=6)
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.DISTILL.TFD.WEIGHT = 1e-6
    # An untrained FCOS predicts box sides <= 0, which Detectron2 drops as empty boxes: start
    # from weights whose box sides are one stride (MODEL.WEIGHTS, as a zoo checkpoint would be).
    init = build_model(tiny_fcos_cfg())
    torch.nn.init.constant_(init.head.bbox_pred.bias, 1.0)
    cfg.MODEL.WEIGHTS = save_weights(init, tmp_path / "init.pth")
    res = _run(cfg, tmp_path)
    ckpt = tmp_path / "out" / "model_final.pth"
    assert math.isfinite(res["bbox"]["AP"])
    # --eval-only builds the stock FCOS alone (the teacher config made unreadable)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = str(tmp_path / "gone.yaml")
    cfg.OUTPUT_DIR = str(tmp_path / "eval")
    res2 = _run(cfg, tmp_path, "--eval-only", "MODEL.WEIGHTS", str(ckpt), name="eval.yaml")
    assert res2["bbox"]["AP"] == pytest.approx(res["bbox"]["AP"], abs=1e-9)
    out = tmp_path / "rel"
    assert _tool("export_student").main(["--config-file", str(tmp_path / "cfg.yaml"),
                                         "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    (release,) = out.glob("model_final_*.pth")
    stock_cfg = get_cfg()  # stock keys only
    stock_cfg.merge_from_file(str(out / f"{release.stem}_config.yaml"))
    assert "FCOS" not in stock_cfg.MODEL and "DISTILL" not in stock_cfg.MODEL
    lazy = out / f"{release.stem}_lazy.py"
    stock = instantiate(LazyConfig.load(str(lazy), "model"))
    assert type(stock) is StockFCOS
    DetectionCheckpointer(stock).load(str(release))
    ours = build_model(tbd.student_config(cfg))
    DetectionCheckpointer(ours).load(str(ckpt))
    stock.eval()
    ours.eval()
    batch = make_batch(2, seed=7)
    with torch.no_grad():
        a, b = stock(batch), ours(batch)
    for x, y in zip(a, b):
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)
        assert torch.equal(x["instances"].scores, y["instances"].scores)
    assert _tool("verify_release").main([str(release), "--tolerance", "0"]) == 0
    import json

    assert json.loads(release.with_suffix(".json").read_text())["AP"] == pytest.approx(
        res["bbox"]["AP"])


def test_harmony_analysis_of_fcos_uses_its_ranking_score():
    """A constant FCOS (class logit 0.4, centerness logit -1, box sides one stride): every score
    is sqrt(sigmoid(0.4) * sigmoid(-1)), the score its inference ranks by."""
    from tbd.analysis import collect_score_iou

    model = build_model(tiny_fcos_cfg())
    for m in (model.head.cls_score, model.head.bbox_pred, model.head.ctrness):
        torch.nn.init.zeros_(m.weight)
        torch.nn.init.zeros_(m.bias)
    torch.nn.init.constant_(model.head.cls_score.bias, 0.4)
    torch.nn.init.constant_(model.head.ctrness.bias, -1.0)
    torch.nn.init.constant_(model.head.bbox_pred.bias, 1.0)
    scores, ious = collect_score_iou(model.eval(), make_batch(2), iou_thresh=0.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert len(scores) > 0
    assert scores == pytest.approx(math.sqrt(sig(0.4) * sig(-1.0)), abs=1e-6)
