"""The same project on Detectron2 v0.6 and main: a teacher fingerprint that does not depend on
the Detectron2 version, release configs both read, the model zoo's import errors reported with
their cause, checkpoints without the inner trainer's state, and scripted losses that run the same
graph on every call (exact resume)."""

import logging
import subprocess
import sys

import pytest
import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

import tbd
from tbd.config import portable_dump
from tbd.modeling import teacher as teacher_mod
from tbd.modeling.teacher import TeacherError, check_same_teacher, teacher_fingerprint

from .conftest import ROOT, make_teacher, tiny_distill_cfg, tiny_retinanet_cfg


def _get_cfg_of_a_later_version():
    """get_cfg() with keys a later Detectron2 adds (main has FLOAT32_PRECISION, ...)."""
    cfg = get_cfg()
    cfg.FLOAT32_PRECISION = ""
    cfg.SOLVER.BASE_LR_END = 0.0
    cfg.MODEL.NEW_KEY_AT_DEFAULT = 1
    return cfg


def _distill_cfg(tmp_path, opts=()):
    c, w, _ = make_teacher(tmp_path)
    cfg = tiny_distill_cfg(tmp_path, teacher_weights=w)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = c
    cfg.MODEL.DISTILL.TEACHER.OPTS = list(opts)
    return cfg


def test_fingerprint_is_the_same_under_a_version_with_more_keys(tmp_path, monkeypatch):
    cfg = _distill_cfg(tmp_path)
    here = teacher_fingerprint(cfg)
    monkeypatch.setattr(teacher_mod, "get_cfg", _get_cfg_of_a_later_version)
    there = teacher_fingerprint(cfg)
    assert here == there
    check_same_teacher(here, there, "ckpt")  # resumes


def test_fingerprint_ignores_device_and_path_but_names_what_changed(tmp_path):
    cfg = _distill_cfg(tmp_path)
    saved = teacher_fingerprint(cfg)
    moved = cfg.clone()
    copy = tmp_path / "copy.yaml"
    copy.write_text((tmp_path / "t.yaml").read_text().replace("DEVICE: cpu", "DEVICE: cuda"))
    moved.MODEL.DISTILL.TEACHER.CONFIG = str(copy)
    check_same_teacher(saved, teacher_fingerprint(moved), "ckpt")  # same keys elsewhere: resumes

    other_opts = cfg.clone()
    other_opts.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.3"]
    with pytest.raises(TeacherError, match=r"changed: overrides \(MODEL.DISTILL.TEACHER.OPTS"):
        check_same_teacher(saved, teacher_fingerprint(other_opts), "ckpt")

    other_config = cfg.clone()
    edited = tmp_path / "edited.yaml"
    edited.write_text((tmp_path / "t.yaml").read_text().replace("NUM_CONVS: 2", "NUM_CONVS: 3"))
    other_config.MODEL.DISTILL.TEACHER.CONFIG = str(edited)
    with pytest.raises(TeacherError, match=r"changed: config \(MODEL.DISTILL.TEACHER.CONFIG"):
        check_same_teacher(saved, teacher_fingerprint(other_config), "ckpt")

    other_weights = cfg.clone()
    w2 = tmp_path / "w2.pth"
    torch.save({"model": {}}, w2)
    other_weights.MODEL.DISTILL.TEACHER.WEIGHTS = str(w2)
    with pytest.raises(TeacherError, match=r"changed: weights \(MODEL.DISTILL.TEACHER.WEIGHTS"):
        check_same_teacher(saved, teacher_fingerprint(other_weights), "ckpt")


def test_fingerprint_of_an_older_project_version_compares_the_weights(tmp_path, caplog):
    cfg = _distill_cfg(tmp_path)
    now = teacher_fingerprint(cfg)
    old = {"config": now["config"], "config_sha256": "0" * 64, "weights": now["weights"],
           "weights_sha256": now["weights_sha256"]}  # the first format: a hash of the dump
    with caplog.at_level(logging.WARNING, logger="tbd"):
        check_same_teacher(old, now, "ckpt")
    assert "only the teacher's weights are compared" in caplog.text
    with pytest.raises(TeacherError, match="weights"):
        check_same_teacher(dict(old, weights_sha256="1" * 64), now, "ckpt")


def test_release_config_lists_only_non_default_keys_and_loads_in_either_version(monkeypatch):
    student = tbd.student_config(tiny_retinanet_cfg())
    text = portable_dump(student)
    assert "FPN" in text and "NUM_CONVS: 1" in text and "DEVICE: cpu" in text
    assert "PANOPTIC_FPN" not in text and "KEYPOINT_ON" not in text  # at their defaults
    # written by a version with more keys (at their defaults): v0.6's get_cfg reads it
    import detectron2.config

    later = student.clone()
    later.FLOAT32_PRECISION = ""
    monkeypatch.setattr(detectron2.config, "get_cfg", _get_cfg_of_a_later_version)
    text_later = portable_dump(later)
    monkeypatch.undo()
    for t in (text, text_later):
        cfg = get_cfg()
        cfg.merge_from_other_cfg(CN.load_cfg(t))
        assert cfg.MODEL.FPN.OUT_CHANNELS == 16 and cfg.MODEL.RETINANET.NUM_CONVS == 1


def test_model_zoo_import_error_is_reported_with_its_cause(monkeypatch):
    import detectron2

    monkeypatch.delattr(detectron2, "model_zoo", raising=False)
    monkeypatch.setitem(sys.modules, "detectron2.model_zoo", None)  # import fails
    zoo_error = r"model zoo.*cannot be imported: ModuleNotFoundError"
    with pytest.raises(TeacherError, match=zoo_error) as err:
        teacher_mod.resolve_config_path("COCO-Detection/retinanet_R_101_FPN_3x.yaml")
    assert "setuptools<82" in str(err.value)
    monkeypatch.undo()
    with pytest.raises(TeacherError, match="not a Detectron2 model-zoo config name"):
        teacher_mod.resolve_config_path("COCO-Detection/no_such_model.yaml")


def test_checkpoint_without_inner_trainer_state_resumes_with_a_warning(tiny_datasets, tmp_path,
                                                                       monkeypatch, caplog):
    from detectron2.engine import DefaultTrainer

    from tbd.engine import DistillTrainer

    cfg = tiny_retinanet_cfg()
    cfg.DATASETS.TRAIN = (tiny_datasets[0],)
    cfg.DATASETS.TEST = ()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    trainer = DistillTrainer(cfg)

    def main_load_state_dict(self, state_dict):  # Detectron2 main's DefaultTrainer
        super(DefaultTrainer, self).load_state_dict(state_dict)
        self._trainer.load_state_dict(state_dict["_trainer"])

    for patched in (False, True):  # v0.6 as installed, then main's behaviour
        if patched:
            monkeypatch.setattr(DefaultTrainer, "load_state_dict", main_load_state_dict,
                                raising=False)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tbd"):
            trainer.load_state_dict({"iteration": 4, "hooks": {}})  # a stock v0.6 checkpoint
        assert trainer.iter == 4
        assert "no optimizer state ('_trainer'" in caplog.text
        assert "no 'tbd' resume state" in caplog.text


SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tbd.engine.trainer import exact_jit
from tests.conftest import make_batch, tiny_retinanet_cfg
torch.manual_seed(0)
torch.set_num_threads(1)
model = build_model(tiny_retinanet_cfg()).train()
batch = make_batch(2)
grads = []
with exact_jit():
    for _ in range(2):
        model.zero_grad()
        model.loss_normalizer = 100.0
        with EventStorage(0):
            sum(model(batch).values()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
print(max(float((a - b).abs().max()) for a, b in zip(*grads)))
"""


def test_scripted_losses_run_the_same_graph_on_every_call():
    """The first and the second loss backward of a fresh process, same weights and batch: equal
    under the trainer's exact_jit (with TorchScript's optimisation they differ)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], capture_output=True,
                         text=True, check=True, timeout=300)
    assert float(out.stdout.strip().splitlines()[-1]) == 0.0
