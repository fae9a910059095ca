"""Release files: student-only keys, metadata, sha naming, corruption, stock AP, tracing."""

import importlib
import json
import pickle

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import tbd
from tbd.checkpoint import ReleaseError, export_student, sha256_file, verify_release_file

from .conftest import make_batch, tiny_distill_cfg, tiny_retinanet_cfg
from .test_train_net import _run, _tiny_train_cfg


def _tool(name):
    return importlib.import_module(f"tbd_tools.{name}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_datasets):
    """A briefly trained DistillMetaArch run: (config, checkpoint, training-time AP)."""
    tmp = tmp_path_factory.mktemp("release")
    cfg = _tiny_train_cfg(tiny_distill_cfg(tmp), tiny_datasets, tmp / "out", iters=6)
    cfg.MODEL.DISTILL.TFD.WEIGHT = 1e-6
    res = _run(cfg, tmp)
    return cfg, tmp / "out" / "model_final.pth", res["bbox"]["AP"], tmp


def test_release_keys_metadata_and_name(trained, tmp_path):
    cfg, ckpt, ap, tmp = trained
    cfg_file = tmp / "cfg.yaml"
    out = tmp_path / "rel"
    rc = _tool("export_student").main(
        ["--config-file", str(cfg_file), "--checkpoint", str(ckpt), "--output", str(out)])
    assert rc == 0
    (release,) = out.glob("model_final_*.pth")
    sd = torch.load(release, weights_only=False)
    assert set(sd) == {"model", "__author__"}  # no optimizer, scheduler or iteration
    stock = build_model(tbd.student_config(cfg))
    assert list(sd["model"]) == sorted(stock.state_dict())  # exactly the stock keys
    assert sha256_file(release).startswith(release.stem.split("_")[-1])
    meta = json.loads(release.with_suffix(".json").read_text())
    for key in ("config", "teacher", "schedule", "AP", "train_s_per_iter", "commit", "sha256"):
        assert key in meta, key
    assert meta["teacher"]["losses"] == ["HD", "TFD"]
    assert meta["AP"] == pytest.approx(ap)
    # the release config is accepted by stock Detectron2 (no MODEL.DISTILL keys)
    stock_cfg = get_cfg()
    stock_cfg.merge_from_file(str(out / f"{release.stem}_config.yaml"))
    assert stock_cfg.MODEL.META_ARCHITECTURE == "RetinaNet"


def test_stock_detectron2_reproduces_training_ap(trained, tmp_path):
    cfg, ckpt, ap, tmp = trained
    out = tmp_path / "rel"
    _tool("export_student").main(["--config-file", str(tmp / "cfg.yaml"), "--checkpoint",
                                  str(ckpt), "--output", str(out)])
    (release,) = out.glob("model_final_*.pth")
    assert _tool("verify_release").main([str(release), "--tolerance", "0"]) == 0


def test_corrupted_and_truncated_release(trained, tmp_path):
    cfg, ckpt, _, tmp = trained
    path = export_student(ckpt, tbd.student_config(cfg), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReleaseError, match="corrupted or truncated"):
        verify_release_file(path)
    renamed = tmp_path / "model.pth"
    renamed.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReleaseError, match="cannot be read"):
        verify_release_file(renamed)


def test_wrapper_checkpoint_conversion(tmp_path):
    cfg = tiny_retinanet_cfg()
    student = build_model(cfg)
    wrapper = {f"student.{k}": v for k, v in student.state_dict().items()}
    wrapper.update({"teacher.backbone.x": torch.zeros(1), "adapters.p3.weight": torch.zeros(1)})
    ckpt = tmp_path / "wrapper.pth"
    torch.save({"model": wrapper, "optimizer": {}}, ckpt)
    path = export_student(ckpt, cfg, tmp_path / "rel")
    loaded = torch.load(path, weights_only=False)["model"]
    assert all(torch.equal(loaded[k], v) for k, v in student.state_dict().items())


def test_export_refuses_wrong_config(tmp_path):
    ckpt = tmp_path / "m.pth"
    torch.save({"model": build_model(tiny_retinanet_cfg()).state_dict()}, ckpt)
    with pytest.raises(ReleaseError, match="does not match"):
        export_student(ckpt, tiny_retinanet_cfg(fpn_channels=32), tmp_path / "rel")
    assert not list(tmp_path.rglob("model_final_*"))  # nothing written on failure
    with open(tmp_path / "p.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(ReleaseError):
        export_student(tmp_path / "p.pkl", tiny_retinanet_cfg(), tmp_path / "rel")


def test_traced_student_matches_eager(trained, tmp_path):
    from tbd.checkpoint import trace_student

    cfg, ckpt, _, _ = trained
    model = build_model(tbd.student_config(cfg))
    DetectionCheckpointer(model).load(str(ckpt))
    torch.nn.init.constant_(model.head.cls_score.bias, 0.0)  # enough boxes above threshold
    images = [{"image": b["image"]} for b in make_batch(3)]
    traced, adapter = trace_student(model, images[:1])
    from detectron2.export import TracingAdapter

    for img in images:  # also images the trace did not see
        a = TracingAdapter(model, [img])
        eager = a(*a.flattened_inputs)
        out = traced(*a.flattened_inputs)
        assert len(eager) == len(out) and eager[0].shape[0] > 0
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(eager, out))
