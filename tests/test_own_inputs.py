"""Inputs of evaluation, the tools and the release: nothing wrong accepted silently, checked
before anything is written; datasets registered from the command line; config-relative paths."""

import json
from dataclasses import replace

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tbd.data import DataError, register_datasets
from tbd.data.loader import ResumableTrainLoader
from tbd.engine import argument_parser, setup_config

from .conftest import make_batch, make_teacher, save_weights, tiny_distill_cfg, write_cfg
from .helpers import run_main


def _eval(cfg, tmp_path, *extra):
    args = default_argument_parser().parse_args(
        ["--config-file", write_cfg(cfg, tmp_path / "e.yaml"), "--eval-only", *extra])
    return run_main(args)


@pytest.mark.parametrize("weights", ["none", "teacher"])
def test_eval_only_refuses_weights_that_do_not_fit(tmp_path, tiny_datasets, weights):
    """No MODEL.WEIGHTS, or a teacher's checkpoint (another FPN width): a random or half-loaded
    student would be evaluated. Refused, and no OUTPUT_DIR / eval_results.json is written."""
    _, teacher_weights, _ = make_teacher(tmp_path)
    cfg = tiny_distill_cfg(tmp_path, teacher_weights=teacher_weights)
    cfg.DATASETS.TEST = (tiny_datasets[1],)
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.MODEL.WEIGHTS = "" if weights == "none" else teacher_weights
    words = "MODEL.WEIGHTS is empty" if weights == "none" else "does not fit the RetinaNet"
    with pytest.raises(SystemExit, match=words):
        _eval(cfg, tmp_path)
    assert not (tmp_path / "out").exists()


def test_a_diverged_students_nan_boxes_get_the_diagnosis(tmp_path):
    """fvcore's GIoU asserts on NaN boxes; the user gets the documented diagnosis instead."""
    model = build_model(tiny_distill_cfg(tmp_path, losses=["HD"]))
    real = model.make_distill_inputs

    def nan_deltas(*args, **kwargs):
        inputs = real(*args, **kwargs)
        return replace(inputs, student_deltas=[d * float("nan") for d in inputs.student_deltas])

    model.make_distill_inputs = nan_deltas
    with EventStorage(0), pytest.raises(FloatingPointError) as err:
        model(make_batch(2))
    assert "non-finite inputs: ['student head outputs']" in str(err.value)
    assert "the student diverged" in str(err.value)


def test_an_unreadable_image_is_named_by_the_loader(tmp_path, tiny_datasets):
    from detectron2.data import DatasetCatalog, DatasetMapper

    from .conftest import tiny_retinanet_cfg

    recs = [dict(r) for r in DatasetCatalog.get(tiny_datasets[0])[:2]]
    broken = tmp_path / "broken.png"
    data = open(recs[0]["file_name"], "rb").read()
    broken.write_bytes(data[: len(data) // 3])  # a truncated PNG
    recs[0]["file_name"] = str(broken)
    loader = ResumableTrainLoader(recs, DatasetMapper(tiny_retinanet_cfg(), is_train=True), 2,
                                  num_workers=0, seed=0)
    with pytest.raises(DataError, match="broken.png: cannot be loaded for training"):
        next(iter(loader))


def _coco_files(name):
    """json_file and image_root of a shapes dataset (set once it is generated)."""
    from detectron2.data import DatasetCatalog

    DatasetCatalog.get(name)
    md = MetadataCatalog.get(name)
    return md.json_file, md.image_root


def test_datasets_registered_from_the_command_line(tmp_path, tiny_datasets):
    json_file, image_root = _coco_files(tiny_datasets[1])
    args = argument_parser().parse_args(["--register-coco", "tbd_test_cli_val", json_file,
                                         image_root, "--config-file", "x.yaml"])
    register_datasets(args)
    from detectron2.data import DatasetCatalog

    assert len(DatasetCatalog.get("tbd_test_cli_val")) == len(DatasetCatalog.get(tiny_datasets[1]))
    module = tmp_path / "my_datasets.py"
    module.write_text("from detectron2.data import DatasetCatalog\n"
                      "DatasetCatalog.register('tbd_test_from_module', lambda: [])\n")
    register_datasets(argument_parser().parse_args(["--dataset-module", str(module)]))
    assert "tbd_test_from_module" in DatasetCatalog.list()
    with pytest.raises(DataError, match="--register-coco x .*does not exist"):
        register_datasets(argument_parser().parse_args(
            ["--register-coco", "x", str(tmp_path / "none.json"), str(tmp_path)]))
    with pytest.raises(DataError, match="--dataset-module no_such_module_here"):
        register_datasets(argument_parser().parse_args(["--dataset-module",
                                                         "no_such_module_here"]))


def test_analysis_tool_sees_a_dataset_given_on_its_command_line(tmp_path, tiny_datasets):
    from tbd_tools import analyze_harmony

    from .conftest import tiny_retinanet_cfg

    json_file, image_root = _coco_files(tiny_datasets[1])
    cfg = tiny_retinanet_cfg()
    weights = save_weights(build_model(cfg), tmp_path / "m.pth")
    out = tmp_path / "h"
    assert analyze_harmony.main(["--config-file", write_cfg(cfg, tmp_path / "c.yaml"),
                                 "--register-coco", "tbd_test_tool_val", json_file,
                                 image_root, "--dataset", "tbd_test_tool_val",
                                 "--output", str(out), "MODEL.WEIGHTS", weights]) == 0
    assert json.loads((out / "harmony.json").read_text())["num_predictions"] >= 0


def test_analysis_tool_refuses_weights_that_do_not_fit(tmp_path, tiny_datasets):
    from tbd_tools import analyze_harmony

    _, teacher_weights, _ = make_teacher(tmp_path)
    cfg = tiny_distill_cfg(tmp_path, teacher_weights=teacher_weights)
    cfg.DATASETS.TEST = (tiny_datasets[1],)
    with pytest.raises(SystemExit, match="does not fit the RetinaNet"):
        analyze_harmony.main(["--config-file", write_cfg(cfg, tmp_path / "a.yaml"),
                              "--output", str(tmp_path / "h"), "MODEL.WEIGHTS", teacher_weights])
    assert not (tmp_path / "h").exists()


def test_teacher_paths_resolve_beside_the_config_file(tmp_path, monkeypatch):
    c, w, _ = make_teacher(tmp_path)
    cfg = tiny_distill_cfg(tmp_path, teacher_weights=w)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = "t.yaml"  # relative to the config's folder
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = "t.pth"
    path = write_cfg(cfg, tmp_path / "student.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resolved = setup_config(argument_parser().parse_args(["--config-file", path]))
    assert resolved.MODEL.DISTILL.TEACHER.CONFIG == str(tmp_path / "t.yaml")
    assert resolved.MODEL.DISTILL.TEACHER.WEIGHTS == str(tmp_path / "t.pth")


def test_release_metadata_is_strict_json(tmp_path):
    from tbd.checkpoint import export_student
    from tbd.config import student_config

    from .conftest import tiny_retinanet_cfg

    cfg = tiny_retinanet_cfg()
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": build_model(cfg).state_dict()}, ckpt)
    final = export_student(ckpt, student_config(cfg), tmp_path / "rel",
                           {"AP": float("nan"), "metrics": {"APl": float("nan"), "AP": 1.5}})
    meta = json.loads(final.with_suffix(".json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"bare {c} in the json"))
    assert meta["AP"] is None and meta["metrics"] == {"APl": None, "AP": 1.5}


def test_input_errors_end_with_their_message_alone():
    from tbd.engine.defaults import input_errors_reported
    from tbd.modeling import TeacherError

    args = argument_parser().parse_args(["--config-file", "x.yaml"])
    with pytest.raises(SystemExit) as err, input_errors_reported(args):
        raise TeacherError("MODEL.DISTILL.TEACHER.WEIGHTS='t.pth': file not found.")
    assert str(err.value) == "TeacherError: MODEL.DISTILL.TEACHER.WEIGHTS='t.pth': file not found."
    args = argument_parser().parse_args(["--config-file", "x.yaml", "--traceback"])
    with pytest.raises(TeacherError), input_errors_reported(args):
        raise TeacherError("shown with its traceback")
    with pytest.raises(KeyError), input_errors_reported(args):  # not an input error: as it is
        raise KeyError("a bug")


def test_checkpoint_retention_keeps_the_newest(tmp_path, tiny_datasets):
    from .conftest import tiny_retinanet_cfg

    cfg = tiny_retinanet_cfg()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (tiny_datasets[0],), ()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.CHECKPOINT_PERIOD = 5, 1
    cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP = 2
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    run_main(argument_parser().parse_args(["--config-file", write_cfg(cfg, tmp_path / "c.yaml")]))
    kept = sorted(p.name for p in (tmp_path / "out").glob("model_*.pth"))
    assert kept == ["model_0000003.pth", "model_0000004.pth", "model_final.pth"], kept
    cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP = -1
    with pytest.raises(SystemExit, match="SOLVER.CHECKPOINT_MAX_TO_KEEP"):
        run_main(argument_parser().parse_args(["--config-file",
                                               write_cfg(cfg, tmp_path / "d.yaml")]))


def test_a_term_that_trains_nothing_or_drowns_the_detection_loss_is_named(tmp_path, caplog):
    """Warned once at the end of the warm-up: HD on batches without boxes is 0 throughout; TFD
    with a huge weight is far above the detection loss. The warnings name the keys."""
    import logging

    cfg = tiny_distill_cfg(tmp_path, losses=["HD", "TFD"])
    cfg.MODEL.DISTILL.WARMUP_ITERS = 2
    cfg.MODEL.DISTILL.TFD.WEIGHT = 1e3
    model = build_model(cfg).train()
    with caplog.at_level(logging.WARNING, logger="tbd"):
        for it in range(3):
            with EventStorage(it):
                model(make_batch(2, empty=(0, 1)))
    text = caplog.text
    assert "loss_hd_cls was 0 at each of the first 2 steps" in text
    assert "Check MODEL.DISTILL.HD.CLS_WEIGHT" in text
    assert "loss_tfd stayed above 100 times the detection loss" in text
    assert "Lower MODEL.DISTILL.TFD.WEIGHT" in text
    assert text.count("loss_hd_cls was 0") == 1  # once
