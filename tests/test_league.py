"""PKD, MGD, CrossKD, CrossHD and inheriting: hand-computed values on tiny tensors, and one step
of each on tiny models (different widths, an image without boxes, fp32 under autocast)."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tbd.distillers import METHODS
from tbd.distillers.crosskd import match_statistics, quality_focal_kd, student_index
from tbd.distillers.hd import harmony_weights
from tbd.distillers.mgd import MGD, random_keep_mask
from tbd.distillers.pkd import pearson_loss, standardise_channels
from tbd.modeling.taps import HeadInternals, head_from
from tbd.modeling.teacher import inherit_from_teacher

from .conftest import make_batch, make_teacher, tiny_distill_cfg, tiny_retinanet_cfg


# ------------------------------------------------------------------------------ PKD
def test_pkd_is_one_minus_pearson_r_per_channel():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 1, 3, 3)), rng.normal(size=(2, 1, 3, 3))
    z = standardise_channels(torch.tensor(s))
    flat = s.reshape(-1)
    assert np.allclose(z.numpy().reshape(-1), (flat - flat.mean()) / (flat.std(ddof=1) + 1e-6))
    r = np.corrcoef(s.reshape(-1), t.reshape(-1))[0, 1]
    n = s.size  # with the unbiased std, mse(z_S, z_T) / 2 = (n - 1) / n * (1 - r)
    got = float(pearson_loss(torch.tensor(s), torch.tensor(t)))
    assert got == pytest.approx((n - 1) / n * (1 - r), rel=1e-5)
    # a map and any positive affine copy of it: no loss (relations, not magnitudes)
    affine = pearson_loss(torch.tensor(s), torch.tensor(3 * s + 2))
    assert float(affine) == pytest.approx(0, abs=1e-9)


def test_pkd_resizes_the_student_to_the_teacher():
    s = torch.arange(4.0).view(1, 1, 2, 2)
    t = torch.nn.functional.interpolate(s, size=(4, 4), mode="bilinear")
    assert float(pearson_loss(s, t)) == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------ MGD
def test_mgd_mask_drops_lambda_and_generator_state_is_a_buffer(tmp_path):
    g = torch.Generator().manual_seed(0)
    mask = random_keep_mask((4, 50, 50), 0.65, g)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert float(1 - mask.mean()) == pytest.approx(0.65, abs=0.02)
    cfg = tiny_distill_cfg(tmp_path, losses=["MGD"])
    cfg.SEED = 3
    model = build_model(cfg).train()
    mgd = model.distillers["MGD"]
    assert "distillers.MGD.rng_state" in model.state_dict()
    state0 = mgd.rng_state.clone()
    with EventStorage(0):
        first = float(model(make_batch(2))["loss_mgd"].detach())
    assert not torch.equal(state0, mgd.rng_state)  # masks drawn: the state moved on
    # restored from a checkpoint, the next step draws the masks it drew
    later = mgd.rng_state.clone()
    with EventStorage(1):
        a = float(model(make_batch(2, seed=1))["loss_mgd"].detach())
    mgd.rng_state.copy_(later)
    with EventStorage(1):
        b = float(model(make_batch(2, seed=1))["loss_mgd"].detach())
    assert a == b and a != first


def test_mgd_loss_by_hand_with_a_zero_generator():
    """A generator that outputs 0: the loss is alpha * sum(F_T^2) / N whatever the mask."""
    from tbd.distillers.registry import DistillInputs

    gen = torch.nn.ModuleDict({"p3": torch.nn.Conv2d(2, 2, 1)})
    torch.nn.init.zeros_(gen["p3"].weight)
    torch.nn.init.zeros_(gen["p3"].bias)
    mgd = MGD(align=torch.nn.ModuleDict(), generators=gen, alpha=0.5, drop=0.65, seed=0)
    f_t = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]] * 2)  # N=2, C=2, 1x2
    inputs = DistillInputs(["p3"], [torch.ones(2, 2, 1, 2)], [f_t], [], [], [], [], [],
                           torch.zeros(2, 0), None, [], 5, None, None)
    losses, _ = mgd(inputs)
    assert float(losses["loss_mgd"].detach()) == pytest.approx(0.5 * (2 * 30.0) / 2)


# ------------------------------------------------------------------------------ CrossKD
def test_crosskd_pieces_by_hand():
    s = torch.tensor([[[[1.0, 2.0, 3.0]]], [[[4.0, 5.0, 6.0]]]])  # N=2, C=1
    t = torch.tensor([[[[10.0, 10.0, 10.0]]], [[[20.0, 20.0, 20.0]]]])
    out = match_statistics(s, t)
    assert float(out.mean()) == pytest.approx(15.0, abs=1e-4)
    assert float(out.std()) == pytest.approx(float(t.std()), rel=1e-4)
    z = torch.zeros(1, 2)
    p = torch.tensor([[0.5, 1.0]])  # BCE(0, p) = ln 2 for both; |0.5 - p| = 0 and 0.5
    assert float(quality_focal_kd(z, p)) == pytest.approx(math.log(2) * 0.5, rel=1e-6)
    assert student_index(2, 4, 3) == 1 and student_index(4, 4, 3) == 3
    assert student_index(1, 4, 1) == 0


def test_teacher_crossed_with_itself_gives_its_own_outputs():
    head = build_model(tiny_retinanet_cfg(num_convs=3)).head.eval()
    feats = [torch.randn(2, 16, 2 ** k, 2 ** k) for k in range(5, 0, -1)]  # p3..p7
    for index in range(4):
        rec = HeadInternals(head, index).attach(always=True)
        with torch.no_grad():
            logits, deltas = head(feats)
        maps = rec.take()
        rec.detach()
        assert len(maps["cls"]) == len(feats)
        x_logits, x_deltas = head_from(head, maps, index)
        for a, b in zip(logits + deltas, x_logits + x_deltas):
            assert torch.allclose(a, b, atol=1e-6)


def student_equal_to_teacher(tmp_path, losses: list[str]):
    """A tiny distilled student with its teacher's architecture and weights, crossed after the
    teacher's first head conv, in training mode with BN as the teacher's (eval): the same maps
    on both sides, so the crossed outputs are the teacher's."""
    c, w, teacher = make_teacher(tmp_path)
    cfg = tiny_distill_cfg(tmp_path, losses=losses, teacher_weights=w)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = c
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RETINANET.NUM_CONVS = 2
    cfg.MODEL.DISTILL.CROSSKD.TEACHER_INDEX = 1
    cfg.MODEL.DISTILL.CROSS_HD.TEACHER_INDEX = 1
    model = build_model(cfg).eval()
    missing, unexpected = model.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("distillers.") for k in missing)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


def test_crosskd_student_equal_to_teacher_has_zero_loss(tmp_path):
    """Same architecture and weights: the crossed outputs are the teacher's, so both terms are 0
    (the QFL modulating factor and the GIoU of a box with itself)."""
    model = student_equal_to_teacher(tmp_path, ["CrossKD"])
    with EventStorage(0):
        out = model(make_batch(2))
    assert float(out["loss_crosskd_cls"].detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(out["loss_crosskd_reg"].detach()) == pytest.approx(0.0, abs=1e-5)


def test_crosskd_index_beyond_the_teacher_head_is_refused(tmp_path):
    cfg = tiny_distill_cfg(tmp_path, losses=["CrossKD"])  # teacher: 2 convs per subnet
    cfg.MODEL.DISTILL.CROSSKD.TEACHER_INDEX = 3
    with pytest.raises(ValueError, match="TEACHER_INDEX=3 exceeds the teacher head's 2 convs"):
        build_model(cfg)


# ------------------------------------------------------------------------------ CrossHD
def test_cross_hd_is_hd_on_the_crossed_outputs(tmp_path):
    """CrossHD's terms are HD's with the student's logits and boxes replaced by the crossed ones
    (decoded with the teacher's box transform): the same weights, anchors and normalisers."""
    cfg = tiny_distill_cfg(tmp_path, losses=["HD", "CrossHD"])
    cfg.MODEL.DISTILL.CROSS_HD.TEACHER_INDEX = 1
    cfg.MODEL.DISTILL.CROSS_HD.CLS_WEIGHT = 0.5
    cfg.MODEL.DISTILL.CROSS_HD.REG_WEIGHT = 3.0
    model = build_model(cfg).train()  # the student's head maps are recorded in training mode
    with EventStorage(0):
        inputs = model.distill_inputs(make_batch(2, seed=3)).float()
    assert inputs.fg_mask.any()
    cross = model.distillers["CrossHD"]
    with torch.no_grad():
        logits, deltas = cross.crossed(inputs)
        as_student = replace(inputs, student_logits=logits, student_deltas=deltas,
                             student_box2box=inputs.teacher_box2box)
        hd, _ = model.distillers["HD"](as_student)
        out, diag = cross(inputs)
        own, _ = model.distillers["HD"](inputs)
    assert float(out["loss_cross_hd_cls"]) == pytest.approx(0.5 * float(hd["loss_hd_cls"]),
                                                            rel=1e-6)
    assert float(out["loss_cross_hd_reg"]) == pytest.approx(3.0 * float(hd["loss_hd_reg"]),
                                                            rel=1e-6)
    # ... and not HD's own terms: the student's head is not the crossed one
    assert float(own["loss_hd_cls"]) != pytest.approx(float(hd["loss_hd_cls"]), rel=1e-3)
    assert {"cross_hd/mean_hs_fg", "cross_hd/cls_weight_mass"} <= set(diag)


def test_cross_hd_student_equal_to_teacher_leaves_the_teacher_entropy(tmp_path):
    """Same architecture and weights: the crossed outputs are the teacher's, so the box term is 0
    and the classification term is the HS-weighted mean of the teacher's entropy (BCE of p_T
    with itself), sum_c -p ln p - (1 - p) ln(1 - p), over the foreground anchors."""
    model = student_equal_to_teacher(tmp_path, ["CrossHD"])
    with EventStorage(0):
        inputs = model.distill_inputs(make_batch(2, seed=4)).float()
    with torch.no_grad():
        out, _ = model.distillers["CrossHD"](inputs)
    p = inputs.teacher_probs.double()
    entropy = (-(p * p.log() + (1 - p) * (1 - p).log())).sum(-1)
    hs, _ = harmony_weights(inputs, "harmony", 1.0, 2.0, 0.0)
    fg = inputs.fg_mask
    assert fg.any() and bool((hs[~fg] == 0).all())
    expected = float((hs.double() * entropy)[fg].sum() / max(float(hs.sum()), 1.0))
    assert float(out["loss_cross_hd_cls"]) == pytest.approx(expected, rel=1e-5)
    assert float(out["loss_cross_hd_reg"]) == pytest.approx(0.0, abs=1e-5)


def test_cross_hd_keys_are_checked(tmp_path):
    cfg = tiny_distill_cfg(tmp_path, losses=["CrossHD"])  # teacher: 2 convs per subnet
    with pytest.raises(ValueError, match=r"MODEL.DISTILL.CROSS_HD.TEACHER_INDEX=3 exceeds"):
        build_model(cfg)
    cfg.MODEL.DISTILL.CROSS_HD.TEACHER_INDEX = -1
    with pytest.raises(ValueError, match=r"MODEL.DISTILL.CROSS_HD.TEACHER_INDEX must be"):
        build_model(cfg)
    cfg.MODEL.DISTILL.CROSS_HD.TEACHER_INDEX = 1
    cfg.MODEL.DISTILL.CROSS_HD.REG_WEIGHT = -1.0
    with pytest.raises(ValueError, match=r"MODEL.DISTILL.CROSS_HD.REG_WEIGHT must be"):
        build_model(cfg)


# ------------------------------------------------------------------------------ all of them
@pytest.mark.parametrize("losses", [["PKD"], ["MGD"], ["CrossKD"], ["HD", "TFD", "CrossKD"],
                                    ["CrossHD", "TFD"]])
def test_one_step_on_different_widths_with_an_image_without_boxes(tmp_path, losses):
    cfg = tiny_distill_cfg(tmp_path, losses=losses)  # student FPN 16, teacher 32
    cfg.MODEL.DISTILL.CROSSKD.TEACHER_INDEX = 1
    cfg.MODEL.DISTILL.CROSS_HD.TEACHER_INDEX = 1
    model = build_model(cfg).train()
    with EventStorage(0), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_batch(2, empty=(1,)))
    distill = {k: v for k, v in out.items() if k not in ("loss_cls", "loss_box_reg")}
    assert distill and all(v.dtype == torch.float32 and torch.isfinite(v)
                           for v in distill.values()), distill
    sum(out.values()).backward()
    # every trainable parameter takes part (DDP without find_unused_parameters); the teacher none
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert all(p.grad is None for p in model.teacher.parameters())


def test_the_methods_list_has_the_league():
    assert {"PKD", "MGD", "CrossKD"} <= set(METHODS)
    from tbd_benchmarks import speed

    assert {"pkd_step", "mgd_step", "crosskd_step"} <= set(speed.STEP_VARIANTS)


# ------------------------------------------------------------------------------ inheriting
def test_inherit_copies_matching_fpn_and_head_and_reports_the_rest():
    student = build_model(tiny_retinanet_cfg(fpn_channels=16, num_convs=2))
    teacher = build_model(tiny_retinanet_cfg(fpn_channels=16, num_convs=3, depth=34))
    report = inherit_from_teacher(student, teacher)
    t = teacher.state_dict()
    assert report.copied and all(not k.startswith("backbone.bottom_up.") for k in report.copied)
    assert "head.cls_subnet.0.weight" in report.copied and "backbone.fpn_output3.weight" in \
        report.copied
    s = student.state_dict()
    assert all(torch.equal(s[k], t[k]) for k in report.copied)
    assert not torch.equal(s["backbone.bottom_up.stem.conv1.weight"],
                           t["backbone.bottom_up.stem.conv1.weight"])
    # R18 and R34 have the same stage widths (the whole FPN matches); the student has 2 head
    # convs, the teacher 3: the teacher's third is its alone, the output layers match
    assert "head.cls_score.weight" in report.copied and "head.cls_subnet.4.weight" in t
    assert "head.cls_subnet.4.weight" not in student.state_dict()


def test_inherit_applies_to_a_new_run_only(tmp_path, tiny_datasets):
    from tbd.engine import DistillTrainer

    c, w, teacher = make_teacher(tmp_path)
    cfg = tiny_distill_cfg(tmp_path, teacher_weights=w)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = c
    cfg.MODEL.FPN.OUT_CHANNELS = 32  # the teacher's FPN width: its FPN and head convs match
    cfg.MODEL.DISTILL.INHERIT = True
    cfg.DATASETS.TRAIN = (tiny_datasets[0],)
    cfg.DATASETS.TEST = ()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    s, t = trainer.student.state_dict(), teacher.state_dict()
    assert torch.equal(s["head.cls_subnet.0.weight"], t["head.cls_subnet.0.weight"])
    # a resumed run continues from its checkpoint, not from the teacher
    with torch.no_grad():
        trainer.student.head.cls_subnet[0].weight.add_(1.0)
    trainer.checkpointer.save("model_0000000")
    resumed = DistillTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert torch.equal(resumed.student.state_dict()["head.cls_subnet.0.weight"],
                       t["head.cls_subnet.0.weight"] + 1.0)
