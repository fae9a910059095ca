"""FRS and FGD against hand-computed values: masks, attention, context block, loss terms."""

import math

import pytest
import torch
from torch import nn

from tbd.distillers.fgd import FGD, ContextBlock, fgd_attention, fgd_masks
from tbd.distillers.frs import FRS

from .test_losses import _bce, _sig, _tfd_inputs


def _identity_conv(k: int) -> nn.Conv2d:
    conv = nn.Conv2d(1, 1, k, padding=k // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    with torch.no_grad():
        conv.weight[0, 0, k // 2, k // 2] = 1.0
    return conv


def test_fgd_masks_hand_computed():
    # 16x16 image, 4x4 grid (scale 0.25). Box A -> rows/cols 0..2 (value 1/9); box B -> rows 1..2,
    # cols 1..3 (value 1/(2*3) = 1/6); overlaps keep the max.
    boxes = [torch.tensor([[2.0, 2.0, 7.0, 5.0], [4.0, 4.0, 12.0, 8.0]])]
    fg, bg = fgd_masks(boxes, [(16, 16)], 4, 4)
    a, b = 1 / 9, 1 / 6
    expected = torch.tensor([[a, a, a, 0], [a, b, b, b], [a, b, b, b], [0, 0, 0, 0]])
    assert torch.allclose(fg[0], expected)
    assert torch.allclose(bg[0], (expected == 0).float() / 5)


def test_fgd_masks_use_unpadded_size_and_empty_images():
    # the same box on a 16x8 (h x w) image padded to 16x16: x scales by W / 8
    fg, _ = fgd_masks([torch.tensor([[0.0, 0.0, 4.0, 4.0]])], [(16, 8)], 4, 4)
    assert torch.allclose(fg[0, :2, :3], torch.full((2, 3), 1 / 6))  # rows 0..1, cols 0..2
    fg, bg = fgd_masks([torch.zeros(0, 4)], [(16, 16)], 2, 2)
    assert torch.equal(fg, torch.zeros(1, 2, 2)) and torch.allclose(bg, torch.full((1, 2, 2), 0.25))


def test_fgd_attention_hand_computed():
    f = torch.tensor([[1.0, -3.0], [1.0, 1.0]]).view(1, 2, 1, 2)  # C=2, H=1, W=2
    spatial, channel = fgd_attention(f, temperature=0.5)
    # spatial: mean_c |F| = [1, 2] -> 2 * softmax([2, 4]); channel: mean_hw |F| = [2, 1]
    e = [math.exp(2), math.exp(4)]
    assert spatial.view(-1).tolist() == pytest.approx([2 * e[0] / sum(e), 2 * e[1] / sum(e)])
    e = [math.exp(4), math.exp(2)]
    assert channel.view(-1).tolist() == pytest.approx([2 * e[0] / sum(e), 2 * e[1] / sum(e)])


def test_context_block_starts_as_identity_and_pools_by_attention():
    block = ContextBlock(4)
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(block(x), x)  # last conv zero-initialised
    with torch.no_grad():
        block.conv_mask.weight.zero_()
        block.conv_mask.bias.zero_()  # uniform attention -> context = spatial mean
    n, c, h, w = x.shape
    attn = torch.softmax(block.conv_mask(x).view(n, 1, -1), dim=2)
    ctx = torch.bmm(x.view(n, c, -1), attn.transpose(1, 2)).view(n, c)
    assert torch.allclose(ctx, x.mean(dim=(2, 3)), atol=1e-6)


def test_fgd_level_terms_hand_computed():
    fgd = FGD(align=nn.ModuleDict(), student_blocks=nn.ModuleDict({"p3": ContextBlock(2)}),
              teacher_blocks=nn.ModuleDict({"p3": ContextBlock(2)}), temperature=0.5)
    f_t = torch.tensor([[1.0, -3.0], [1.0, 1.0]]).view(1, 2, 1, 2)
    f_s = torch.tensor([[0.0, -1.0], [2.0, 1.0]]).view(1, 2, 1, 2)
    fg = torch.tensor([[[1.0, 0.0]]])
    bg = torch.tensor([[[0.0, 1.0]]])
    terms = fgd.level_terms("p3", f_s, f_t, fg, bg)
    s_t, c_t = fgd_attention(f_t, 0.5)
    s_s, c_s = fgd_attention(f_s, 0.5)
    d2 = (f_s - f_t).pow(2)[0]  # [C, 1, W]
    fg_exp = sum(s_t[0, 0, 0] * c_t[0, c] * d2[c, 0, 0] for c in range(2))
    bg_exp = sum(s_t[0, 0, 1] * c_t[0, c] * d2[c, 0, 1] for c in range(2))
    assert terms["fg"].item() == pytest.approx(float(fg_exp), rel=1e-5)
    assert terms["bg"].item() == pytest.approx(float(bg_exp), rel=1e-5)
    attn = (c_s - c_t).abs().sum() + (s_s - s_t).abs().sum()
    assert terms["attn"].item() == pytest.approx(float(attn), rel=1e-5)
    # zero-initialised blocks: global term = sum (F_S - F_T)^2 / N
    assert terms["global"].item() == pytest.approx(float(d2.sum()), rel=1e-5)


def test_fgd_forward_and_gradient_to_blocks():
    inp = _tfd_inputs()
    inp.image_sizes = [(8, 8)]
    fgd = FGD(align=nn.ModuleDict(), student_blocks=nn.ModuleDict({"p3": ContextBlock(1 * 2)}),
              teacher_blocks=nn.ModuleDict({"p3": ContextBlock(2)}))
    inp.student_features = [torch.randn(1, 2, 2, 2, requires_grad=True)]
    inp.teacher_features = [torch.randn(1, 2, 2, 2)]
    losses, diag = fgd(inp)
    assert set(losses) == {"loss_fgd_fg", "loss_fgd_bg", "loss_fgd_attn", "loss_fgd_global"}
    sum(losses.values()).backward()
    assert inp.student_features[0].grad is not None
    assert fgd.teacher_blocks["p3"].channel_add[-1].weight.grad is not None


def test_frs_hand_computed():
    inp = _tfd_inputs()  # teacher logits [[0, 1], [-1, 2]] on a 2x2 level, A = K = 1
    inp.student_logits = [torch.tensor([[0.5, 0.0], [1.0, -1.0]]).view(1, 1, 2, 2)]
    frs = FRS(adapters=nn.ModuleDict({"p3": _identity_conv(3)}), feat_weight=0.5, cls_weight=2.0)
    losses, _ = frs(inp)
    z_t = [0.0, 1.0, -1.0, 2.0]
    z_s = [0.5, 0.0, 1.0, -1.0]
    m = [_sig(z) for z in z_t]
    d2 = [1.0, 0.0, 4.0, 16.0]  # (F_T - F_S)^2 from _tfd_inputs
    feat = sum(mi * di for mi, di in zip(m, d2)) / sum(m)
    cls = sum(mi * _bce(zs, _sig(zt)) for mi, zs, zt in zip(m, z_s, z_t)) / sum(m)
    assert losses["loss_frs_feat"].item() == pytest.approx(0.5 * feat, rel=1e-5)
    assert losses["loss_frs_cls"].item() == pytest.approx(2.0 * cls, rel=1e-5)


def test_frs_and_fgd_train_in_meta_arch(tmp_path):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from .conftest import make_batch, tiny_distill_cfg

    for losses in (["FRS"], ["FGD"]):
        model = build_model(tiny_distill_cfg(tmp_path, losses=losses))
        model.train()
        with EventStorage(0):
            out = model(make_batch(empty=(1,)))
        assert all(torch.isfinite(v) for v in out.values())
        sum(out.values()).backward()
        assert all(p.grad is not None for p in model.distillers.parameters()), losses
        assert all(p.grad is None for p in model.teacher.parameters())
