"""Training data: checked dataset dicts and a deterministic, resumable training loader.

Checks (``load_train_dicts``) run before anything is written, and fail with the dataset name:

* a training dataset with no images or zero (non-crowd) annotations;
* no valid box at all once boxes are clipped to their image and degenerate boxes dropped, as
  Detectron2's mapper does (``transform_instance_annotations`` clips, ``filter_empty_instances``
  drops). Clipped and dropped counts are logged: COCO itself has a few such boxes.

Images that end up without boxes still train (``DATALOADER.FILTER_EMPTY_ANNOTATIONS=False``, or
all of an image's boxes dropped): RetinaNet treats all their anchors as background.

Resumption. Stock Detectron2's ``TrainingSampler`` restarts from its seed on ``--resume`` and
augmentation draws from per-worker RNGs seeded at start, so a resumed run sees other images and
other flips than an uninterrupted one. In :class:`ResumableTrainLoader` every sample is a pure
function of its position ``p`` in the global training stream:

* ``p`` -> epoch ``p // N`` -> a permutation seeded by ``(seed, epoch)`` -> dataset index;
  process ``r`` of ``W`` takes positions ``r, r + W, ...`` (the same images per iteration as one
  process with the total batch);
* the mapper (augmentation) runs under RNGs seeded by ``(seed, p)``, forked so that the caller's
  RNG state is left untouched (it matters with ``NUM_WORKERS=0``);
* batches are grouped by aspect ratio (``width > height``, as Detectron2) at the index level.

Its state is the number of batches handed out and the seed; ``load_state_dict`` makes the next
iteration replay the index-level grouping (no image is read) and continue with the same batches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.build import filter_images_with_only_crowd_annotations, trivial_batch_collator
from detectron2.data.common import DatasetFromList
from detectron2.structures import BoxMode
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, Sampler

logger = logging.getLogger(__name__)

# Detectron2's filter_empty_instances drops boxes whose clipped width or height is not above this.
BOX_THRESHOLD = 1e-5


class DataError(ValueError):
    """A training dataset cannot be trained on; the message names the dataset and what to do."""


@dataclass
class BoxStats:
    """Annotation counts of one dataset, as Detectron2's mapper will see them."""

    images: int = 0
    annotations: int = 0  # non-crowd
    crowd: int = 0
    clipped: int = 0  # extends outside the image: clipped, kept
    dropped: int = 0  # degenerate, non-finite, or outside the image after clipping: dropped
    nonfinite: int = 0  # of the dropped: a coordinate is NaN or infinite
    unchecked: int = 0  # records without height/width: cannot be checked here

    @property
    def valid(self) -> int:
        return self.annotations - self.dropped


def box_stats(dicts: list[dict]) -> BoxStats:
    """Count annotations, and boxes that clipping to the image changes or empties."""
    st = BoxStats(images=len(dicts))
    boxes, sizes = [], []
    for rec in dicts:
        h, w = rec.get("height"), rec.get("width")
        for ann in rec.get("annotations", []):
            if ann.get("iscrowd", 0):
                st.crowd += 1
                continue
            st.annotations += 1
            if h is None or w is None:
                st.unchecked += 1
                continue
            box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            boxes.append(box)
            sizes.append((w, h, w, h))
    if boxes:
        b = np.asarray(boxes, dtype=np.float64)
        lim = np.asarray(sizes, dtype=np.float64)
        nonfinite = ~np.isfinite(b).all(axis=1)
        c = np.clip(np.nan_to_num(b), 0.0, lim)
        empty = ((c[:, 2] - c[:, 0]) <= BOX_THRESHOLD) | ((c[:, 3] - c[:, 1]) <= BOX_THRESHOLD)
        empty |= nonfinite  # Detectron2's mapper drops them (NaN fails its non-empty test)
        changed = np.any(np.abs(c - b) > 0, axis=1)
        st.dropped = int(empty.sum())
        st.nonfinite = int(nonfinite.sum())
        st.clipped = int((changed & ~empty).sum())
    return st


def _source(name: str) -> str:
    json_file = MetadataCatalog.get(name).get("json_file", None)
    return f" ({json_file})" if json_file else ""


def check_dataset(name: str, dicts: list[dict], key: str = "DATASETS.TRAIN") -> BoxStats:
    """Raise DataError if ``dicts`` cannot train a detector; log clipped/dropped box counts."""
    if not dicts:
        raise DataError(f"{key}: dataset '{name}'{_source(name)} has no images. Check its "
                        "registration and the image/annotation paths.")
    st = box_stats(dicts)
    if st.annotations == 0:
        raise DataError(
            f"{key}: dataset '{name}'{_source(name)} has zero annotations ({st.images} images, "
            f"{st.crowd} crowd). A detector cannot be trained on it: check the annotation file "
            "and that the registration points to it."
        )
    if st.valid == 0 and st.unchecked == 0:
        raise DataError(
            f"{key}: dataset '{name}'{_source(name)} has no valid box: all {st.annotations} boxes "
            "are degenerate or outside their image after clipping to the image, as Detectron2 "
            "does. Check the bbox format (bbox_mode: XYWH vs XYXY) and image sizes."
        )
    if st.clipped or st.dropped:
        logger.warning(
            "Dataset '%s': %d of %d boxes extend outside their image and are clipped; %d are "
            "degenerate or outside after clipping (%d of them with a NaN or infinite coordinate) "
            "and are dropped (as Detectron2's mapper does).",
            name, st.clipped, st.annotations, st.dropped, st.nonfinite,
        )
    return st


def check_image_files(name: str, dicts: list[dict], key: str = "DATASETS.TRAIN") -> None:
    """Raise DataError if image files are missing or empty (stat only: a truncated or corrupt
    file is named by the loader when it is read)."""
    bad = []
    for rec in dicts:
        path = rec.get("file_name")
        if path is None:
            continue
        try:
            size = os.path.getsize(path)
        except OSError:
            size = -1
        if size <= 0:
            bad.append((path, "missing" if size < 0 else "empty"))
    if bad:
        shown = ", ".join(f"{p} ({why})" for p, why in bad[:5])
        raise DataError(f"{key}: dataset '{name}'{_source(name)}: {len(bad)} of {len(dicts)} image "
                        f"files are missing or empty: {shown}. Check its image root.")


# Where each stock detector keeps its class count.
NUM_CLASSES_KEYS = {"RetinaNet": "MODEL.RETINANET.NUM_CLASSES", "FCOS": "MODEL.FCOS.NUM_CLASSES",
                    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES"}


def _thing_classes(name: str) -> Optional[list]:
    classes = MetadataCatalog.get(name).get("thing_classes", None)
    return list(classes) if classes is not None else None


def check_classes(cfg: CfgNode, dicts_by_name: dict[str, list[dict]]) -> None:
    """Refuse training sets whose classes disagree with each other, with the test sets, or with
    the head's class count (the extra classes would silently train as background)."""
    from ..distillers.registry import config_value
    from ..modeling.teacher import stock_meta_architecture

    known = {n: c for n in dicts_by_name if (c := _thing_classes(n)) is not None}
    ref_name, ref = next(iter(known.items()), (None, None))
    for name, classes in known.items():
        if classes != ref:
            raise DataError(
                f"DATASETS.TRAIN: datasets '{ref_name}' and '{name}' have different thing_classes "
                f"({ref} vs {classes}); training on both would mix their labels (stock Detectron2 "
                "refuses this too). Register them with the same classes in the same order.")
    key = NUM_CLASSES_KEYS.get(stock_meta_architecture(cfg.MODEL.META_ARCHITECTURE))
    if key is not None:
        num_classes = int(config_value(cfg, key))
        ids = [a["category_id"] for d in dicts_by_name.values() for rec in d
               for a in rec.get("annotations", [])]
        largest = max(ids, default=-1)
        count = len(ref) if ref is not None else largest + 1
        if count > num_classes or largest >= num_classes:
            raise DataError(
                f"{key}={num_classes}, but the training data has {count} categories (contiguous "
                f"ids up to {largest}): the extra ones would train as background. Set {key} "
                f"{count} (for a distillation, the teacher's too: MODEL.DISTILL.TEACHER.OPTS).")
    for name in cfg.DATASETS.TEST:
        classes = _thing_classes(name)
        if ref is not None and classes is not None and classes != ref:
            raise DataError(
                f"DATASETS.TEST: dataset '{name}' has thing_classes {classes}, the training data "
                f"'{ref_name}' {ref}: the model's class ids would be scored against other "
                "categories (a category the training set lacks scores AP 0). Register both with "
                "the same classes in the same order.")


def check_test_sets(cfg: CfgNode) -> None:
    """Refuse empty or unreadable DATASETS.TEST before training (the final evaluation would find
    it only after the last iteration)."""
    for name in cfg.DATASETS.TEST:
        dicts = DatasetCatalog.get(name)
        if not dicts:
            raise DataError(f"DATASETS.TEST: dataset '{name}'{_source(name)} has no images: the "
                            "evaluation after training would fail. Fix it, or set DATASETS.TEST "
                            "\"()\" to train without evaluation.")


def load_train_dicts(cfg: CfgNode) -> list[dict]:
    """The dataset dicts of DATASETS.TRAIN, checked (see module doc), then filtered as Detectron2.

    Also used as the pre-flight check of ``train_net.py``: it runs before the output folder is
    written, and its result is handed to the loader so the annotations are read once.
    """
    by_name = {}
    for name in cfg.DATASETS.TRAIN:
        dicts = DatasetCatalog.get(name)
        check_dataset(name, dicts)
        check_image_files(name, dicts)
        by_name[name] = dicts
    check_classes(cfg, by_name)
    check_test_sets(cfg)
    all_dicts = [d for dicts in by_name.values() for d in dicts]
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        before = len(all_dicts)
        all_dicts = filter_images_with_only_crowd_annotations(all_dicts)
        if len(all_dicts) < before:
            logger.info("DATALOADER.FILTER_EMPTY_ANNOTATIONS: %d of %d training images have no "
                        "(non-crowd) box and are left out; set it False to train on them.",
                        before - len(all_dicts), before)
    return all_dicts


# ------------------------------------------------------------------------------ resumable loader
def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@contextlib.contextmanager
def _forked_rng(seed: int):
    """Seed python/numpy/torch (CPU) RNGs for a block, then restore the previous states."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class _StreamIndex:
    """Global stream position -> dataset index, with one permutation per epoch."""

    def __init__(self, size: int):
        self.size = size
        self.seed = 0
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, pos: int) -> int:
        epoch, offset = divmod(pos, self.size)
        key = (self.seed, epoch)
        perm = self._cache.get(key)
        if perm is None:
            if len(self._cache) > 2:
                self._cache.clear()
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._cache[key] = perm
        return int(perm[offset])


class _PositionDataset(Dataset):
    """Map-style dataset over stream positions: ``ds[p]`` is the mapped sample at position p."""

    def __init__(self, dicts: list[dict], mapper, index: _StreamIndex):
        self._data = DatasetFromList(dicts, copy=False, serialize=True)
        self._mapper = mapper
        self._index = index

    def __len__(self) -> int:  # nominal: positions are unbounded
        return len(self._data)

    def __getitem__(self, pos: int):
        idx = self._index(pos)
        for attempt in range(10):
            record = self._data[idx]
            try:
                with _forked_rng(_seed_for(self._index.seed, pos, attempt)):
                    out = self._mapper(record)
            except Exception as e:  # noqa: BLE001 - name the file whatever the reader raised
                name = record.get("file_name", f"record {idx}") if isinstance(record, dict) \
                    else f"record {idx}"
                raise DataError(f"{name}: cannot be loaded for training ({type(e).__name__}: "
                                f"{e}). Is it a complete image file? Replace it or remove its "
                                "record from the dataset.") from e
            if out is not None:
                return out
            # The mapper rejected this sample (as MapDataset, retry another one, deterministically).
            idx = int(np.random.default_rng([self._index.seed, pos, attempt]).integers(len(self)))
        raise RuntimeError(f"The mapper returned None for 10 samples in a row at position {pos}.")


class _GroupedBatchSampler(Sampler):
    """This process's batches of stream positions, grouped by aspect ratio, from a batch number."""

    def __init__(self, index: _StreamIndex, buckets: Optional[np.ndarray], batch_size: int,
                 rank: int, world_size: int, start_batch: int):
        self.index, self.buckets, self.batch_size = index, buckets, batch_size
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    def _all_batches(self) -> Iterator[list[int]]:
        pending: dict[int, list[int]] = {}
        local = 0
        while True:
            pos = local * self.world_size + self.rank
            local += 1
            b = 0 if self.buckets is None else int(self.buckets[self.index(pos)])
            group = pending.setdefault(b, [])
            group.append(pos)
            if len(group) == self.batch_size:
                pending[b] = []
                yield group

    def __iter__(self) -> Iterator[list[int]]:
        it = self._all_batches()
        for _ in range(self.start_batch):  # replay at the index level: no sample is mapped
            next(it)
        yield from it


class ResumableTrainLoader:
    """Infinite training loader whose position is checkpointed (see the module doc).

    Iterating it yields lists of mapped dicts, like Detectron2's train loader. Nothing is started
    until the first batch is requested, so ``load_state_dict`` may be called after ``iter()``.
    """

    def __init__(self, dicts: list[dict], mapper, total_batch_size: int, *,
                 aspect_ratio_grouping: bool = True, num_workers: int = 0,
                 seed: Optional[int] = None):
        world = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world:
            raise ValueError(f"SOLVER.IMS_PER_BATCH={total_batch_size} must be a positive multiple "
                             f"of the number of processes ({world}).")
        self.total_batch_size = total_batch_size
        self.world_size, self.rank = world, comm.get_rank()
        self.batch_size = total_batch_size // world
        self.num_workers = num_workers
        self.seed = int(seed) if seed is not None and seed >= 0 else comm.shared_random_seed()
        self._index = _StreamIndex(len(dicts))
        self._buckets = None
        if aspect_ratio_grouping:
            self._buckets = np.asarray([0 if d["width"] > d["height"] else 1 for d in dicts],
                                       dtype=np.int8)
        self._dataset = _PositionDataset(dicts, mapper, self._index)
        self.batches_consumed = 0
        self._started = False

    def __iter__(self) -> Iterator[list[dict]]:
        self._started = True
        self._index.seed = self.seed
        sampler = _GroupedBatchSampler(self._index, self._buckets, self.batch_size, self.rank,
                                       self.world_size, self.batches_consumed)
        # Its own generator: the DataLoader's worker base seed is not drawn from the global RNG.
        gen = torch.Generator().manual_seed(_seed_for(self.seed, self.rank))
        loader = DataLoader(self._dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            collate_fn=trivial_batch_collator, generator=gen)
        for batch in loader:
            self.batches_consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches": self.batches_consumed, "seed": self.seed,
                "total_batch_size": self.total_batch_size, "world_size": self.world_size,
                "num_images": self._index.size}

    def load_state_dict(self, state: dict) -> None:
        if self._started:
            raise RuntimeError("ResumableTrainLoader.load_state_dict after iteration started.")
        self.seed = int(state["seed"])
        batches = int(state["batches"])
        same = (state.get("total_batch_size") == self.total_batch_size
                and state.get("world_size") == self.world_size
                and state.get("num_images") == self._index.size)
        if not same:
            images = batches * int(state.get("total_batch_size", self.total_batch_size))
            batches = images // self.total_batch_size
            logger.warning(
                "Resuming the data stream with other settings (checkpoint: %s; now: %d images, "
                "batch %d on %d processes): continuing after about the same number of images; "
                "the batches are not those of an uninterrupted run.",
                state, self._index.size, self.total_batch_size, self.world_size,
            )
        self.batches_consumed = batches


def build_resumable_train_loader(cfg: CfgNode, dicts: Optional[list[dict]] = None,
                                 mapper=None) -> ResumableTrainLoader:
    """The training loader of ``cfg`` (DatasetMapper by default), resumable. SEED < 0: random."""
    if dicts is None:
        dicts = load_train_dicts(cfg)
    if mapper is None:
        mapper = DatasetMapper(cfg, is_train=True)
    return ResumableTrainLoader(
        dicts, mapper, cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS, seed=cfg.SEED,
    )
