"""A memory cache of the frozen teacher's outputs per training input.

The teacher is frozen and in eval mode (BN and GN statistics are per sample or fixed), so its
outputs for one input never change, and one sample's outputs do not depend on the other samples
of its batch. On a small dataset with few augmentations the same inputs come back every epoch
(the synthetic benchmark: each image with or without its horizontal flip), and the teacher's
forward can be skipped: a batch whose samples are all cached
is served from the cache; any other batch runs the teacher on the whole batch, as without the
cache, and keeps its new samples. With random scales or crops almost nothing repeats, and the
cache only costs a hash per image.

Keys are the bytes of each sample's input image (the dataset mapper's tensor) with its size and
the batch's padded size, hashed; values are that sample's slices of the teacher's FPN features
and head outputs, cloned so that a cached slice does not hold its whole batch in memory. The
cache fills up to ``max_mb`` and then stops taking entries (no eviction: under a dataset that
repeats, every entry is worth the same). It is not saved in checkpoints: after a resume it fills
again, with the same values.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Optional

import torch
from detectron2.structures import Boxes
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["TeacherOutputCache"]

Entry = tuple[list[Tensor], list[list[Tensor]]]  # (features per level, predictions per kind)


class TeacherOutputCache:
    """Per-sample teacher outputs (``MODEL.DISTILL.TEACHER.CACHE_MB``), and its statistics."""

    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2**20)
        self.used_bytes = 0
        self.full = False
        self._entries: dict[bytes, Entry] = {}
        self._anchors: dict[tuple[int, ...], Optional[list[Boxes]]] = {}
        self.batches = 0  # batches looked up
        self.batches_served = 0  # batches served from the cache (the teacher did not run)

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def keys(batched_inputs: list[dict], padded: tuple[int, ...]) -> list[bytes]:
        """One key per sample: its image bytes, shape and dtype, and the batch's padded size
        (padding changes the teacher's feature maps)."""
        out = []
        for x in batched_inputs:
            image = x["image"]
            h = hashlib.blake2b(digest_size=20)
            h.update(repr((tuple(image.shape), str(image.dtype), tuple(padded))).encode())
            h.update(image.detach().cpu().contiguous().numpy().tobytes())
            out.append(h.digest())
        return out

    def get(self, keys: list[bytes], padded: tuple[int, ...]
            ) -> Optional[tuple[list[Tensor], list[list[Tensor]], Optional[list[Boxes]]]]:
        """The batch's (features, predictions, anchors), stacked in batch order, when every
        sample is cached; None otherwise (the caller runs the teacher and calls ``put``)."""
        self.batches += 1
        entries = [self._entries.get(k) for k in keys]
        if not entries or any(e is None for e in entries) or tuple(padded) not in self._anchors:
            return None
        self.batches_served += 1
        feats = [torch.stack([e[0][i] for e in entries]) for i in range(len(entries[0][0]))]
        preds = [[torch.stack([e[1][p][i] for e in entries]) for i in range(len(kind))]
                 for p, kind in enumerate(entries[0][1])]
        return feats, preds, self._anchors[tuple(padded)]

    def put(self, keys: list[bytes], padded: tuple[int, ...], features: list[Tensor],
            predictions: list[list[Tensor]], anchors: Optional[list[Boxes]]) -> None:
        """Keep the samples of a batch the teacher has just run on, while there is room."""
        self._anchors.setdefault(tuple(padded), anchors)
        if self.full:
            return
        for i, key in enumerate(keys):
            if key in self._entries:
                continue
            entry = ([f[i].clone() for f in features],
                     [[t[i].clone() for t in kind] for kind in predictions])
            size = sum(t.numel() * t.element_size() for t in entry[0]) + sum(
                t.numel() * t.element_size() for kind in entry[1] for t in kind)
            if self.used_bytes + size > self.max_bytes:
                self.full = True
                logger.info("Teacher cache full at %d inputs (%.1f MB, "
                            "MODEL.DISTILL.TEACHER.CACHE_MB): new inputs run the teacher.",
                            len(self._entries), self.used_bytes / 2**20)
                return
            self._entries[key] = entry
            self.used_bytes += size

    def stats(self) -> dict[str, float]:
        """The logged statistics: the share of batches served so far, entries, megabytes."""
        return {"served": self.batches_served / max(self.batches, 1),
                "entries": float(len(self._entries)), "mb": self.used_bytes / 2**20}
