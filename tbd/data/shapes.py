"""Deterministic synthetic detection dataset ("shapes") in COCO format.

Images hold shapes of several classes on textured, cluttered backgrounds. Shape colour carries no
class information, sizes span small to large objects, aspect ratios vary, and later shapes
occlude earlier ones. Annotations are the tight boxes of each shape's *visible* pixels (COCO's
modal convention); a shape that is less than ``min_visible`` visible is dropped, so heavily
occluded objects are neither annotated nor penalised.

Generation is a pure function of ``(num_images, seed, image_size, max_objects, version)``: the
same parameters give byte-identical images and json. Files go to a cache directory keyed by a
hash of those parameters and are written atomically (temporary folder, then rename), so an
interrupted generation never leaves a half-written dataset behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "rectangle", "triangle", "cross", "ring")
# Bump when the generator's output changes, so old caches are not reused.
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class ShapesSpec:
    """Parameters that fully determine a generated split."""

    num_images: int
    seed: int
    image_size: int = 128
    max_objects: int = 6
    min_size: int = 10
    max_size: int = 64
    min_visible: float = 0.5
    max_clutter_lines: int = 3  # distractor lines per image: uniform in [min(2, max), max]
    max_noise: float = 20.0  # std of the background noise: uniform in [min(10, max), max]
    version: int = GENERATOR_VERSION

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def default_root() -> Path:
    """Cache root: ``$TBD_DATASETS``, else ``$DETECTRON2_DATASETS/tbd_shapes``, else
    ``datasets/tbd_shapes`` (relative to the working directory, as Detectron2 does)."""
    if os.environ.get("TBD_DATASETS"):
        return Path(os.environ["TBD_DATASETS"])
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets")) / "tbd_shapes"


def _background(rng: np.random.Generator, size: int, max_lines: int = 8,
                max_noise: float = 35.0) -> np.ndarray:
    """Textured background: colour gradient + blurred noise + clutter lines and dots."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(30, 220, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    noise = rng.normal(0, rng.uniform(min(10.0, max_noise), max_noise), size=(size, size, 3))
    noise = noise.astype(np.float32)
    ksize = int(rng.choice([1, 3, 5]))
    if ksize > 1:
        noise = cv2.GaussianBlur(noise, (ksize, ksize), 0)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    # Clutter: thin lines and small dots that are not objects.
    for _ in range(int(rng.integers(min(2, max_lines), max_lines + 1))):
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.line(img, p1, p2, colour, int(rng.integers(1, 3)), lineType=cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 6))):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(img, centre, int(rng.integers(1, 4)), colour, -1, lineType=cv2.LINE_AA)
    return img


def _shape_mask(rng: np.random.Generator, cls: str, size: int, w: int, h: int) -> np.ndarray:
    """Binary mask (uint8) of one shape of class ``cls`` inside a w x h box at a random place."""
    mask = np.zeros((size, size), np.uint8)
    # up to a quarter of the shape may fall outside the image (truncated objects)
    x0 = int(rng.integers(-w // 4, max(size - 3 * w // 4, -w // 4) + 1))
    y0 = int(rng.integers(-h // 4, max(size - 3 * h // 4, -h // 4) + 1))
    cx, cy = x0 + w / 2.0, y0 + h / 2.0
    if cls == "circle":
        cv2.ellipse(mask, (int(cx), int(cy)), (max(w // 2, 1), max(h // 2, 1)), 0, 0, 360, 1, -1)
    elif cls == "rectangle":
        cv2.rectangle(mask, (x0, y0), (x0 + w - 1, y0 + h - 1), 1, -1)
    elif cls == "triangle":
        apex = x0 + int(rng.uniform(0.2, 0.8) * w)
        pts = np.array([[apex, y0], [x0, y0 + h - 1], [x0 + w - 1, y0 + h - 1]], np.int32)
        if rng.random() < 0.5:  # upside down
            pts[:, 1] = 2 * y0 + h - 1 - pts[:, 1]
        cv2.fillPoly(mask, [pts], 1)
    elif cls == "cross":
        tw, th = max(w // 3, 1), max(h // 3, 1)
        cv2.rectangle(mask, (x0, int(cy - th / 2)), (x0 + w - 1, int(cy + th / 2)), 1, -1)
        cv2.rectangle(mask, (int(cx - tw / 2), y0), (int(cx + tw / 2), y0 + h - 1), 1, -1)
    elif cls == "ring":
        axes = (max(w // 2, 1), max(h // 2, 1))
        thickness = max(int(min(w, h) * rng.uniform(0.12, 0.25)), 1)
        cv2.ellipse(mask, (int(cx), int(cy)), axes, 0, 0, 360, 1, thickness)
    else:  # pragma: no cover - guarded by SHAPE_CLASSES
        raise ValueError(f"unknown shape class {cls!r}")
    return mask


def render_image(spec: ShapesSpec, index: int) -> tuple[np.ndarray, list[dict]]:
    """Render image ``index`` of a split: BGR uint8 array and its annotations (COCO bbox xywh)."""
    rng = np.random.default_rng([spec.seed, index, spec.version])
    size = spec.image_size
    img = _background(rng, size, spec.max_clutter_lines, spec.max_noise)
    owner = np.full((size, size), -1, np.int32)  # which object owns each pixel (occlusion)
    objects = []
    for k in range(int(rng.integers(1, spec.max_objects + 1))):
        cls_id = int(rng.integers(len(SHAPE_CLASSES)))
        scale = float(np.exp(rng.uniform(np.log(spec.min_size), np.log(spec.max_size))))
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        w = min(max(int(round(scale * np.sqrt(aspect))), 3), size)
        h = min(max(int(round(scale / np.sqrt(aspect))), 3), size)
        mask = _shape_mask(rng, SHAPE_CLASSES[cls_id], size, w, h).astype(bool)
        if not mask.any():
            continue
        colour = rng.integers(0, 256, 3).astype(np.float32)
        shade = rng.uniform(0.75, 1.0, size=(size, size, 1)).astype(np.float32)
        img[mask] = np.clip(colour[None, :] * shade[mask], 0, 255).astype(np.uint8)
        owner[mask] = k
        objects.append((k, cls_id, int(mask.sum())))
    annotations = []
    for k, cls_id, full_area in objects:
        visible = owner == k
        area = int(visible.sum())
        if area < spec.min_visible * full_area or area < 4:
            continue
        ys, xs = np.nonzero(visible)
        x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        annotations.append(
            {
                "category_id": cls_id + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": area,
                "iscrowd": 0,
            }
        )
    return img, annotations


def build_coco_dict(spec: ShapesSpec, images: list[tuple[str, list[dict]]]) -> dict:
    """Assemble a COCO json dict from per-image file names and annotations."""
    coco: dict = {
        "info": {"description": "TBD synthetic shapes", "spec": asdict(spec)},
        "images": [],
        "annotations": [],
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SHAPE_CLASSES)
        ],
    }
    ann_id = 1
    for image_id, (file_name, anns) in enumerate(images, start=1):
        coco["images"].append(
            {"id": image_id, "file_name": file_name, "width": spec.image_size,
             "height": spec.image_size}
        )
        for ann in anns:
            coco["annotations"].append({"id": ann_id, "image_id": image_id, **ann})
            ann_id += 1
    return coco


def generate_shapes(spec: ShapesSpec, out_dir: str | os.PathLike) -> Path:
    """Write ``spec`` to ``out_dir`` (images/ + annotations.json) unless already complete.

    Returns the directory. Written into a temporary sibling and renamed, so a crash leaves either
    nothing or a complete dataset.
    """
    out_dir = Path(out_dir)
    if (out_dir / "annotations.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        records = []
        for i in range(spec.num_images):
            img, anns = render_image(spec, i)
            file_name = f"{i:06d}.png"
            cv2.imwrite(str(tmp / "images" / file_name), img)
            records.append((file_name, anns))
        with open(tmp / "annotations.json", "w") as f:
            json.dump(build_coco_dict(spec, records), f)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "annotations.json").is_file():  # not a concurrent winner
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Generated %d synthetic images in %s", spec.num_images, out_dir)
    return out_dir


def shapes_dir(name: str, spec: ShapesSpec, root: str | os.PathLike | None = None) -> Path:
    """Cache directory of a registered split."""
    return Path(root if root is not None else default_root()) / f"{name}_{spec.digest()}"


def register_shapes(
    name: str,
    num_images: int,
    seed: int,
    image_size: int = 128,
    root: str | os.PathLike | None = None,
    **spec_kwargs,
) -> ShapesSpec:
    """Register a synthetic split in DatasetCatalog/MetadataCatalog; images are made lazily.

    The first ``DatasetCatalog.get(name)`` (or :func:`ensure_generated`) writes the files; later
    calls read the cache. ``root=None`` resolves :func:`default_root` at that time.
    """
    spec = ShapesSpec(num_images=num_images, seed=seed, image_size=image_size, **spec_kwargs)

    def _load():
        directory = ensure_generated(name)
        return load_coco_json(str(directory / "annotations.json"), str(directory / "images"), name)

    DatasetCatalog.register(name, _load)
    MetadataCatalog.get(name).set(
        thing_classes=list(SHAPE_CLASSES),
        evaluator_type="coco",
        tbd_shapes_spec=spec,
        tbd_shapes_root=None if root is None else str(root),
    )
    return spec


def is_shapes_dataset(name: str) -> bool:
    return name in DatasetCatalog.list() and hasattr(MetadataCatalog.get(name), "tbd_shapes_spec")


def ensure_generated(name: str) -> Path:
    """Generate a registered synthetic split if needed; set its ``json_file`` metadata.

    COCOEvaluator reads ``json_file`` from the metadata, so call this before building one.
    """
    meta = MetadataCatalog.get(name)
    if not hasattr(meta, "tbd_shapes_spec"):
        raise KeyError(f"Dataset '{name}' is not a registered TBD synthetic dataset.")
    directory = generate_shapes(meta.tbd_shapes_spec, shapes_dir(name, meta.tbd_shapes_spec,
                                                                 meta.tbd_shapes_root))
    json_file = str(directory / "annotations.json")
    if getattr(meta, "json_file", None) != json_file:
        # Metadata values are write-once; the path is deterministic so a mismatch means the
        # cache root changed between calls (e.g. TBD_DATASETS was edited).
        if hasattr(meta, "json_file"):
            raise RuntimeError(
                f"Dataset '{name}': cache moved from {meta.json_file} to {json_file}"
            )
        meta.set(json_file=json_file, image_root=str(directory / "images"))
    return directory


# Default splits. Train and val use different seeds, so they share no image. Sizes are chosen for
# CPU work at 128x128: the demo uses the "mini" splits, benchmarks the full ones.
DEFAULT_SPLITS = {
    "tbd_shapes_train": dict(num_images=3000, seed=0),
    "tbd_shapes_val": dict(num_images=500, seed=1),
    "tbd_shapes_mini_train": dict(num_images=600, seed=2),
    "tbd_shapes_mini_val": dict(num_images=100, seed=3),
}
# The demo's easier task: 64x64 images, at most 3 objects of 12-40 px, little clutter and noise,
# so that a small teacher trains to a useful AP and students learn within minutes on 2 CPU cores.
_DEMO_TASK = dict(image_size=64, max_objects=3, min_size=12, max_size=40, max_clutter_lines=1,
                  max_noise=10.0)
DEFAULT_SPLITS.update({
    "tbd_demo_train": dict(num_images=2000, seed=20, **_DEMO_TASK),
    "tbd_demo_test": dict(num_images=200, seed=21, **_DEMO_TASK),
    # The accuracy benchmark v2 (projects/TBD/benchmarks/protocols/): it trains on
    # tbd_demo_train, makes every choice on tbd_bench_tune and reports on tbd_bench_test. Their
    # own seeds: no image is shared with the demo's splits, whose test split was looked at while
    # the demo was set up.
    "tbd_bench_tune": dict(num_images=500, seed=22, **_DEMO_TASK),
    "tbd_bench_test": dict(num_images=500, seed=23, **_DEMO_TASK),
})


def register_default_shapes() -> None:
    """Register :data:`DEFAULT_SPLITS` (idempotent)."""
    for name, kwargs in DEFAULT_SPLITS.items():
        if name not in DatasetCatalog.list():
            register_shapes(name, **kwargs)
