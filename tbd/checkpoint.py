"""Checkpoint helpers: load a DistillMetaArch checkpoint into a plain student."""

from __future__ import annotations

from detectron2.checkpoint import DetectionCheckpointer

# Prefix of the distillation-only parameters (adapters, FGD blocks) in DistillMetaArch's state.
DISTILLER_PREFIX = "distillers."


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
