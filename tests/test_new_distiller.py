"""Adding a distiller is one file plus one import line: a toy distiller defined here, with its
own config keys, validation and needs, is built from a config and trains, with no edit to tbd/."""

import pytest
import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage
from torch import nn

from tbd.distillers import DISTILL_LOSS_REGISTRY, Distiller
from tbd.distillers.primitives import build_adapters
from tbd.distillers.registry import SAME_CLASSES, check_weights
from tbd.modeling import TeacherError

from .conftest import make_batch, tiny_distill_cfg


class ToyL2(Distiller):
    """Plain feature imitation: WEIGHT * sum over levels of mean (Adapt(F_S) - F_T)^2."""

    needs = frozenset({SAME_CLASSES})  # not needed by the loss: lets the test see a refusal

    @classmethod
    def add_config(cls, cfg):
        cfg.MODEL.DISTILL.TOY_L2 = CN()
        # Weight of the toy term.
        cfg.MODEL.DISTILL.TOY_L2.WEIGHT = 0.5

    @classmethod
    def validate_config(cls, cfg):
        check_weights(cfg, ["MODEL.DISTILL.TOY_L2.WEIGHT"])

    @configurable
    def __init__(self, *, adapters: nn.ModuleDict, weight: float):
        super().__init__()
        self.adapters = adapters
        self.weight = weight

    @classmethod
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        return {"adapters": build_adapters(list(student_shapes), student_shapes, teacher_shapes),
                "weight": cfg.MODEL.DISTILL.TOY_L2.WEIGHT}

    def forward(self, inputs):
        total = sum(((self.adapters[n](s) - t) ** 2).mean() for n, s, t in zip(
            inputs.level_names, inputs.student_features, inputs.teacher_features))
        return {"loss_toy_l2": self.weight * total}, {}


@pytest.fixture
def toy():
    DISTILL_LOSS_REGISTRY.register(ToyL2)
    yield ToyL2
    DISTILL_LOSS_REGISTRY._obj_map.pop("ToyL2")  # fvcore's Registry has no public removal


def test_toy_distiller_builds_from_config_and_trains_one_step(toy, tmp_path):
    cfg = tiny_distill_cfg(tmp_path, losses=["ToyL2"])
    assert cfg.MODEL.DISTILL.TOY_L2.WEIGHT == 0.5  # collected by add_tbd_config
    model = build_model(cfg)
    assert list(model.distillers) == ["ToyL2"]
    batch = make_batch(2)
    with EventStorage(0):
        losses = model(batch)
        inputs = model.distill_inputs(batch)  # the same taps (train mode), without gradient
    adapters = model.distillers["ToyL2"].adapters
    with torch.no_grad():
        expected = 0.5 * sum(((adapters[n](s) - t) ** 2).mean() for n, s, t in zip(
            inputs.level_names, inputs.student_features, inputs.teacher_features))
    assert float(losses["loss_toy_l2"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert {"loss_cls", "loss_box_reg", "loss_toy_l2"} == set(losses)
    optimizer = build_optimizer(cfg, model)
    before = [p.detach().clone() for p in adapters.parameters()]
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, adapters.parameters()))


def test_toy_distiller_validates_its_keys_and_declares_its_needs(toy, tmp_path):
    cfg = tiny_distill_cfg(tmp_path, losses=["ToyL2"])
    cfg.MODEL.DISTILL.TOY_L2.WEIGHT = -1.0
    with pytest.raises(ValueError, match=r"MODEL.DISTILL.TOY_L2.WEIGHT must be a finite number"):
        build_model(cfg)
    cfg.MODEL.DISTILL.TOY_L2.WEIGHT = 0.5
    cfg.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.RETINANET.NUM_CLASSES", "7"]
    with pytest.raises(TeacherError, match=r"NUM_CLASSES differs.*\['ToyL2'\]"):
        build_model(cfg)
