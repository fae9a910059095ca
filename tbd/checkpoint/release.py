"""Release files: the student's weights alone, under stock Detectron2 keys, that stock Detectron2
loads; their export, verification and a traced export.

A release file holds the student's weights only (no teacher, no adapters, no optimizer state), so
stock Detectron2 (``build_model`` + ``DetectionCheckpointer``) loads it with the student config
written beside it. Its name carries the first 8 hex digits of its sha256, as Detectron2's model zoo
does, and :func:`verify_release_file` checks them.

Stock Detectron2 builds FCOS only from a LazyConfig, so an FCOS release also has
``<name>_lazy.py``: ``LazyConfig.load(it, "model")`` + ``instantiate`` gives the stock FCOS
(its backbone built by stock ``build_backbone`` from the yaml beside it, which then carries no
``MODEL.FCOS`` keys, unknown to stock ``get_cfg()``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import torch
from detectron2.config import CfgNode

from ..config import portable_dump
from .io import atomic_write, atomic_write_text, json_safe, sha256_file
from .training import CheckpointError

logger = logging.getLogger(__name__)

# Prefixes of non-student entries in other wrapper checkpoints (d2go/mmrazor-style wrappers).
FOREIGN_PREFIXES = ("teacher.", "distillers.", "distiller.", "adapters.", "_teacher.")
# Prefixes under which wrappers nest the student; stripped.
WRAPPER_PREFIXES = ("module.", "student.", "model.")


class ReleaseError(CheckpointError):
    """A release or training checkpoint cannot be released; the message names the file and why."""


def _read_checkpoint(path: str | os.PathLike) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - corrupted, truncated, not a checkpoint
        raise ReleaseError(
            f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}). "
            "Is the file complete (not truncated by an interrupted copy or download)?"
        ) from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj  # a bare state dict
    raise ReleaseError(f"{path}: no model state dict found (expected a 'model' entry).")


def student_state_dict(state_dict: dict) -> dict:
    """Student weights from a DistillMetaArch or wrapper checkpoint, under stock keys."""
    out = {}
    for k, v in state_dict.items():
        for p in WRAPPER_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        if k.startswith(FOREIGN_PREFIXES):
            continue
        out[k] = v
    return out


def stock_keys(student_cfg: CfgNode) -> dict[str, tuple]:
    """Keys and shapes of the stock detector built from ``student_cfg`` (on CPU, no weights)."""
    from detectron2.modeling import build_model

    cfg = student_cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def export_student(checkpoint: str | os.PathLike, student_cfg: CfgNode,
                   out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``model_final_<sha8>.pth`` (+ ``.json`` metadata, + student ``config.yaml``).

    The keys must match the stock detector of ``student_cfg`` exactly (names and shapes),
    otherwise ReleaseError. Files are written to a temporary name and renamed: an interrupted
    export leaves no half-written release. An FCOS student also gets ``<name>_lazy.py``.
    """
    sd = student_state_dict(_read_checkpoint(checkpoint))
    expected = stock_keys(student_cfg)
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    bad = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != expected[k])
    if missing or extra or bad:
        raise ReleaseError(
            f"{checkpoint}: does not match the student config's "
            f"{student_cfg.MODEL.META_ARCHITECTURE}: {len(missing)} missing "
            f"{missing[:5]}, {len(extra)} unexpected {extra[:5]}, {len(bad)} with other shapes "
            f"{bad[:5]}. Is this the right config for this checkpoint?"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()  # serialised once, so the name can carry the content's sha
    torch.save({"model": {k: sd[k].detach().cpu() for k in sorted(sd)},
                "__author__": "TBD (tbd-detectron2)"}, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    final = out / f"model_final_{sha[:8]}.pth"
    atomic_write(str(final), "wb", lambda f: f.write(data))
    meta = {"file": final.name, "sha256": sha, "source_checkpoint": str(checkpoint),
            **(metadata or {})}
    # strict JSON: an undefined metric (NaN, e.g. APl without large objects) is written as null
    atomic_write_text(str(out / f"{final.stem}.json"),
                      json.dumps(json_safe(meta), indent=2, allow_nan=False))
    yaml_cfg = student_cfg
    if student_cfg.MODEL.META_ARCHITECTURE == "FCOS":
        yaml_cfg = student_cfg.clone()
        yaml_cfg.defrost()
        del yaml_cfg.MODEL["FCOS"]
        atomic_write_text(str(out / f"{final.stem}_lazy.py"),
                          fcos_lazy_config(student_cfg, f"{final.stem}_config.yaml"))
    atomic_write_text(str(out / f"{final.stem}_config.yaml"), portable_dump(yaml_cfg))
    logger.info("Released %s (%d tensors)", final, len(sd))
    return final


def fcos_lazy_config(cfg: CfgNode, yaml_name: str) -> str:
    """The text of a LazyConfig file that builds the stock FCOS of ``cfg`` with stock Detectron2
    only: ``model = L(FCOS)(...)``, its backbone from the yaml ``yaml_name`` beside it."""
    f = cfg.MODEL.FCOS
    channels = cfg.MODEL.FPN.OUT_CHANNELS
    args = {
        "head_in_features": list(f.IN_FEATURES), "num_classes": f.NUM_CLASSES,
        "center_sampling_radius": f.CENTER_SAMPLING_RADIUS,
        "focal_loss_alpha": f.FOCAL_LOSS_ALPHA, "focal_loss_gamma": f.FOCAL_LOSS_GAMMA,
        "test_score_thresh": f.SCORE_THRESH_TEST, "test_topk_candidates": f.TOPK_CANDIDATES_TEST,
        "test_nms_thresh": f.NMS_THRESH_TEST,
        "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN), "pixel_std": list(cfg.MODEL.PIXEL_STD),
    }
    lines = "".join(f"    {k}={v!r},\n" for k, v in args.items())
    return f'''"""Stock Detectron2 FCOS of this release (written by the TBD project's export).

    from detectron2.config import LazyConfig, instantiate
    model = instantiate(LazyConfig.load("<this file>", "model"))

The backbone is stock ``build_backbone`` on ``{yaml_name}`` (beside this file), which also holds
the input and dataset settings; load the weights with ``DetectionCheckpointer(model).load(...)``.
"""

import os

from detectron2.config import LazyCall as L
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead


def _backbone(yaml_path):
    cfg = get_cfg()
    cfg.merge_from_file(yaml_path)
    return build_backbone(cfg)


model = L(FCOS)(
    backbone=L(_backbone)(yaml_path=os.path.join(os.path.dirname(__file__), {yaml_name!r})),
    head=L(FCOSHead)(
        input_shape=[ShapeSpec(channels={channels})] * {len(f.IN_FEATURES)},
        conv_dims=[{channels}] * {f.NUM_CONVS},
        num_classes={f.NUM_CLASSES},
        norm={f.NORM!r},
        prior_prob={f.PRIOR_PROB!r},
    ),
{lines})
'''


def verify_release_file(path: str | os.PathLike) -> str:
    """Check that a release file is readable and that its name's sha suffix matches its content.

    Returns the sha256. Raises ReleaseError with the file name and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise ReleaseError(f"{path}: release file not found.")
    sha = sha256_file(path)
    stem = path.stem
    if stem.startswith("model_final_"):
        suffix = stem[len("model_final_"):]
        if not sha.startswith(suffix):
            raise ReleaseError(
                f"{path}: content sha256 {sha[:8]}... does not match the name's {suffix}: the file "
                "is corrupted or truncated; download or export it again."
            )
    _read_checkpoint(path)
    return sha


def trace_student(model: torch.nn.Module, sample_inputs: list[dict]
                  ) -> tuple[torch.jit.ScriptModule, object]:
    """torch.jit.trace the student's inference (no post-processing) via TracingAdapter.

    Returns the traced module and the adapter (whose ``flattened_inputs`` feed it and whose
    ``outputs_schema`` rebuilds Instances). Needs ``detectron2.export`` importable: official
    Detectron2, or v0.6 with scripts/setup.sh's install edit 7 (caffe2 made optional).
    """
    from detectron2.export import TracingAdapter

    model.eval()
    adapter = TracingAdapter(model, sample_inputs)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    return traced, adapter
