"""Checkpoint helpers: student-only loading, and model-zoo-style release files.

A release file holds the student's weights only, under stock RetinaNet keys (no teacher, no
adapters, no optimizer state), so stock Detectron2 (``build_model`` + ``DetectionCheckpointer``)
loads it with the student config that is written beside it. Its name carries the first 8 hex
digits of its sha256, as Detectron2's model zoo does, and :func:`verify_release_file` checks them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode

logger = logging.getLogger(__name__)

# Prefix of the distillation-only parameters (adapters, FGD blocks) in DistillMetaArch's state.
DISTILLER_PREFIX = "distillers."
# Prefixes of non-student entries in other wrapper checkpoints (d2go/mmrazor-style wrappers).
FOREIGN_PREFIXES = ("teacher.", "distillers.", "distiller.", "adapters.", "_teacher.")
# Prefixes under which wrappers nest the student; stripped.
WRAPPER_PREFIXES = ("module.", "student.", "model.")


class ReleaseError(ValueError):
    """A release or training checkpoint cannot be used; the message names the file and why."""


def strip_distiller_keys(state_dict: dict) -> dict:
    """Drop the distillation-only entries, leaving stock RetinaNet keys."""
    return {k: v for k, v in state_dict.items() if not k.startswith(DISTILLER_PREFIX)}


class StudentCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer for a plain student that silently drops ``distillers.*`` keys.

    Used by ``--eval-only``, which builds the student alone (no teacher) and loads a training
    checkpoint of DistillMetaArch into it.
    """

    def _load_model(self, checkpoint):
        checkpoint["model"] = strip_distiller_keys(checkpoint["model"])
        return super()._load_model(checkpoint)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    """Keys and shapes of the stock RetinaNet built from ``student_cfg`` (on CPU, no weights)."""
    from detectron2.modeling import build_model

    cfg = student_cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def export_student(checkpoint: str | os.PathLike, student_cfg: CfgNode,
                   out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``model_final_<sha8>.pth`` (+ ``.json`` metadata, + student ``config.yaml``).

    The keys must match the stock RetinaNet of ``student_cfg`` exactly (names and shapes),
    otherwise ReleaseError. Files are written to a temporary name and renamed: an interrupted
    export leaves no half-written release.
    """
    sd = student_state_dict(_read_checkpoint(checkpoint))
    expected = stock_keys(student_cfg)
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    bad = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != expected[k])
    if missing or extra or bad:
        raise ReleaseError(
            f"{checkpoint}: does not match the student config's RetinaNet: {len(missing)} missing "
            f"{missing[:5]}, {len(extra)} unexpected {extra[:5]}, {len(bad)} with other shapes "
            f"{bad[:5]}. Is this the right config for this checkpoint?"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"model": {k: sd[k].detach().cpu() for k in sorted(sd)},
                    "__author__": "TBD (tbd-detectron2)"}, tmp)
        sha = sha256_file(tmp)
        final = out / f"model_final_{sha[:8]}.pth"
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = {"file": final.name, "sha256": sha, "source_checkpoint": str(checkpoint),
            **(metadata or {})}
    (out / f"{final.stem}.json").write_text(json.dumps(meta, indent=2))
    (out / f"{final.stem}_config.yaml").write_text(student_cfg.dump())
    logger.info("Released %s (%d tensors)", final, len(sd))
    return final


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
