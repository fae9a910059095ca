"""Automatic loss weights (MODEL.DISTILL.AUTO_WEIGHT): measured ratios, scales, state."""

from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from tbd.config import ConfigError, validate_distill_config
from tbd.modeling.auto_weight import AutoWeight

from .conftest import make_batch, tiny_distill_cfg


def _pair():
    return nn.ModuleDict({"A": nn.Module(), "B": nn.Module()})


def _step(auto, it, a, b, det=1.0):
    terms = {"A": {"loss_a1": torch.tensor(a / 2), "loss_a2": torch.tensor(a / 2)},
             "B": {"loss_b": torch.tensor(b)}}
    with EventStorage(it) as storage:
        out = auto(terms, torch.tensor(det), it)
    return out, storage


def test_scales_are_target_over_mean_measured_ratio():
    d = _pair()
    auto = AutoWeight(d, {"A": 1.0, "B": 0.5}, start_iter=2, iters=2)
    _step(auto, 0, 100.0, 100.0)  # before START_ITER: not measured
    out, _ = _step(auto, 2, 4.0, 0.01)  # A: ratio 4, B: 0.01
    assert out["A"]["loss_a1"].item() == 2.0  # unchanged while measuring
    _step(auto, 3, 4.0, 0.03, det=2.0)  # A: 2, B: 0.015
    assert not auto.fixed()
    out, storage = _step(auto, 4, 4.0, 0.01)
    # A: 1 / mean(4, 2) = 1/3; B: 0.5 / mean(0.01, 0.015) = 40
    assert auto.scales() == pytest.approx({"A": 1 / 3, "B": 40.0})
    assert out["A"]["loss_a1"].item() == pytest.approx(2.0 / 3)
    assert out["A"]["loss_a2"].item() == pytest.approx(2.0 / 3)  # one scale per distiller
    assert out["B"]["loss_b"].item() == pytest.approx(0.4)
    assert storage.latest()["auto_weight/B"][0] == pytest.approx(40.0)
    assert auto.summary()["fixed"] is True


def test_state_is_in_the_distillers_buffers_and_survives_a_reload():
    d = _pair()
    auto = AutoWeight(d, {"A": 1.0, "B": 1.0}, start_iter=0, iters=1)
    _step(auto, 0, 2.0, 4.0)
    _step(auto, 1, 2.0, 4.0)
    state = d.state_dict()
    assert set(state) == {f"{n}.auto_{k}" for n in "AB" for k in ("ratio_sum", "scale", "fixed")}

    fresh = _pair()
    reloaded = AutoWeight(fresh, {"A": 1.0, "B": 1.0}, start_iter=0, iters=1)
    fresh.load_state_dict(state)
    assert reloaded.fixed() and reloaded.scales() == pytest.approx({"A": 0.5, "B": 0.25})
    out, _ = _step(reloaded, 5, 2.0, 4.0)  # scaled at once, not measured again
    assert out["B"]["loss_b"].item() == pytest.approx(1.0)


def test_a_term_that_stays_zero_keeps_scale_one(caplog):
    d = _pair()
    auto = AutoWeight(d, {"A": 1.0, "B": 1.0}, start_iter=0, iters=1)
    _step(auto, 0, 2.0, 0.0)
    out, _ = _step(auto, 1, 2.0, 0.0)
    assert auto.scales()["B"] == 1.0 and "distiller B was 0" in caplog.text


def test_meta_arch_brings_each_distiller_to_its_target_ratio(tmp_path):
    """The same batch, no optimiser step, a constant loss normaliser: every step has the same
    ratios, so after the window each distiller's total is exactly its target times L_det."""
    cfg = tiny_distill_cfg(tmp_path, losses=("HD", "TFD"))
    cfg.MODEL.DISTILL.AUTO_WEIGHT.ENABLED = True
    cfg.MODEL.DISTILL.AUTO_WEIGHT.ITERS = 2
    cfg.MODEL.DISTILL.AUTO_WEIGHT.TARGET.HD = 0.5
    cfg.MODEL.DISTILL.AUTO_WEIGHT.TARGET.TFD = 2.0
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    model._ema_update = lambda name, value, initial, momentum=0.9: float(value)
    batch = make_batch(2)
    keys = {"HD": ("loss_hd_cls", "loss_hd_reg"), "TFD": ("loss_tfd",)}
    for it in range(4):
        with EventStorage(it):
            losses = {k: v.item() for k, v in model(batch).items()}
        det = losses["loss_cls"] + losses["loss_box_reg"]
        ratios = {n: sum(losses[k] for k in ks) / det for n, ks in keys.items()}
        if it < 2:
            measured = ratios
        else:
            assert ratios == pytest.approx({"HD": 0.5, "TFD": 2.0}, rel=1e-4)
    assert model.auto_weight.scales() == pytest.approx(
        {"HD": 0.5 / measured["HD"], "TFD": 2.0 / measured["TFD"]}, rel=1e-4)
    assert "distillers.HD.auto_scale" in model.state_dict()


def test_config_is_checked(tmp_path):
    cfg = tiny_distill_cfg(tmp_path)
    cfg.MODEL.DISTILL.AUTO_WEIGHT.ENABLED = True
    cfg.MODEL.DISTILL.AUTO_WEIGHT.TARGET.HD = 0.0
    with pytest.raises(ConfigError, match="AUTO_WEIGHT.TARGET.HD"):
        validate_distill_config(cfg)
    cfg.MODEL.DISTILL.AUTO_WEIGHT.TARGET.HD = 1.0
    cfg.MODEL.DISTILL.AUTO_WEIGHT.ITERS = cfg.SOLVER.MAX_ITER
    with pytest.raises(ConfigError, match="AUTO_WEIGHT.ITERS"):
        validate_distill_config(cfg)
