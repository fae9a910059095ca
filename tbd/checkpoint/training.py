"""Training checkpoints: atomic saves, a resume that skips incomplete files, and student-only
loading of a distillation checkpoint.

Training checkpoints hold the whole DistillMetaArch state (student + ``distillers.*``), never the
teacher; ``--resume`` picks the newest complete one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from .io import atomic_torch_save, atomic_write_text, is_complete_checkpoint

# Prefix of the distillation-only parameters (adapters, FGD blocks) in DistillMetaArch's state.
DISTILLER_PREFIX = "distillers."


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and what to do."""


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
        raise CheckpointError(f"{tagged} is incomplete and {self.save_dir} has no other complete "
                           "checkpoint to resume from. Start without --resume.")


@dataclass
class LoadReport:
    """What a checkpoint load did: keys the model lacked, extra keys, shape mismatches."""

    weights: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.shape_mismatch

    def summary(self, title: str = "Load report") -> str:
        return "\n".join([
            f"{title} for {self.weights}:",
            f"  missing keys ({len(self.missing)}): {self.missing[:10]}",
            f"  unexpected keys ({len(self.unexpected)}): {self.unexpected[:10]}",
            f"  shape mismatches ({len(self.shape_mismatch)}): "
            + ", ".join(f"{k} ckpt{a} vs model{b}" for k, a, b in self.shape_mismatch[:10]),
        ])


class _ReportingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that keeps the incompatible-keys result instead of only logging it,
    optionally without a distillation checkpoint's ``distillers.*`` keys."""

    incompatible = None
    strip_distillers = False

    def _load_model(self, checkpoint):  # fvcore/detectron2 hook, stable since detectron2 v0.2
        if self.strip_distillers:
            checkpoint["model"] = strip_distiller_keys(checkpoint["model"])
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def load_with_report(model: nn.Module, weights: str, strip_distillers: bool = False
                     ) -> LoadReport:
    """Load ``weights`` (a file, URL or zoo ``.pkl``) into ``model``; report what did not fit.

    Detectron2's checkpointer is not strict (it only logs missing and mismatched keys): callers
    refuse an incomplete load themselves.
    """
    ckpt = _ReportingCheckpointer(model)
    ckpt.strip_distillers = strip_distillers
    ckpt.load(weights, checkpointables=[])
    report = LoadReport(weights=weights)
    inc = ckpt.incompatible
    if inc is not None:
        report.missing = sorted(inc.missing_keys)
        report.unexpected = sorted(inc.unexpected_keys)
        report.shape_mismatch = [(k, tuple(a), tuple(b)) for k, a, b in inc.incorrect_shapes]
    return report
