"""HD and TFD losses and masks on tiny hand-built inputs, against hand-computed values."""

import math

import pytest
import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from torch import nn

from tbd.distillers.hd import HD
from tbd.distillers.primitives import masked_feature_loss, normalise_per_image, weighted_mean
from tbd.distillers.registry import DistillInputs
from tbd.distillers.tfd import TFD


def _bce(z: float, p: float) -> float:
    q = 1 / (1 + math.exp(-z))
    return -(p * math.log(q) + (1 - p) * math.log(1 - q))


def _sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def _inputs_two_anchors(student_dx: float = 0.1) -> DistillInputs:
    """One image, one 1x1 level with A = 2 anchors, K = 2 classes.

    Anchor 0 = [0, 0, 10, 10] is foreground for GT 0 (class 0, same box); anchor 1 is background.
    Teacher deltas are 0 (teacher box = anchor, u = 1); the student's anchor-0 box is shifted by
    ``student_dx`` widths.
    """
    # raw head outputs [N, A*K, H, W], anchor-major: (a0 c0, a0 c1, a1 c0, a1 c1)
    s_logits = torch.tensor([0.5, -1.0, 0.2, 0.3]).view(1, 4, 1, 1)
    t_logits = torch.tensor([1.0, -2.0, -0.5, 1.5]).view(1, 4, 1, 1)
    s_deltas = torch.tensor([student_dx, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float32).view(1, 8, 1, 1)
    t_deltas = torch.zeros(1, 8, 1, 1)
    inst = Instances((10, 10))
    inst.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    inst.gt_classes = torch.tensor([0])
    b2b = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    return DistillInputs(
        level_names=["p3"],
        student_features=[torch.zeros(1, 1, 1, 1)],
        teacher_features=[torch.zeros(1, 1, 1, 1)],
        student_logits=[s_logits],
        student_deltas=[s_deltas],
        teacher_logits=[t_logits],
        teacher_deltas=[t_deltas],
        anchors=[Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0]]))],
        gt_labels=torch.tensor([[0, 2]]),
        matched=torch.tensor([[0, 0]]),
        gt_instances=[inst],
        num_classes=2,
        student_box2box=b2b,
        teacher_box2box=b2b,
    )


def test_flatten_levels_matches_detectron2_order():
    from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K

    x = torch.randn(2, 3 * 4, 5, 6)
    assert torch.equal(DistillInputs.flatten_levels([x], 4), permute_to_N_HWA_K(x, 4))


def test_hd_foreground_only():
    inp = _inputs_two_anchors()
    hd = HD(cls_weight=1.0, reg_weight=1.0, bg_weight=0.0, hs_form="harmony")
    losses, diag = hd(inp)
    s = _sig(1.0)  # teacher score for class 0 on anchor 0; u = 1 -> HS = s^1 * 1^s = s
    bce0 = _bce(0.5, _sig(1.0)) + _bce(-1.0, _sig(-2.0))
    # normaliser max(sum w, 1) = 1 since HS < 1
    assert losses["loss_hd_cls"].item() == pytest.approx(s * bce0, rel=1e-5)
    # student box [1, 0, 11, 10] vs teacher [0, 0, 10, 10]: IoU = 90/110, hull = union -> 2/11
    assert losses["loss_hd_reg"].item() == pytest.approx(s * 2 / 11, rel=1e-5)
    assert diag["hd/mean_hs_fg"].item() == pytest.approx(s, rel=1e-6)


def test_hd_background_weight_and_normaliser():
    inp = _inputs_two_anchors()
    hd = HD(cls_weight=2.0, reg_weight=0.5, bg_weight=3.0, hs_form="harmony")
    losses, _ = hd(inp)
    s = _sig(1.0)
    w1 = 3.0 * max(_sig(-0.5), _sig(1.5))
    bce0 = _bce(0.5, _sig(1.0)) + _bce(-1.0, _sig(-2.0))
    bce1 = _bce(0.2, _sig(-0.5)) + _bce(0.3, _sig(1.5))
    expected = (s * bce0 + w1 * bce1) / max(s + w1, 1.0)
    assert losses["loss_hd_cls"].item() == pytest.approx(2.0 * expected, rel=1e-5)
    assert losses["loss_hd_reg"].item() == pytest.approx(0.5 * s * 2 / 11, rel=1e-5)


def test_hd_l1_variant_and_gradients():
    inp = _inputs_two_anchors(student_dx=0.3)
    inp.student_logits[0].requires_grad_(True)
    inp.student_deltas[0].requires_grad_(True)
    losses, _ = HD(reg_loss="l1")(inp)
    assert losses["loss_hd_reg"].item() == pytest.approx(_sig(1.0) * 0.3, rel=1e-5)
    sum(losses.values()).backward()
    # only anchor 0 (foreground) receives regression gradient
    g = inp.student_deltas[0].grad.view(-1)
    assert g[0] != 0 and torch.all(g[4:] == 0)


def test_hd_no_foreground_gives_zero():
    inp = _inputs_two_anchors()
    inp.gt_labels = torch.tensor([[2, -1]])  # background + ignored
    losses, _ = HD()(inp)
    assert losses["loss_hd_cls"].item() == 0.0 and losses["loss_hd_reg"].item() == 0.0


def _tfd_inputs(gamma_logit: float = 0.0) -> DistillInputs:
    """One image, one 2x2 level, A = 1, K = 1, C = 1; GT box = the top-left cell's anchor."""
    anchors = torch.tensor(
        [[0.0, 0, 4, 4], [4, 0, 8, 4], [0, 4, 4, 8], [4, 4, 8, 8]]  # (y, x) order
    )
    inst = Instances((8, 8))
    inst.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 4.0, 2.0]]))  # IoU 0.5 with anchor 0
    inst.gt_classes = torch.tensor([0])
    t_logits = torch.tensor([[0.0, 1.0], [-1.0, 2.0]]).view(1, 1, 2, 2)
    b2b = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    return DistillInputs(
        level_names=["p3"],
        student_features=[torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)],
        teacher_features=[torch.tensor([[2.0, 2.0], [1.0, 0.0]]).view(1, 1, 2, 2)],
        student_logits=[torch.zeros(1, 1, 2, 2)],
        student_deltas=[torch.zeros(1, 4, 2, 2)],
        teacher_logits=[t_logits],
        teacher_deltas=[torch.zeros(1, 4, 2, 2)],
        anchors=[Boxes(anchors)],
        gt_labels=torch.tensor([[0, 1, 1, 1]]),
        matched=torch.zeros(1, 4, dtype=torch.long),
        gt_instances=[inst],
        num_classes=1,
        student_box2box=b2b,
        teacher_box2box=b2b,
    )


def _identity_adapters():
    conv = nn.Conv2d(1, 1, 1)
    nn.init.ones_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.ModuleDict({"p3": conv})


def test_tfd_masks_fixed():
    tfd = TFD(adapters=_identity_adapters(), weight=1.0, gamma=0.25, balance_mode="fixed")
    (mask, m_cls, m_reg), = tfd.masks(_tfd_inputs())
    p = [[_sig(0.0), _sig(1.0)], [_sig(-1.0), _sig(2.0)]]
    assert torch.allclose(m_cls[0], torch.tensor(p))
    assert torch.allclose(m_reg[0], torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    assert torch.allclose(mask[0], 0.25 * torch.tensor(p) + 0.75 * torch.tensor([[0.5, 0], [0, 0]]))


def test_tfd_loss_fixed_value():
    tfd = TFD(adapters=_identity_adapters(), weight=0.5, gamma=0.5, balance_mode="fixed")
    losses, diag = tfd(_tfd_inputs())
    p = torch.tensor([[_sig(0.0), _sig(1.0)], [_sig(-1.0), _sig(2.0)]])
    m = 0.5 * p + 0.5 * torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    d2 = torch.tensor([[1.0, 0.0], [4.0, 16.0]])  # (F_T - F_S)^2
    expected = 0.5 * float((m * d2).sum() / m.sum())
    assert losses["loss_tfd"].item() == pytest.approx(expected, rel=1e-5)
    assert diag["tfd/mask_mass_p3"].item() == pytest.approx(float(m.sum()), rel=1e-5)


def test_tfd_dynamic_balance_and_empty_regression_mask():
    inp = _tfd_inputs()
    inp.gt_instances[0] = inp.gt_instances[0][:0]  # no GT: M_reg is all zero and stays zero
    tfd = TFD(adapters=_identity_adapters(), weight=1.0, gamma=0.5, balance_mode="dynamic")
    (mask, m_cls, m_reg), = tfd.masks(inp)
    assert torch.equal(m_reg, torch.zeros_like(m_reg))
    assert torch.allclose(mask, 0.5 * m_cls / m_cls.sum())
    assert mask.sum().item() == pytest.approx(0.5, rel=1e-6)


def test_normalise_per_image_zero_mass_stays_zero():
    m = torch.zeros(2, 3, 3)
    m[0, 1, 1] = 2.0
    out = normalise_per_image(m)
    assert out[0, 1, 1] == 1.0 and torch.equal(out[1], torch.zeros(3, 3))


def test_masked_feature_loss_and_weighted_mean():
    t = torch.ones(1, 2, 1, 2)
    s = torch.zeros(1, 2, 1, 2)
    mask = torch.tensor([[[1.0, 0.0]]])
    loss, mass = masked_feature_loss(t, s, mask)
    assert loss.item() == 2.0 and mass.item() == 1.0  # 2 channels x 1^2, normalised by mass 1
    zero_loss, _ = masked_feature_loss(t, s, torch.zeros(1, 1, 2))
    assert zero_loss.item() == 0.0
    v = torch.tensor([1.0, float("nan"), 3.0])
    w = torch.tensor([0.5, 0.0, 0.5])
    assert weighted_mean(v, w).item() == 2.0  # normaliser max(1, 1); NaN at w = 0 ignored


def test_losses_fp32_under_bf16_autocast():
    inp = _tfd_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, _ = TFD(adapters=_identity_adapters(), weight=1.0)(inp)
    assert losses["loss_tfd"].dtype == torch.float32
    inp2 = _inputs_two_anchors()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hd_losses, _ = HD()(inp2)
    assert all(v.dtype == torch.float32 for v in hd_losses.values())
