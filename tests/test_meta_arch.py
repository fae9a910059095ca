"""DistillMetaArch: frozen teacher, state dict, optimizer, gradients, stock equivalence, checks."""

import copy

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import SimpleTrainer
from detectron2.evaluation import inference_context
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

import tbd
from tbd.modeling.teacher import TeacherError, teacher_is_frozen

from .conftest import (
    make_batch,
    make_teacher,
    tiny_distill_cfg,
    tiny_retinanet_cfg,
)


@pytest.fixture
def model(tmp_path):
    return build_model(tiny_distill_cfg(tmp_path))


def test_teacher_frozen_and_out_of_tree(model):
    assert teacher_is_frozen(model.teacher)
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("backbone.", "head.", "distillers.")) for n in names)
    assert not any("teacher" in k for k in model.state_dict())
    # the student keeps stock RetinaNet parameter names
    stock = build_model(tbd.student_config(tiny_retinanet_cfg()))
    student_keys = {k for k in model.state_dict() if not k.startswith("distillers.")}
    assert student_keys == set(stock.state_dict())


def test_teacher_stays_eval_after_trainer_and_evaluation(model):
    batch = make_batch()
    optimizer = build_optimizer(tiny_retinanet_cfg(), model)
    trainer = SimpleTrainer(model, [batch], optimizer)  # calls model.train()
    assert model.training and not model.teacher.training
    with inference_context(model):  # what EvalHook / Trainer.test do; restores train(True)
        assert not model.training
    assert model.training and not model.teacher.training
    model.train(True)
    assert not model.teacher.training
    del trainer


def test_teacher_not_in_optimizer_or_checkpoint(model, tmp_path):
    optimizer = build_optimizer(tiny_retinanet_cfg(), model)
    opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in model.teacher.parameters()}
    adapter_ids = {id(p) for p in model.distillers.parameters()}
    assert adapter_ids and adapter_ids <= opt_ids
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ckpt")
    saved = torch.load(tmp_path / "ckpt.pth", weights_only=False)["model"]
    assert set(saved) == set(model.state_dict())
    n_teacher = sum(p.numel() for p in model.teacher.parameters())
    n_saved = sum(v.numel() for k, v in saved.items() if k.endswith(("weight", "bias")))
    n_model = sum(p.numel() for p in model.parameters())
    assert n_teacher > 0 and n_saved == n_model


def test_gradients_reach_only_student_and_adapters(model):
    model.train()
    with EventStorage(0):
        losses = model(make_batch(empty=(1,)))
    assert {"loss_cls", "loss_box_reg", "loss_hd_cls", "loss_hd_reg", "loss_tfd"} == set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.distillers.parameters())
    head_grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None for g in head_grads)


def test_distill_terms_have_gradient_to_student(model):
    model.train()
    with EventStorage(0):
        losses = model(make_batch())
    for key in ("loss_hd_cls", "loss_tfd"):
        model.zero_grad()
        losses[key].backward(retain_graph=True)
        g = model.backbone.bottom_up.stem.conv1.weight.grad
        assert g is not None and g.abs().sum() > 0, key


def test_zero_weights_equal_stock_retinanet(tmp_path):
    cfg = tiny_distill_cfg(tmp_path)
    cfg.MODEL.DISTILL.HD.CLS_WEIGHT = 0.0
    cfg.MODEL.DISTILL.HD.REG_WEIGHT = 0.0
    cfg.MODEL.DISTILL.TFD.WEIGHT = 0.0
    distill = build_model(cfg)
    stock = build_model(tbd.student_config(cfg))
    stock.load_state_dict(
        {k: v for k, v in distill.state_dict().items() if not k.startswith("distillers.")}
    )
    distill.train()
    stock.train()
    batch = make_batch(num_images=2, empty=(1,))
    for _ in range(2):  # twice: the EMA loss normaliser must evolve identically
        with EventStorage(0):
            a = distill(copy.deepcopy(batch))
            b = stock(copy.deepcopy(batch))
        assert torch.equal(a["loss_cls"], b["loss_cls"])
        assert torch.equal(a["loss_box_reg"], b["loss_box_reg"])
        assert all(a[k].item() == 0.0 for k in ("loss_hd_cls", "loss_hd_reg", "loss_tfd"))


def test_eval_mode_runs_student_only(model):
    model.eval()
    calls = []
    model.teacher.backbone.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model(make_batch())
    assert calls == [] and "instances" in out[0]


def test_schedule_factor(tmp_path):
    cfg = tiny_distill_cfg(tmp_path)
    cfg.MODEL.DISTILL.START_ITER = 10
    cfg.MODEL.DISTILL.WARMUP_ITERS = 20
    cfg.MODEL.DISTILL.STOP_ITER = 100
    m = build_model(cfg)
    assert [m.distill_factor(t) for t in (None, 0, 9, 10, 20, 30, 99, 100)] == [
        1.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 0.0
    ]
    cfg.MODEL.DISTILL.WARMUP_ITERS = -1
    cfg.SOLVER.MAX_ITER = 300
    assert tbd.config.resolve_warmup_iters(cfg) == 30


def test_diagnostics_go_to_event_storage(tmp_path):
    cfg = tiny_distill_cfg(tmp_path)
    cfg.MODEL.DISTILL.LOG_PERIOD = 2
    m = build_model(cfg)
    m.train()
    batch = make_batch()
    with EventStorage(0) as storage:
        for it in range(2):
            storage.iter = it
            losses = m(batch)
        hist = storage.histories()
    assert "distill/hd/mean_hs_fg" in hist and "distill/tfd/mask_mass_p3" in hist
    assert not any(k.startswith("distill") for k in losses if not k.startswith("loss_"))


# ------------------------------------------------------------------ build-time validation
def test_teacher_weights_load_fully(tmp_path):
    cfg_path, w_path, teacher = make_teacher(tmp_path)
    cfg = tiny_distill_cfg(tmp_path, teacher_weights=w_path)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = cfg_path
    m = build_model(cfg)
    for (k, a), b in zip(teacher.state_dict().items(), m.teacher.state_dict().values()):
        assert torch.equal(a, b), k


def test_teacher_zoo_pkl_format_loads(tmp_path):
    """Model-zoo weights are .pkl files of numpy arrays; test that path with a local file."""
    import pickle

    cfg_path, _, teacher = make_teacher(tmp_path)
    pkl = tmp_path / "model_final_zoo.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in teacher.state_dict().items()},
                     "__author__": "Detectron2 Model Zoo"}, f)
    cfg = tiny_distill_cfg(tmp_path, teacher_weights=str(pkl))
    cfg.MODEL.DISTILL.TEACHER.CONFIG = cfg_path
    m = build_model(cfg)
    w = m.teacher.head.cls_score.weight
    assert torch.equal(w, teacher.head.cls_score.weight)


@pytest.mark.parametrize("case", ["partial", "other_arch", "truncated", "missing"])
def test_bad_teacher_weights_refused(tmp_path, case):
    cfg_path, w_path, teacher = make_teacher(tmp_path)
    if case == "partial":
        sd = {k: v for k, v in teacher.state_dict().items() if not k.startswith("head.")}
        torch.save({"model": sd}, w_path)
    elif case == "other_arch":  # weights of a teacher with 64-channel FPN: shapes mismatch
        (tmp_path / "other").mkdir()
        _, w_path, _ = make_teacher(tmp_path / "other", **{"MODEL.FPN.OUT_CHANNELS": "64"})
    elif case == "truncated":
        data = open(w_path, "rb").read()
        open(w_path, "wb").write(data[: len(data) // 2])
    else:
        w_path = str(tmp_path / "nope.pth")
    cfg = tiny_distill_cfg(tmp_path, teacher_weights=w_path)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = cfg_path
    with pytest.raises(TeacherError, match="MODEL.DISTILL.TEACHER.WEIGHTS"):
        build_model(cfg)


def test_missing_teacher_config_and_weights(tmp_path):
    cfg = tiny_distill_cfg(tmp_path)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = str(tmp_path / "missing.yaml")
    with pytest.raises(TeacherError, match="MODEL.DISTILL.TEACHER.CONFIG"):
        build_model(cfg)
    cfg = tiny_distill_cfg(tmp_path)
    cfg.MODEL.DISTILL.TEACHER.ALLOW_RANDOM_INIT = False
    with pytest.raises(TeacherError, match="WEIGHTS is empty"):
        build_model(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  NO_SUCH_KEY: 1\n")
    cfg = tiny_distill_cfg(tmp_path)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = str(bad)
    with pytest.raises(TeacherError, match="could not be read"):
        build_model(cfg)


def test_num_classes_and_anchor_mismatch(tmp_path):
    cfg = tiny_distill_cfg(tmp_path, losses=("HD",))
    cfg.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.RETINANET.NUM_CLASSES", "7"]
    with pytest.raises(TeacherError, match="NUM_CLASSES"):
        build_model(cfg)
    cfg.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0]]"]
    with pytest.raises(TeacherError, match="ANCHOR_GENERATOR"):
        build_model(cfg)
    # TFD's masks are per location, from the teacher's boxes on its own anchors: other anchors
    # are fine (a step runs)
    cfg.MODEL.DISTILL.LOSSES = ["TFD"]
    model = build_model(cfg)
    assert model.teacher.anchor_generator.num_cell_anchors[0] == 3
    assert model.anchor_generator.num_cell_anchors[0] == 9
    with EventStorage(0):
        assert torch.isfinite(model(make_batch(2))["loss_tfd"])
    cfg.MODEL.DISTILL.LOSSES = ["FGD"]  # FGD needs paired FPN features only
    assert build_model(cfg).teacher.num_classes == 5


def test_fpn_level_mismatch(tmp_path):
    cfg = tiny_distill_cfg(tmp_path)
    cfg.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.RETINANET.IN_FEATURES", "['p3', 'p4', 'p5', 'p6']",
                                      "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64]]"]
    with pytest.raises(TeacherError, match=r"pair the two heads level by level.*p7 \(stride 128\)"):
        build_model(cfg)


def test_faster_rcnn_teacher_refused_for_head_distillers(tmp_path):
    cfg = tiny_distill_cfg(tmp_path)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"  # zoo name
    cfg.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.RESNETS.DEPTH", "18",
                                      "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                                      "MODEL.RESNETS.NORM", "BN"]
    with pytest.raises(TeacherError, match="HD cannot distil a GeneralizedRCNN teacher into a "
                       "RetinaNet student: it needs a dense teacher head"):
        build_model(cfg)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("MODEL.DISTILL.HD.CLS_WEIGHT", -1.0, "HD.CLS_WEIGHT"),
        ("MODEL.DISTILL.TFD.WEIGHT", float("nan"), "TFD.WEIGHT"),
        ("MODEL.DISTILL.HS.FORM", "best", "HS.FORM"),
        ("MODEL.DISTILL.TFD.BALANCE_MODE", "auto", "BALANCE_MODE"),
        ("MODEL.DISTILL.LOSSES", ["HD", "XYZ"], "LOSSES"),
    ],
)
def test_config_validation(tmp_path, key, value, match):
    cfg = tiny_distill_cfg(tmp_path)
    node, attr = cfg, key.split(".")
    for a in attr[:-1]:
        node = node[a]
    node[attr[-1]] = value
    with pytest.raises(ValueError, match=match):
        build_model(cfg)


@pytest.mark.parametrize("form,balance", [("harmony", "fixed"), ("aligned", "dynamic"),
                                          ("consistency", "fixed")])
def test_every_hs_form_and_balance_trains(tmp_path, form, balance):
    cfg = tiny_distill_cfg(tmp_path)
    cfg.MODEL.DISTILL.HS.FORM = form
    cfg.MODEL.DISTILL.TFD.BALANCE_MODE = balance
    cfg.MODEL.DISTILL.HD.BG_WEIGHT = 0.5
    m = build_model(cfg)
    m.train()
    with EventStorage(0):
        losses = m(make_batch(num_images=2, empty=(1,)))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    inputs = m.distill_inputs(make_batch(num_images=1))
    assert inputs.teacher_probs.shape[-1] == 5 and not inputs.teacher_probs.requires_grad


def test_empty_losses_builds_no_teacher(tmp_path):
    cfg = tiny_distill_cfg(tmp_path, losses=())
    cfg.MODEL.DISTILL.TEACHER.CONFIG = str(tmp_path / "absent.yaml")  # never read
    m = build_model(cfg)
    assert m.teacher is None and len(m.distillers) == 0
    m.train()
    with EventStorage(0):
        assert set(m(make_batch())) == {"loss_cls", "loss_box_reg"}
