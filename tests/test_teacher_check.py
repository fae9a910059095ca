"""The teacher check before training (MODEL.DISTILL.TEACHER.EVAL_BEFORE_TRAIN)."""

from __future__ import annotations

import logging

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from tbd.engine import argument_parser
from tbd.engine.teacher_check import check_teacher, skip_reason
from tbd.modeling.teacher import TeacherError

from .conftest import make_teacher, tiny_distill_cfg, write_cfg
from .helpers import run_main


def _cfg(tmp_path, tiny_datasets):
    (tmp_path / "t").mkdir(exist_ok=True)
    c, w, _ = make_teacher(tmp_path / "t")
    cfg = tiny_distill_cfg(tmp_path, teacher_weights=w)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = c
    cfg.MODEL.DISTILL.TEACHER.EVAL_BEFORE_TRAIN = True
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (tiny_datasets[0],), (tiny_datasets[1],)
    cfg.SOLVER.MAX_ITER = 2
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    return cfg


def _ground_truth_teacher(model, seen: list):
    """Make the teacher answer with each image's own GT boxes (score 1): AP 100 by hand."""
    by_size = {}

    def forward(batched_inputs):
        seen.extend(x["image"] for x in batched_inputs)
        out = []
        for x in batched_inputs:
            d = by_size[x["image_id"]]
            inst = Instances((x["height"], x["width"]))
            boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                      a["bbox"][1] + a["bbox"][3]] for a in d["annotations"]]
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.ones(len(boxes))
            inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]],
                                             dtype=torch.long)
            out.append({"instances": inst})
        return out

    model.teacher.forward = forward
    return by_size


def test_a_teacher_near_ap_zero_is_refused_before_anything_is_written(tmp_path, tiny_datasets):
    cfg = _cfg(tmp_path, tiny_datasets)  # an untrained teacher
    path = write_cfg(cfg, tmp_path / "s.yaml")
    with pytest.raises(TeacherError, match=r"The teacher scores bbox AP 0\.0 (\(no detections\) )?"
                       r"on the first 8 images of tbd_test_tiny_val, below MODEL.DISTILL.TEACHER."
                       r"EVAL_MIN_AP=5"):
        run_main(argument_parser().parse_args(["--config-file", path]))
    assert not (tmp_path / "out").exists()


def test_a_perfect_teacher_scores_100_and_sees_its_own_channel_order(tmp_path, tiny_datasets):
    cfg = _cfg(tmp_path, tiny_datasets)
    cfg.MODEL.DISTILL.TEACHER.EVAL_MAX_IMAGES = 5
    model = build_model(cfg)
    dicts = DatasetCatalog.get(tiny_datasets[1])
    seen = []
    by_id = _ground_truth_teacher(model, seen)
    by_id.update({d["image_id"]: d for d in dicts})
    # The dataset's category ids are 0-based contiguous after loading: the GT classes as given.
    result = check_teacher(cfg, model)
    assert result["images"] == 5 and result["bbox"]["AP"] == pytest.approx(100.0)
    assert model.training  # the mode is restored

    model.teacher_input_format = "RGB"  # the student reads BGR: the teacher gets flipped images
    flipped = []
    _ground_truth_teacher(model, flipped).update({d["image_id"]: d for d in dicts})
    check_teacher(cfg, model)
    assert torch.equal(flipped[0], seen[0].flip(0))


def test_skips_are_logged_with_their_reason(tmp_path, tiny_datasets, caplog):
    cfg = _cfg(tmp_path, tiny_datasets)
    model = build_model(cfg)
    assert skip_reason(cfg, model) is None
    cfg.MODEL.DISTILL.TEACHER.EVAL_BEFORE_TRAIN = False
    assert "EVAL_BEFORE_TRAIN is False" in skip_reason(cfg, model)
    cfg.MODEL.DISTILL.TEACHER.EVAL_BEFORE_TRAIN = True
    cfg.DATASETS.TEST = ()
    with caplog.at_level(logging.INFO, logger="tbd"):
        assert check_teacher(cfg, model) is None
    assert "Teacher check skipped: DATASETS.TEST is empty" in caplog.text
    cfg.DATASETS.TEST = (tiny_datasets[1],)
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = ""
    assert "random" in skip_reason(cfg, model)


def test_the_check_leaves_the_training_unchanged(tmp_path, tiny_datasets):
    """Run with the check (floor 0) and without: the same weights after 2 steps, bitwise."""
    finals = []
    for check in (True, False):
        torch.manual_seed(0)  # the same random teacher both times
        cfg = _cfg(tmp_path, tiny_datasets)
        cfg.MODEL.DISTILL.TEACHER.EVAL_MIN_AP = 0.0
        cfg.MODEL.DISTILL.TEACHER.EVAL_BEFORE_TRAIN = check
        cfg.OUTPUT_DIR = str(tmp_path / f"out_{check}")
        path = write_cfg(cfg, tmp_path / f"s_{check}.yaml")
        run_main(argument_parser().parse_args(["--config-file", path]))
        finals.append(torch.load(tmp_path / f"out_{check}" / "model_final.pth",
                                 weights_only=False)["model"])
    assert (tmp_path / "out_True" / "teacher_check.json").is_file()
    assert not (tmp_path / "out_False" / "teacher_check.json").exists()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
