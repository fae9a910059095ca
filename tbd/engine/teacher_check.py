"""The teacher check before training (``MODEL.DISTILL.TEACHER.EVAL_BEFORE_TRAIN``).

The most common silent failure of distillation is a teacher that is wrong in a way no shape check
sees: weights that did not load (a random teacher), a class mapping other than the student's data,
or another input format. Such a teacher still produces outputs, the student still trains, and ends
at (or below) the baseline. The check evaluates the teacher on the first images of the test set as
it sees them during distillation (the student's input, in the teacher's own channel order and
normalisation) and refuses to train, before anything is written, when its AP is below a floor.
"""

from __future__ import annotations

import logging
import math
import tempfile
from typing import Optional

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator
from torch import nn
from tqdm import tqdm

from ..data import ensure_generated, is_shapes_dataset
from ..modeling.teacher import TeacherError

logger = logging.getLogger(__name__)

PREFIX = "teacher_check"


def _teacher_outputs(model: nn.Module, inputs: list[dict]) -> list[dict]:
    """The teacher's detections on the student's mapped inputs, channels flipped to its format."""
    if model.teacher_input_format != model.input_format:
        inputs = [dict(x, image=x["image"].flip(0)) for x in inputs]
    with torch.no_grad():
        return model.teacher(inputs)


def skip_reason(cfg: CfgNode, model: nn.Module) -> Optional[str]:
    """Why the check does not run for this config, or None when it does."""
    if getattr(model, "teacher", None) is None:
        return "no teacher (distillation is off)"
    t = cfg.MODEL.DISTILL.TEACHER
    if not t.EVAL_BEFORE_TRAIN:
        return "MODEL.DISTILL.TEACHER.EVAL_BEFORE_TRAIN is False"
    if not cfg.DATASETS.TEST:
        return "DATASETS.TEST is empty (name a labelled held-out set to have the teacher checked)"
    if not t.WEIGHTS:
        return "the teacher is random (ALLOW_RANDOM_INIT without WEIGHTS)"
    return None


def check_teacher(cfg: CfgNode, model: nn.Module) -> Optional[dict]:
    """Evaluate the teacher of ``model`` and return ``{"dataset", "images", "min_ap", "bbox"}``,
    or None when skipped (the reason is logged). Raises TeacherError below the AP floor. Writes
    nothing: the evaluator works in a temporary folder.

    Every process evaluates the same images on its own (no collective), so all of them reach the
    same verdict.
    """
    reason = skip_reason(cfg, model)
    if reason is not None:
        logger.info("Teacher check skipped: %s.", reason)
        return None
    t = cfg.MODEL.DISTILL.TEACHER
    name = cfg.DATASETS.TEST[0]
    if is_shapes_dataset(name):
        ensure_generated(name)  # COCOEvaluator reads the json_file metadata
    dicts = DatasetCatalog.get(name)
    if t.EVAL_MAX_IMAGES:
        dicts = dicts[: t.EVAL_MAX_IMAGES]
    # Not Detectron2's InferenceSampler, which would give each process a shard.
    loader = build_detection_test_loader(dicts, mapper=DatasetMapper(cfg, is_train=False),
                                         sampler=torch.utils.data.SequentialSampler(dicts))
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="tbd_teacher_check") as tmp:
            evaluator = COCOEvaluator(name, output_dir=tmp, distributed=False)
            evaluator.reset()
            for inputs in tqdm(loader, desc=f"Teacher check on {name}", unit="img",
                               total=len(dicts), leave=False, disable=None):
                evaluator.process(inputs, _teacher_outputs(model, inputs))
            results = evaluator.evaluate(img_ids=[d["image_id"] for d in dicts])
    finally:
        model.train(was_training)
    bbox = dict(results.get("bbox", {}))
    ap = bbox.get("AP", float("nan"))
    none = not (isinstance(ap, float) and math.isfinite(ap))  # no detection at all
    if none:
        ap = 0.0
    logger.info("%s on the first %d images of %s: %s", PREFIX, len(dicts), name,
                ", ".join(f"{PREFIX}/{k}={v:.1f}" for k, v in bbox.items()
                          if k in ("AP", "AP50", "AP75")))
    if ap < t.EVAL_MIN_AP:
        raise TeacherError(
            f"The teacher scores bbox AP {ap:.1f}{' (no detections)' if none else ''} on the "
            f"first {len(dicts)} images of {name}, "
            f"below MODEL.DISTILL.TEACHER.EVAL_MIN_AP={t.EVAL_MIN_AP:g}: distilling it would "
            "teach the student its mistakes. Check that MODEL.DISTILL.TEACHER.WEIGHTS is the "
            "trained teacher (see its load report above), that its classes are the dataset's "
            "(NUM_CLASSES and the order of thing_classes), and its INPUT.FORMAT and "
            "MODEL.PIXEL_MEAN/PIXEL_STD. If this teacher really is that weak, lower "
            "EVAL_MIN_AP or set MODEL.DISTILL.TEACHER.EVAL_BEFORE_TRAIN False.")
    return {"dataset": name, "images": len(dicts), "min_ap": float(t.EVAL_MIN_AP), "bbox": bbox}
