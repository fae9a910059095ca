"""Checkpoint helpers: atomic training checkpoints, student-only loading, release files.

Training checkpoints (:class:`TrainingCheckpointer`) are written to a hidden temporary file in the
output folder, fsynced and renamed, and ``last_checkpoint`` is replaced the same way, so a process
killed at any moment leaves the previous complete checkpoint in place; ``--resume`` picks the
newest complete one.

A release file holds the student's weights only, under stock RetinaNet keys (no teacher, no
adapters, no optimizer state), so stock Detectron2 (``build_model`` + ``DetectionCheckpointer``)
loads it with the student config that is written beside it. Its name carries the first 8 hex
digits of its sha256, as Detectron2's model zoo does, and :func:`verify_release_file` checks them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
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


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported on every filesystem
    finally:
        os.close(fd)


def _temporary_name(path: str) -> str:
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.tmp-{os.getpid()}")


def _atomic_write(path: str, mode: str, write) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, then rename over ``path``."""
    tmp = _temporary_name(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(os.path.dirname(path))


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` that leaves either the previous file or the complete new one."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, "w", lambda f: f.write(text))


def remove_stale_temporaries(save_dir: str) -> list[str]:
    """Delete partial files left by a process killed while saving; return their names."""
    if not os.path.isdir(save_dir):
        return []
    stale = sorted(n for n in os.listdir(save_dir) if n.startswith(".") and ".tmp-" in n)
    for n in stale:
        os.unlink(os.path.join(save_dir, n))
    if stale:
        logger.warning("Removed %d partial file(s) of an interrupted save in %s: %s",
                       len(stale), save_dir, stale)
    return stale


def is_complete_checkpoint(path: str) -> bool:
    """True if ``path`` is a complete ``torch.save`` zip archive (its central directory reads).

    A truncated file has no end-of-archive record. Files in other formats (Detectron2's .pkl) are
    assumed complete.
    """
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    if not path.endswith(".pth"):
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return len(z.namelist()) > 0
    except (zipfile.BadZipFile, OSError):
        return False


class TrainingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves and a resume that skips incomplete files.

    Remote save folders (``scheme://``) fall back to the stock, non-atomic save.
    """

    def _local(self) -> bool:
        return bool(self.save_dir) and "://" not in self.save_dir

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._local():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        os.makedirs(self.save_dir, exist_ok=True)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info("Saving checkpoint to %s", path)
        atomic_torch_save(data, path)
        self.tag_last_checkpoint(os.path.basename(path))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._local():
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def get_checkpoint_file(self) -> str:
        """The checkpoint named in ``last_checkpoint`` if complete, else the newest complete one."""
        tagged = super().get_checkpoint_file()
        if not self._local() or not tagged or is_complete_checkpoint(tagged):
            return tagged
        others = sorted(
            (os.path.join(self.save_dir, n) for n in os.listdir(self.save_dir)
             if n.startswith("model_") and n.endswith(".pth")),
            key=os.path.getmtime, reverse=True,
        )
        for path in others:
            if path != tagged and is_complete_checkpoint(path):
                self.logger.warning("%s is incomplete (truncated?): resuming from %s instead.",
                                    tagged, path)
                return path
        raise ReleaseError(f"{tagged} is incomplete and {self.save_dir} has no other complete "
                           "checkpoint to resume from. Start without --resume.")


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
    buf = io.BytesIO()  # serialised once, so the name can carry the content's sha
    torch.save({"model": {k: sd[k].detach().cpu() for k in sorted(sd)},
                "__author__": "TBD (tbd-detectron2)"}, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    final = out / f"model_final_{sha[:8]}.pth"
    _atomic_write(str(final), "wb", lambda f: f.write(data))
    meta = {"file": final.name, "sha256": sha, "source_checkpoint": str(checkpoint),
            **(metadata or {})}
    atomic_write_text(str(out / f"{final.stem}.json"), json.dumps(meta, indent=2))
    atomic_write_text(str(out / f"{final.stem}_config.yaml"), student_cfg.dump())
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
