"""Shared fixtures: tiny CPU models, small images and a tiny synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.structures import Boxes, Instances

import tbd
from tbd.data import register_shapes, render_image
from tbd.data.shapes import ShapesSpec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "projects" / "TBD" / "configs"
SHAPES_BASE = CONFIGS / "shapes" / "Base-RetinaNet-Shapes.yaml"

TINY_SIZE = 64


def tiny_retinanet_cfg(fpn_channels: int = 16, num_convs: int = 1, depth: int = 18) -> CfgNode:
    """A small RetinaNet on 64-px images: R18, narrow FPN, few head convs, CPU."""
    cfg = get_cfg()
    tbd.add_tbd_config(cfg)
    cfg.merge_from_file(str(SHAPES_BASE))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.FPN.OUT_CHANNELS = fpn_channels
    cfg.MODEL.RETINANET.NUM_CONVS = num_convs
    cfg.INPUT.MIN_SIZE_TRAIN = (TINY_SIZE,)
    cfg.INPUT.MAX_SIZE_TRAIN = TINY_SIZE
    cfg.INPUT.MIN_SIZE_TEST = TINY_SIZE
    cfg.INPUT.MAX_SIZE_TEST = TINY_SIZE
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def write_cfg(cfg: CfgNode, path: Path) -> str:
    path.write_text(cfg.dump())
    return str(path)


def save_weights(model: torch.nn.Module, path: Path) -> str:
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def make_teacher(folder: Path, **overrides) -> tuple[str, str, torch.nn.Module]:
    """A tiny teacher (FPN 32, 2 convs) with random weights: (config path, weights path, model)."""
    from detectron2.modeling import build_model

    tcfg = tiny_retinanet_cfg(fpn_channels=32, num_convs=2)
    for k, v in overrides.items():
        tcfg.merge_from_list([k, v])
    teacher = build_model(tcfg)
    return write_cfg(tcfg, folder / "t.yaml"), save_weights(teacher, folder / "t.pth"), teacher


def tiny_distill_cfg(tmp_path: Path, losses=("HD", "TFD"), teacher_weights: str = "") -> CfgNode:
    """A DistillMetaArch config: tiny student (FPN 16) and tiny teacher (FPN 32, 2 convs)."""
    teacher_cfg = tiny_retinanet_cfg(fpn_channels=32, num_convs=2)
    student = tiny_retinanet_cfg()
    student.MODEL.META_ARCHITECTURE = "DistillMetaArch"
    student.MODEL.DISTILL.LOSSES = list(losses)
    student.MODEL.DISTILL.TEACHER.CONFIG = write_cfg(teacher_cfg, tmp_path / "teacher.yaml")
    student.MODEL.DISTILL.TEACHER.WEIGHTS = teacher_weights
    student.MODEL.DISTILL.TEACHER.ALLOW_RANDOM_INIT = not teacher_weights
    # Tiny teachers are untrained (AP 0): the check before training would refuse them.
    # tests/test_teacher_check.py tests the check itself.
    student.MODEL.DISTILL.TEACHER.EVAL_BEFORE_TRAIN = False
    student.MODEL.DISTILL.WARMUP_ITERS = 0
    return student


def make_batch(num_images: int = 2, size: int = TINY_SIZE, seed: int = 0, empty=()) -> list:
    """Training inputs from the synthetic generator; images listed in ``empty`` have no GT."""
    spec = ShapesSpec(num_images=num_images, seed=seed, image_size=size, max_size=size // 2)
    batch = []
    for i in range(num_images):
        img, anns = render_image(spec, i)
        inst = Instances((size, size))
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                  a["bbox"][1] + a["bbox"][3]] for a in anns]
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.tensor([a["category_id"] - 1 for a in anns], dtype=torch.long)
        if i in empty:
            inst = inst[:0]
        batch.append({"image": torch.from_numpy(img).permute(2, 0, 1).float().contiguous(),
                      "instances": inst, "height": size, "width": size})
    return batch


@pytest.fixture(scope="session")
def tiny_datasets(tmp_path_factory) -> tuple[str, str]:
    """A 24-image train and 8-image val synthetic split at 64 px, in a temporary cache."""
    root = tmp_path_factory.mktemp("shapes")
    names = ("tbd_test_tiny_train", "tbd_test_tiny_val")
    from detectron2.data import DatasetCatalog

    if names[0] not in DatasetCatalog.list():
        register_shapes(names[0], num_images=24, seed=10, image_size=TINY_SIZE, root=root,
                        max_size=32)
        register_shapes(names[1], num_images=8, seed=11, image_size=TINY_SIZE, root=root,
                        max_size=32)
    return names


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
