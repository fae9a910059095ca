"""The synthetic dataset: deterministic, valid COCO, registered, atomically written."""

import hashlib
import json

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools.coco import COCO

from tbd.data import SHAPE_CLASSES, ShapesSpec, generate_shapes, render_image
from tbd.data.shapes import DEFAULT_SPLITS


def _digest(directory):
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic(tmp_path):
    spec = ShapesSpec(num_images=6, seed=5, image_size=64)
    a = generate_shapes(spec, tmp_path / "a")
    b = generate_shapes(spec, tmp_path / "b")
    assert _digest(a) == _digest(b)
    other = generate_shapes(ShapesSpec(num_images=6, seed=6, image_size=64), tmp_path / "c")
    assert _digest(other) != _digest(a)


def test_annotations_are_valid_coco(tmp_path):
    spec = ShapesSpec(num_images=20, seed=0, image_size=96)
    directory = generate_shapes(spec, tmp_path / "d")
    coco = COCO(str(directory / "annotations.json"))
    assert len(coco.getImgIds()) == 20
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) > 20  # several objects per image on average
    for ann in anns:
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
        assert 0 < ann["area"] <= w * h
        assert ann["iscrowd"] == 0
    assert {a["category_id"] for a in anns} == set(range(1, len(SHAPE_CLASSES) + 1))
    # a range of sizes: small and medium objects both present (COCO's 32^2 boundary)
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).any() and (areas >= 32**2).any()


def test_render_image_is_deterministic():
    spec = ShapesSpec(num_images=1, seed=3, image_size=64)
    img, anns = render_image(spec, 0)
    img2, anns2 = render_image(spec, 0)
    assert np.array_equal(img, img2) and anns == anns2
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    import tbd.data.shapes as shapes

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(shapes, "build_coco_dict", boom)
    with pytest.raises(RuntimeError):
        generate_shapes(ShapesSpec(num_images=2, seed=0, image_size=32), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_registration_and_lazy_generation(tiny_datasets):
    train, val = tiny_datasets
    dicts = DatasetCatalog.get(train)
    assert len(dicts) == 24 and all(d["height"] == 64 for d in dicts)
    meta = MetadataCatalog.get(train)
    assert meta.thing_classes == list(SHAPE_CLASSES)
    assert json.load(open(meta.json_file))["info"]["spec"]["seed"] == 10


def test_default_splits_registered():
    import tbd  # noqa: F401

    for name in DEFAULT_SPLITS:
        assert name in DatasetCatalog.list()
    assert DEFAULT_SPLITS["tbd_shapes_train"]["seed"] != DEFAULT_SPLITS["tbd_shapes_val"]["seed"]
