"""Bad input through projects/TBD/train_net.py: a clear error naming the key or file, and nothing
written (OUTPUT_DIR is not created). Also: images without boxes train; non-finite losses are named.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

from tbd.data import SHAPE_CLASSES, DataError, check_dataset
from tbd.data.loader import box_stats

from .conftest import make_batch, make_teacher, tiny_distill_cfg, write_cfg
from .helpers import run_main


def _register(name: str, records: list[dict], classes=SHAPE_CLASSES) -> str:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [dict(r) for r in records])
    MetadataCatalog.get(name).set(thing_classes=list(classes))
    return name


def _records(tiny_datasets, boxes_per_image) -> list[dict]:
    """The tiny train images with the given XYWH boxes (a list per image) instead of theirs."""
    base = DatasetCatalog.get(tiny_datasets[0])
    out = []
    for rec, boxes in zip(base, boxes_per_image):
        anns = [{"bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0} for b in boxes]
        out.append({**rec, "annotations": anns})
    return out


def _cfg(tmp_path, tiny_datasets, teacher_weights):
    cfg = tiny_distill_cfg(tmp_path, teacher_weights=teacher_weights)
    cfg.DATASETS.TRAIN = (tiny_datasets[0],)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.MAX_ITER = 2
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    return cfg


def _zero_annotations(cfg, tmp_path, tiny_datasets):
    cfg.DATASETS.TRAIN = (_register("tbd_test_zero_ann", _records(tiny_datasets, [[]] * 4)),)


def _no_valid_box(cfg, tmp_path, tiny_datasets):
    outside = [[[70.0, 70.0, 5.0, 5.0]], [[-20.0, 3.0, 10.0, 10.0]], [[5.0, 5.0, 0.0, 9.0]]]
    cfg.DATASETS.TRAIN = (_register("tbd_test_no_valid", _records(tiny_datasets, outside)),)


def _teacher_without_p7(cfg, tmp_path, tiny_datasets):
    """A teacher (with its own matching weights) whose head uses p3-p6 only."""
    (tmp_path / "t4").mkdir()
    sizes = str([list(x) for x in cfg.MODEL.ANCHOR_GENERATOR.SIZES[:4]])
    c, w, _ = make_teacher(tmp_path / "t4", **{
        "MODEL.RETINANET.IN_FEATURES": "['p3', 'p4', 'p5', 'p6']",
        "MODEL.ANCHOR_GENERATOR.SIZES": sizes})
    cfg.MODEL.DISTILL.TEACHER.CONFIG, cfg.MODEL.DISTILL.TEACHER.WEIGHTS = c, w


def _more_classes_than_the_head(cfg, tmp_path, tiny_datasets):
    recs = _records(tiny_datasets, [[[4.0, 4.0, 20.0, 20.0]]] * 3)
    recs[0]["annotations"][0]["category_id"] = 5  # a sixth class; the head has 5
    cfg.DATASETS.TRAIN = (_register("tbd_test_six", recs, list(SHAPE_CLASSES) + ["hexagon"]),)


def _train_sets_disagree(cfg, tmp_path, tiny_datasets):
    other = _register("tbd_test_other_classes", DatasetCatalog.get(tiny_datasets[0]), "vwxyz")
    cfg.DATASETS.TRAIN = (tiny_datasets[0], other)


def _test_set_other_classes(cfg, tmp_path, tiny_datasets):
    other = list(SHAPE_CLASSES[:-1]) + ["hexagon"]
    cfg.DATASETS.TEST = (_register("tbd_test_val_other", DatasetCatalog.get(tiny_datasets[1]),
                                   other),)


def _test_set_empty(cfg, tmp_path, tiny_datasets):
    cfg.DATASETS.TEST = (_register("tbd_test_val_empty", []),)


def _all_boxes_nan(cfg, tmp_path, tiny_datasets):
    nan = float("nan")
    recs = _records(tiny_datasets, [[[nan, 4.0, 20.0, 20.0]], [[4.0, 4.0, nan, nan]]])
    cfg.DATASETS.TRAIN = (_register("tbd_test_nan_boxes", recs),)


def _image_missing(cfg, tmp_path, tiny_datasets):
    recs = _records(tiny_datasets, [[[4.0, 4.0, 20.0, 20.0]]] * 3)
    recs[1]["file_name"] = str(tmp_path / "no_such_image.png")
    cfg.DATASETS.TRAIN = (_register("tbd_test_missing_image", recs),)


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


CASES = {
    # case: (edit of cfg, expected words in the message)
    "teacher_config_missing": (
        lambda c, t, d: setattr(c.MODEL.DISTILL.TEACHER, "CONFIG", str(t / "gone.yaml")),
        "MODEL.DISTILL.TEACHER.CONFIG"),
    "teacher_config_unreadable": (
        lambda c, t, d: (t.joinpath("bad.yaml").write_text("MODEL: [unclosed\n"),
                         setattr(c.MODEL.DISTILL.TEACHER, "CONFIG", str(t / "bad.yaml"))),
        "MODEL.DISTILL.TEACHER.CONFIG"),
    "teacher_weights_missing": (
        lambda c, t, d: setattr(c.MODEL.DISTILL.TEACHER, "WEIGHTS", str(t / "none.pth")),
        "MODEL.DISTILL.TEACHER.WEIGHTS"),
    "teacher_weights_truncated": (
        lambda c, t, d: _truncate(c.MODEL.DISTILL.TEACHER.WEIGHTS),
        "MODEL.DISTILL.TEACHER.WEIGHTS"),
    "teacher_weights_other_arch": (
        lambda c, t, d: c.MODEL.DISTILL.TEACHER.OPTS.extend(["MODEL.FPN.OUT_CHANNELS", "48"]),
        "MODEL.DISTILL.TEACHER.WEIGHTS"),
    "num_classes_differ": (
        lambda c, t, d: setattr(c.MODEL.RETINANET, "NUM_CLASSES", 7), "NUM_CLASSES"),
    "anchors_differ_with_hd": (
        lambda c, t, d: setattr(c.MODEL.ANCHOR_GENERATOR, "ASPECT_RATIOS", [[1.0]]),
        "MODEL.ANCHOR_GENERATOR"),
    "fpn_level_missing": (_teacher_without_p7, "MODEL.RETINANET.IN_FEATURES"),
    "hs_form_unknown": (
        lambda c, t, d: setattr(c.MODEL.DISTILL.HS, "FORM", "harmonic"), "MODEL.DISTILL.HS.FORM"),
    "balance_mode_unknown": (
        lambda c, t, d: setattr(c.MODEL.DISTILL.TFD, "BALANCE_MODE", "auto"),
        "MODEL.DISTILL.TFD.BALANCE_MODE"),
    "weight_negative": (
        lambda c, t, d: setattr(c.MODEL.DISTILL.HD, "CLS_WEIGHT", -1.0),
        "MODEL.DISTILL.HD.CLS_WEIGHT"),
    "weight_nan": (
        lambda c, t, d: setattr(c.MODEL.DISTILL.TFD, "WEIGHT", float("nan")),
        "MODEL.DISTILL.TFD.WEIGHT"),
    "dataset_zero_annotations": (_zero_annotations, "tbd_test_zero_ann"),
    "dataset_no_valid_box": (_no_valid_box, "tbd_test_no_valid"),
    "student_weights_truncated": (
        lambda c, t, d: (_truncate(c.MODEL.DISTILL.TEACHER.WEIGHTS),
                         setattr(c.MODEL, "WEIGHTS", c.MODEL.DISTILL.TEACHER.WEIGHTS)),
        "MODEL.WEIGHTS"),
    "amp_on_cpu": (
        lambda c, t, d: setattr(c.SOLVER.AMP, "ENABLED", True), "SOLVER.AMP.ENABLED"),
    "dataset_more_classes_than_head": (
        _more_classes_than_the_head, "MODEL.RETINANET.NUM_CLASSES=5, but the training data has 6"),
    "train_datasets_disagree": (_train_sets_disagree, "different thing_classes"),
    "test_set_other_classes": (_test_set_other_classes, "DATASETS.TEST: dataset 'tbd_test_val_"),
    "test_set_empty": (_test_set_empty, "'tbd_test_val_empty' has no images"),
    "all_boxes_nan": (_all_boxes_nan, "no valid box"),
    "image_file_missing": (_image_missing, "no_such_image.png (missing)"),
    "warmup_below_minus_one": (
        lambda c, t, d: setattr(c.MODEL.DISTILL, "WARMUP_ITERS", -5), "MODEL.DISTILL.WARMUP_ITERS"),
    "log_period_negative": (
        lambda c, t, d: setattr(c.MODEL.DISTILL, "LOG_PERIOD", -1), "MODEL.DISTILL.LOG_PERIOD"),
    "checkpoint_period_zero": (
        lambda c, t, d: setattr(c.SOLVER, "CHECKPOINT_PERIOD", 0), "SOLVER.CHECKPOINT_PERIOD"),
    "max_iter_zero": (lambda c, t, d: setattr(c.SOLVER, "MAX_ITER", 0), "SOLVER.MAX_ITER"),
    "ims_per_batch_zero": (
        lambda c, t, d: setattr(c.SOLVER, "IMS_PER_BATCH", 0), "SOLVER.IMS_PER_BATCH"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_named_and_nothing_written(case, tmp_path, tiny_datasets):
    _, weights, _ = make_teacher(tmp_path)
    cfg = _cfg(tmp_path, tiny_datasets, weights)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = str(tmp_path / "t.yaml")
    edit, words = CASES[case]
    edit(cfg, tmp_path, tiny_datasets)
    args = default_argument_parser().parse_args(
        ["--config-file", write_cfg(cfg, tmp_path / "cfg.yaml")])
    with pytest.raises((SystemExit, ValueError)) as err:
        run_main(args)
    assert words in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_nan_boxes_are_counted_as_dropped():
    nan = float("nan")
    rec = {"height": 10, "width": 20, "annotations": [
        {"bbox": [2, 2, 5, 5], "bbox_mode": BoxMode.XYWH_ABS},
        {"bbox": [nan, 2, 5, 5], "bbox_mode": BoxMode.XYWH_ABS},
        {"bbox": [1, 1, float("inf"), 5], "bbox_mode": BoxMode.XYXY_ABS},
    ]}
    st = box_stats([rec])
    assert (st.annotations, st.dropped, st.nonfinite, st.valid) == (3, 2, 2, 1)


def test_box_stats_clipping_and_dropping():
    rec = {"height": 10, "width": 20, "annotations": [
        {"bbox": [2, 2, 5, 5], "bbox_mode": BoxMode.XYWH_ABS},  # inside
        {"bbox": [15, 2, 10, 4], "bbox_mode": BoxMode.XYWH_ABS},  # clipped to x1 = 20
        {"bbox": [25, 2, 4, 4], "bbox_mode": BoxMode.XYWH_ABS},  # outside: dropped
        {"bbox": [3, 3, 3, 3], "bbox_mode": BoxMode.XYXY_ABS},  # zero width: dropped
        {"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": 1},
    ]}
    st = box_stats([rec])
    assert (st.annotations, st.crowd, st.clipped, st.dropped, st.valid) == (4, 1, 1, 2, 2)
    assert check_dataset("x", [rec]).valid == 2
    with pytest.raises(DataError, match="no images"):
        check_dataset("x", [])


def test_images_without_boxes_train(tmp_path, tiny_datasets):
    """Half the images have no box, one box is clipped and one dropped: training runs, losses are
    finite, and the clipped/dropped counts are logged."""
    boxes = [[], [[50.0, 50.0, 30.0, 30.0], [70.0, 1.0, 4.0, 4.0]], [], [[4.0, 4.0, 20.0, 20.0]]]
    name = _register("tbd_test_some_empty", _records(tiny_datasets, boxes))
    _, weights, _ = make_teacher(tmp_path)
    cfg = _cfg(tmp_path, tiny_datasets, weights)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = str(tmp_path / "t.yaml")
    cfg.MODEL.DISTILL.LOSSES = ["HD", "TFD", "FRS", "FGD"]
    cfg.MODEL.DISTILL.TFD.WEIGHT = 1e-4
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    cfg.SOLVER.MAX_ITER = 4
    args = default_argument_parser().parse_args(
        ["--config-file", write_cfg(cfg, tmp_path / "cfg.yaml")])
    run_main(args)
    assert (tmp_path / "out" / "model_final.pth").is_file()
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "1 of 3 boxes extend outside their image and are clipped; 1 are degenerate" in log


@pytest.mark.parametrize("losses", [["HD", "TFD"], ["FRS"], ["FGD"]])
def test_batch_without_any_box_is_finite(tmp_path, losses):
    cfg = tiny_distill_cfg(tmp_path, losses=losses)
    model = build_model(cfg)
    batch = make_batch(2, empty=(0, 1))
    with EventStorage(0):
        out = model(batch)
    total = sum(out.values())
    assert all(math.isfinite(float(v.detach())) for v in out.values()), out
    total.backward()


def test_nonfinite_teacher_output_is_named(tmp_path):
    model = build_model(tiny_distill_cfg(tmp_path))
    with torch.no_grad():
        model.teacher.head.cls_score.bias.fill_(float("nan"))
    with EventStorage(3), pytest.raises(FloatingPointError) as err:
        model(make_batch(2))
    msg = str(err.value)
    assert "loss_hd_cls" in msg and "iteration 3" in msg
    assert "teacher head outputs" in msg and "MODEL.DISTILL.TEACHER.WEIGHTS" in msg


def test_nonfinite_term_with_finite_inputs_is_named(tmp_path, monkeypatch):
    model = build_model(tiny_distill_cfg(tmp_path))
    tfd = model.distillers["TFD"]
    real = tfd.forward

    def overflow(inputs):
        losses, diag = real(inputs)
        return {k: v * float("inf") for k, v in losses.items()}, diag

    monkeypatch.setattr(tfd, "forward", overflow)
    with EventStorage(0), pytest.raises(FloatingPointError) as err:
        model(make_batch(2))
    assert "['loss_tfd']" in str(err.value) and "inputs are finite" in str(err.value)
    assert "largest |value|: teacher FPN features" in str(err.value)


def test_huge_finite_student_features_are_named_as_divergence(tmp_path, monkeypatch):
    """|F_S| ~ 1e20 is finite, but TFD's squared difference overflows fp32: the message must
    point at the diverging student (learning rate, clipping), not at the term's weight."""
    model = build_model(tiny_distill_cfg(tmp_path))
    real = model.make_distill_inputs

    def huge(*args, **kwargs):
        inputs = real(*args, **kwargs)
        return replace(inputs, student_features=[f * 1e20 for f in inputs.student_features])

    monkeypatch.setattr(model, "make_distill_inputs", huge)
    with EventStorage(0), pytest.raises(FloatingPointError) as err:
        model(make_batch(2))
    msg = str(err.value)
    assert "['loss_tfd']" in msg and "Non-finite inputs: none" in msg
    assert "the student's are huge" in msg and "SOLVER.CLIP_GRADIENTS.ENABLED True" in msg


def test_distillation_fp32_under_bf16_autocast(tmp_path):
    """The whole DistillMetaArch training forward under CPU bf16 autocast: the distillation
    terms are computed and returned in fp32 (Detectron2's AMP trainer itself is CUDA-only)."""
    cfg = tiny_distill_cfg(tmp_path, losses=["HD", "TFD", "FRS", "FGD"])
    model = build_model(cfg)
    with EventStorage(0), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_batch(2))
    distill = {k: v for k, v in out.items() if k not in ("loss_cls", "loss_box_reg")}
    assert len(distill) >= 4
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in distill.values()), distill
    sum(out.values()).backward()
