"""Harmony Score forms and teacher qualities, against hand-computed values."""

import math

import pytest
import torch
from detectron2.structures import Boxes, Instances

from tbd.distillers.quality import harmony_score, teacher_cls_quality, teacher_loc_quality


def _t(*v):
    return torch.tensor([list(v)], dtype=torch.float32)


def test_harmony_form_values():
    s, u = _t(0.5, 0.8, 0.0, 0.3, 1.0), _t(0.5, 0.5, 0.7, 0.0, 1.0)
    fg = torch.ones_like(s, dtype=torch.bool)
    hs = harmony_score(s, u, fg, "harmony")
    # 0.5^0.5 * 0.5^0.5 = 0.5; 0.8^0.5 * 0.5^0.8; s = 0 -> 0; u = 0 -> 0; 1^1 * 1^1 = 1
    expected = [0.5, math.sqrt(0.8) * 0.5**0.8, 0.0, 0.0, 1.0]
    assert hs[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_harmony_diagonal_dip():
    # On the diagonal s = u = x the form is x^(2x): 0.4791 at x = 1/e, rising towards 1 at 0.
    x = 1 / math.e
    hs = harmony_score(_t(x, 0.01), _t(x, 0.01), torch.ones(1, 2, dtype=torch.bool), "harmony")
    assert hs[0, 0].item() == pytest.approx(math.exp(-2 / math.e), abs=1e-6)
    assert hs[0, 1].item() == pytest.approx(0.01 ** 0.02, abs=1e-6)


def test_consistency_form_values():
    s, u = _t(0.8, 0.2, 0.0, 0.6), _t(0.5, 0.2, 0.0, 0.9)
    hs = harmony_score(s, u, torch.ones_like(s, dtype=torch.bool), "consistency")
    # (1 - |s - u|) * max(s, u)
    assert hs[0].tolist() == pytest.approx([0.7 * 0.8, 1.0 * 0.2, 0.0, 0.7 * 0.9], abs=1e-6)


def test_aligned_form_normalised_per_gt():
    # Image 0: anchors 0, 1 -> GT 0; anchor 2 -> GT 1; anchor 3 background.
    s = _t(0.8, 0.4, 0.5, 0.9)
    u = _t(0.5, 0.9, 0.6, 0.9)
    fg = torch.tensor([[True, True, True, False]])
    group = torch.tensor([[0, 0, 1, 0]])
    hs = harmony_score(s, u, fg, "aligned", group=group, alpha=1.0, beta=2.0)
    t0, t1 = 0.8 * 0.25, 0.4 * 0.81  # s * u^2
    # GT 0: max t = t1, max u = 0.9; GT 1 alone: its t is rescaled to its own u = 0.6.
    expected = [t0 * 0.9 / t1, t1 * 0.9 / t1, 0.6, 0.0]
    assert hs[0].tolist() == pytest.approx(expected, abs=1e-5)


def test_aligned_groups_are_per_image():
    s = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    u = torch.tensor([[0.5, 1.0], [0.2, 0.4]])
    fg = torch.ones(2, 2, dtype=torch.bool)
    group = torch.zeros(2, 2, dtype=torch.long)  # GT 0 in both images, but different GTs
    hs = harmony_score(s, u, fg, "aligned", group=group)
    # image 1: t = 0.5*0.04, 0.5*0.16 -> max t = 0.08, max u = 0.4
    assert hs[1].tolist() == pytest.approx([0.02 * 0.4 / 0.08, 0.4], abs=1e-5)
    assert hs[0].tolist() == pytest.approx([0.125 / 0.5, 1.0], abs=1e-5)


@pytest.mark.parametrize("form", ["harmony", "aligned", "consistency"])
def test_zero_qualities_and_background(form):
    s = torch.zeros(2, 3)
    u = torch.zeros(2, 3)
    fg = torch.tensor([[True, False, True], [False, False, False]])  # image 1: all background
    hs = harmony_score(s, u, fg, form, group=torch.zeros(2, 3, dtype=torch.long))
    assert torch.equal(hs, torch.zeros(2, 3))
    s2, u2 = torch.full((2, 3), 0.7), torch.full((2, 3), 0.6)
    hs2 = harmony_score(s2, u2, fg, form, group=torch.zeros(2, 3, dtype=torch.long))
    assert torch.all(hs2[~fg] == 0) and torch.all(hs2[fg] > 0)
    assert torch.isfinite(hs2).all()


def test_hs_is_detached():
    s = torch.full((1, 2), 0.5, requires_grad=True)
    hs = harmony_score(s, torch.full((1, 2), 0.5), torch.ones(1, 2, dtype=torch.bool), "harmony")
    assert not hs.requires_grad


def test_unknown_form_raises():
    with pytest.raises(ValueError, match="Unknown Harmony Score form"):
        harmony_score(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), "x")


def test_teacher_qualities():
    probs = torch.tensor([[[0.1, 0.7], [0.3, 0.2], [0.9, 0.9]]])  # [N=1, R=3, K=2]
    labels = torch.tensor([[1, 2, -1]])  # fg class 1, background (K=2), ignored
    s = teacher_cls_quality(probs, labels, num_classes=2)
    assert s.tolist() == [[pytest.approx(0.7), 0.0, 0.0]]

    inst = Instances((20, 20))
    inst.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 20.0, 20.0]]))
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 5.0], [10.0, 10.0, 20.0, 20.0], [0, 0, 1, 1.0]]])
    matched = torch.tensor([[0, 1, 0]])
    fg = torch.tensor([[True, True, False]])
    u = teacher_loc_quality(boxes, [inst], matched, fg)
    assert u.tolist() == [[pytest.approx(0.5), pytest.approx(1.0), 0.0]]


def test_teacher_loc_quality_image_without_gt():
    empty = Instances((8, 8))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    boxes = torch.rand(1, 4, 4)
    u = teacher_loc_quality(boxes, [empty], torch.zeros(1, 4, dtype=torch.long),
                            torch.zeros(1, 4, dtype=torch.bool))
    assert torch.equal(u, torch.zeros(1, 4))
