"""Distillation meta-architectures: a dense-detector student trained with a frozen teacher and
registered distillers, through Detectron2's own ``forward_training`` extension point.

Design (docs/design.md):

* The class *is* the student: ``DistillMetaArch`` subclasses RetinaNet (``DistillFCOS``, in
  ``fcos.py``, FCOS), so the student's parameters keep stock names (``backbone.*``, ``head.*``) and
  stock or model-zoo checkpoints load as MODEL.WEIGHTS. Distillation-only parameters (adapters)
  live under ``distillers.*``.
* Stock ``forward`` and inference. In training, ``preprocess_image`` also prepares the teacher's
  input, and ``forward_training`` adds the distillation terms to the stock losses:
  ``L = L_det(student) + factor(t) * sum_d L_d(student, teacher)``.
* ``DistillMixin`` holds everything that is not specific to RetinaNet, so that another dense
  student (FCOS) is a small class implementing ``detection_targets`` and ``detection_losses``.
* The teacher may be of another family (RetinaNet, FCOS, or a Faster R-CNN with an FPN): FPN
  levels are paired by stride, and each distiller's ``needs`` say which pairs it supports.
* The teacher is kept outside the module tree (``tbd.modeling.teacher``).
* ``build_model(cfg)`` loads no weights by contract; the teacher's weights are the one exception:
  they are loaded here, from MODEL.DISTILL.TEACHER.WEIGHTS, when the meta-arch is built.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn
from torch.profiler import record_function

from ..config import ConfigError, resolve_warmup_iters, validate_distill_config
from ..distillers import DISTILL_LOSS_REGISTRY, DistillInputs
from ..distillers.registry import DENSE_TEACHER_HEAD, GT_MATCHES, HEAD_INTERNALS
from .auto_weight import AutoWeight
from .guards import (
    DistillDiagnostics,
    TermWatch,
    check_finite,
    current_iter,
    raise_if_inputs_not_finite,
)
from .taps import DenseTaps, HeadInternals, batch_taps
from .teacher import (
    TeacherError,
    TeacherHolder,
    build_teacher,
    check_compatible,
    freeze,
    teacher_fingerprint,
    teacher_images,
)
from .teacher_cache import TeacherOutputCache

logger = logging.getLogger(__name__)


class PairedImages(ImageList):
    """The student's preprocessed batch, carrying the same images in the teacher's own
    preprocessing (``teacher``), so that ``forward_training`` can run the teacher."""

    def __init__(self, student: ImageList, teacher: ImageList,
                 cache_keys: Optional[list[bytes]] = None):
        super().__init__(student.tensor, student.image_sizes)
        self.teacher = teacher
        self.cache_keys = cache_keys  # per sample, for the teacher's output cache


@dataclass
class DetectionTargets:
    """The student's own assignment, shared by its detection loss and the distillers."""

    anchors: list[Boxes]
    gt_labels: list[Tensor]  # per image [R] in {-1 ignore, 0..K-1 foreground, K background}
    gt_boxes: list[Tensor]  # per image [R, 4] matched GT boxes
    matched_idxs: Optional[Tensor]  # [N, R] matched GT index, when a distiller needs it


class _RecordingMatcher:
    """Wraps a Matcher to keep the matched indices it returns: the stock labelling computes
    them and drops them, and the distillers that need them must not re-run or copy it."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.matches: list[Tensor] = []

    def __call__(self, quality: Tensor):
        idxs, labels = self.matcher(quality)
        self.matches.append(idxs)
        return idxs, labels


class DistillMixin:
    """Distillation over a ``DenseDetector`` student; combine as ``class X(DistillMixin, Stock)``.

    The stock class supplies the student; subclasses implement ``detection_targets`` and
    ``detection_losses`` with the stock class's own labelling and losses, and set
    ``stock_architecture`` (what ``--eval-only`` and releases build).
    """

    stock_architecture = ""

    def init_distillation(
        self,
        *,
        teacher: Optional[DenseDetector],
        distillers: dict[str, nn.Module],
        teacher_input_format: str = "BGR",
        start_iter: int = 0,
        stop_iter: int = -1,
        warmup_iters: int = 0,
        log_period: int = 20,
        check_finite: bool = True,
        teacher_fingerprint: Optional[dict] = None,
        auto_weight: Optional[dict] = None,
        levels: Optional[list[str]] = None,
        teacher_levels: Optional[list[str]] = None,
        teacher_cache_mb: float = 0.0,
    ) -> None:
        """Attach the teacher and distillers (called by ``__init__`` after the stock one).

        ``auto_weight``: ``{"targets": {name: ratio}, "iters": n}`` turns on automatic loss
        weights (:class:`tbd.modeling.auto_weight.AutoWeight`); None keeps the configured ones.
        ``levels``: the student's FPN levels whose features are distilled (default: the head's),
        paired with the teacher's ``teacher_levels`` (same strides; default: the same names).
        ``teacher_cache_mb``: > 0 keeps the teacher's outputs per training input in memory, up
        to that many MB (:class:`tbd.modeling.teacher_cache.TeacherOutputCache`).
        """
        self.distillers = nn.ModuleDict(distillers)
        self.distill_levels = list(levels) if levels is not None else list(self.head_in_features)
        self.teacher_levels = (list(teacher_levels) if teacher_levels is not None
                               else list(self.distill_levels))
        self._level_index = [list(self.head_in_features).index(n) for n in self.distill_levels]
        # The teacher's head runs only for distillers that read its outputs or insides.
        self.uses_teacher_head = any(
            {DENSE_TEACHER_HEAD, HEAD_INTERNALS} & set(getattr(d, "needs", ()))
            for d in self.distillers.values())
        self._teacher = TeacherHolder(freeze(teacher) if teacher is not None else None)
        self.teacher_input_format = teacher_input_format
        self.start_iter = start_iter
        self.stop_iter = stop_iter
        self.warmup_iters = warmup_iters
        self.check_finite = check_finite
        self.teacher_fingerprint = teacher_fingerprint
        self.diagnostics = DistillDiagnostics(log_period)
        # Watch the terms through the warm-up (the first 100 steps without one).
        keys = {k: v for d in self.distillers.values()
                for k, v in getattr(d, "loss_keys", {}).items()}
        # With automatic weights, the ratios during the warm-up are not the trained ones: only
        # terms that stay 0 (which no scale can fix) are reported.
        self.term_watch = TermWatch(warmup_iters if warmup_iters > 0 else 100, keys,
                                    ratios=auto_weight is None)
        self.auto_weight = None
        if auto_weight is not None and len(self.distillers):
            self.auto_weight = AutoWeight(
                self.distillers, auto_weight["targets"], start_iter, auto_weight["iters"],
                {n: sorted(set(getattr(d, "loss_keys", {}).values()))
                 for n, d in self.distillers.items()})
        if teacher is None and len(self.distillers):
            raise TeacherError("Distillers were given without a teacher.")
        self._internals = self._record_head_internals()
        self.teacher_cache = None
        if teacher_cache_mb > 0 and teacher is not None:
            if self._internals is not None:  # recorded during the teacher's forward, each step
                logger.info("MODEL.DISTILL.TEACHER.CACHE_MB=%s: not used, the distillers %s read "
                            "the teacher head's internals, recorded by its forward.",
                            teacher_cache_mb, sorted(self.distillers))
            else:
                self.teacher_cache = TeacherOutputCache(teacher_cache_mb)

    def _record_head_internals(self) -> Optional[tuple[HeadInternals, HeadInternals]]:
        """(student, teacher) recorders of the head maps the distillers that declare
        HEAD_INTERNALS read, at the depths they ask for; None when none does."""
        users = {n: d for n, d in self.distillers.items() if HEAD_INTERNALS in d.needs}
        if not users:
            return None
        indices = {n: d.head_indices(self.head, self.teacher.head) for n, d in users.items()}
        if len(set(indices.values())) > 1:
            raise ConfigError(f"Distillers {sorted(users)} read the heads at other depths "
                              f"{indices}: use one of them at a time.")
        ks, kt = next(iter(indices.values()))
        return HeadInternals(self.head, ks).attach(), HeadInternals(self.teacher.head, kt).attach(
            always=True)

    @staticmethod
    def distillation_from_config(cfg, student) -> dict:
        """The ``init_distillation`` arguments from ``cfg``: builds the teacher (and loads its
        weights), checks the pair once (``check_compatible``) and builds the distillers.

        ``student``: the student's parts, with the attributes ``check_compatible`` reads
        (``backbone``, ``head_in_features``, ``num_classes``, ``anchor_generator``).
        """
        validate_distill_config(cfg)
        names = list(cfg.MODEL.DISTILL.LOSSES)
        unknown = [n for n in names if n not in DISTILL_LOSS_REGISTRY]
        if unknown:
            raise ConfigError(
                f"MODEL.DISTILL.LOSSES has unknown entries {unknown}; registered: "
                f"{sorted(k for k, _ in DISTILL_LOSS_REGISTRY)}."
            )
        if not names:  # distillation off: a plain student, no teacher is built
            logger.info("MODEL.DISTILL.LOSSES is empty: training the student alone.")
            return {"teacher": None, "distillers": {}}
        teacher, tcfg, _ = build_teacher(cfg)
        classes = {n: DISTILL_LOSS_REGISTRY.get(n) for n in names}
        pairs = check_compatible(student, teacher, classes, list(cfg.MODEL.DISTILL.LEVELS))
        auto = cfg.MODEL.DISTILL.AUTO_WEIGHT
        s_all, t_all = student.backbone.output_shape(), teacher.backbone.output_shape()
        # The distillers see the teacher's levels under the student's names.
        s_shapes = {s: s_all[s] for s, _ in pairs}
        t_shapes = {s: t_all[t] for s, t in pairs}
        return {
            "teacher": teacher,
            "distillers": {n: c(cfg, s_shapes, t_shapes) for n, c in classes.items()},
            "teacher_input_format": tcfg.INPUT.FORMAT,
            "start_iter": cfg.MODEL.DISTILL.START_ITER,
            "stop_iter": cfg.MODEL.DISTILL.STOP_ITER,
            "warmup_iters": resolve_warmup_iters(cfg),
            "log_period": cfg.MODEL.DISTILL.LOG_PERIOD,
            "check_finite": cfg.MODEL.DISTILL.CHECK_FINITE,
            "teacher_fingerprint": teacher_fingerprint(cfg),
            "auto_weight": ({"targets": dict(auto.TARGET), "iters": auto.ITERS}
                            if auto.ENABLED else None),
            "levels": [s for s, _ in pairs],
            "teacher_levels": [t for _, t in pairs],
            "teacher_cache_mb": cfg.MODEL.DISTILL.TEACHER.CACHE_MB,
        }

    # ------------------------------------------------------------------------------- teacher
    @property
    def teacher(self) -> Optional[DenseDetector]:
        return self._teacher.model

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.float() of the student also apply to the out-of-tree teacher.
        super()._apply(fn, *args, **kwargs)
        if self._teacher.model is not None:
            self._teacher.model._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self._teacher.model is not None:
            self._teacher.model.eval()  # the teacher stays in eval mode, whatever mode says
        return self

    def preprocess_image(self, batched_inputs: list[dict]) -> ImageList:
        """Stock preprocessing; in training with a teacher, plus the teacher's own input."""
        images = super().preprocess_image(batched_inputs)
        if not self.training or self.teacher is None:
            return images
        if self._internals is not None:  # a new step: forget what an interrupted one recorded
            for recorder in self._internals:
                recorder.take()
        return self._paired(images, batched_inputs)

    def _paired(self, images: ImageList, batched_inputs: list[dict]) -> PairedImages:
        """``images`` with the same batch in the teacher's own preprocessing."""
        teacher = teacher_images(self.teacher, batched_inputs, images, self.input_format,
                                 self.teacher_input_format)
        keys = None if self.teacher_cache is None else \
            self.teacher_cache.keys(batched_inputs, tuple(teacher.tensor.shape[-2:]))
        return PairedImages(images, teacher, keys)

    def teacher_taps(self, images: PairedImages) -> DenseTaps:
        """The teacher's FPN features at ``teacher_levels`` and, when a distiller reads them, its
        head outputs and anchors, on its own input, without gradient."""
        t, cache = self.teacher, self.teacher_cache
        keys = getattr(images, "cache_keys", None) if cache is not None else None
        padded = tuple(images.teacher.tensor.shape[-2:])
        with torch.no_grad(), record_function("tbd.teacher_forward"):
            served = cache.get(keys, padded) if keys is not None else None
            if served is not None:
                levels, predictions, anchors = served
            else:
                feats = t.backbone(images.teacher.tensor)
                predictions, anchors = [], None
                if self.uses_teacher_head:
                    head_feats = [feats[f] for f in t.head_in_features]
                    predictions = list(t.head(head_feats))
                    anchors = t.anchor_generator(head_feats)
                levels = [feats[n] for n in self.teacher_levels]
                if keys is not None:
                    cache.put(keys, padded, levels, predictions, anchors)
            taps = DenseTaps(images.teacher, levels, predictions, anchors=anchors)
        if self._internals is not None:
            taps.internals = self._internals[1].take()
        return taps

    # ------------------------------------------------------------------------------- schedule
    def distill_factor(self, it: Optional[int]) -> float:
        """Loss factor at iteration ``it``: linear warm-up from START_ITER, 0 from STOP_ITER."""
        if it is None:
            return 1.0
        if it < self.start_iter or (self.stop_iter >= 0 and it >= self.stop_iter):
            return 0.0
        if self.warmup_iters <= 0:
            return 1.0
        return min(max((it - self.start_iter) / self.warmup_iters, 0.0), 1.0)

    # ------------------------------------------------------------------------------- training
    @property
    def needs_gt_matches(self) -> bool:
        return any(GT_MATCHES in getattr(d, "needs", ()) for d in self.distillers.values())

    def forward_training(self, images, features, predictions, gt_instances):
        """``L_det(student) + factor(t) * sum_d L_d``; the stock losses alone without a teacher."""
        if self.teacher is None:
            return super().forward_training(images, features, predictions, gt_instances)
        student = DenseTaps(images, features, predictions)
        if self._internals is not None:
            student.internals = self._internals[0].take()
        targets = self.detection_targets(features, gt_instances, self.needs_gt_matches)
        with record_function("tbd.student_det_loss"):
            losses = self.detection_losses(student, targets)
        inputs = self.make_distill_inputs(student, self.teacher_taps(images), targets,
                                          gt_instances)
        it = current_iter()
        try:
            terms, diag = self.distillation_terms(inputs, reserved=set(losses))
        except AssertionError:  # e.g. fvcore's GIoU on the NaN boxes of a diverged student
            if self.check_finite:
                raise_if_inputs_not_finite(inputs, it)
            raise
        if self.auto_weight is not None:
            terms = self.auto_weight(terms, sum(losses.values()), it)
        raw = {k: v for d_terms in terms.values() for k, v in d_terms.items()}
        factor = self.distill_factor(it)
        if self.check_finite:
            check_finite(raw, inputs, it)
        if it is not None:  # in a trainer
            self.term_watch.update(raw, sum(losses.values()))
        # Always multiply, never skip: every adapter takes part in every step (DDP-safe).
        losses.update({k: v * factor for k, v in raw.items()})
        self.diagnostics.record(it, raw, diag, factor)
        if it is not None and self.teacher_cache is not None:
            get_event_storage().put_scalars(**{f"distill/teacher_cache_{k}": v for k, v in
                                               self.teacher_cache.stats().items()},
                                            smoothing_hint=False)
        return losses

    def distillation_terms(self, inputs: DistillInputs, reserved: set[str]
                           ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
        """Every distiller's weighted terms (distiller name -> loss key -> value) and the
        diagnostics, computed in fp32 (also under AMP).

        ``reserved``: the detection loss keys, which no distiller may return.
        """
        terms: dict[str, dict[str, Tensor]] = {}
        raw: dict[str, Tensor] = {}
        diag: dict[str, Tensor] = {}
        with torch.autocast(device_type=self.device.type, enabled=False):
            inputs = inputs.float()
            for name, distiller in self.distillers.items():
                with record_function(f"tbd.distill.{name}"):
                    d_losses, d_diag = distiller(inputs)
                overlap = set(d_losses) & (set(raw) | reserved)
                if overlap:
                    raise KeyError(f"Distiller {name} returned duplicate loss keys {overlap}.")
                raw.update(d_losses)
                terms[name] = d_losses
                diag.update(d_diag)
        return terms, diag

    def make_distill_inputs(self, student: DenseTaps, teacher: DenseTaps,
                            targets: DetectionTargets, gt_instances: list[Instances]
                            ) -> DistillInputs:
        has_head = len(teacher.predictions) > 0
        return DistillInputs(
            level_names=list(self.distill_levels),
            student_features=[student.features[i] for i in self._level_index],
            teacher_features=teacher.features,
            student_logits=student.logits,
            student_deltas=student.deltas,
            teacher_logits=teacher.logits if has_head else [],
            teacher_deltas=teacher.deltas if has_head else [],
            anchors=targets.anchors,
            teacher_anchors=teacher.anchors,
            teacher_centerness=teacher.centerness if has_head else None,
            centerness_targets=self.centerness_targets(targets),
            gt_labels=torch.stack(targets.gt_labels),
            matched=targets.matched_idxs,
            gt_instances=gt_instances,
            num_classes=self.num_classes,
            student_box2box=self.box2box_transform,
            teacher_box2box=getattr(self.teacher, "box2box_transform", None),
            image_sizes=list(student.images.image_sizes),
            student_internals=student.internals,
            teacher_internals=teacher.internals,
            teacher_head=self.teacher.head if self._internals is not None else None,
        )

    @torch.no_grad()
    def distill_inputs(self, batched_inputs: list[dict]) -> DistillInputs:
        """The taps of one batch with GT instances, in the current mode, without gradient (for
        analysis and visualisation: call it in eval mode to leave BN statistics alone)."""
        if self.teacher is None:
            raise TeacherError("distill_inputs needs a teacher (MODEL.DISTILL.TEACHER.*).")
        student = batch_taps(self, batched_inputs)
        if self._internals is not None:  # recorded in training mode only (CrossKD's maps)
            student.internals = self._internals[0].take()
        images = student.images
        if not isinstance(images, PairedImages):  # eval mode: preprocess_image did not pair
            images = self._paired(images, batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        targets = self.detection_targets(student.features, gt_instances, True)
        return self.make_distill_inputs(student, self.teacher_taps(images), targets, gt_instances)

    # ------------------------------------------------------------------ student specifics
    def detection_targets(self, features: list[Tensor], gt_instances: list[Instances],
                          with_matches: bool) -> DetectionTargets:
        raise NotImplementedError

    def detection_losses(self, student: DenseTaps, targets: DetectionTargets
                         ) -> dict[str, Tensor]:
        raise NotImplementedError

    def centerness_targets(self, targets: DetectionTargets) -> Optional[Tensor]:
        """[N, R] the student's centerness targets (FCOS), None for a student without them."""
        return None

    def _ema_update(self, name: str, value: float, initial_value: float, momentum: float = 0.9):
        """The EMA loss normaliser of RetinaNet and FCOS, made global over processes.

        Stock Detectron2 keeps a per-process EMA of the number of positive anchors. Here the EMA
        follows the total over processes (as one process with the total batch would), and each
        process divides by total / world size, so that DDP's gradient average equals the
        single-process gradient. (A process with no positive anchors counts 1, as in stock.)
        """
        world = comm.get_world_size()
        if name != "loss_normalizer" or world == 1:
            return super()._ema_update(name, value, initial_value, momentum)
        total = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return super()._ema_update(name, float(total.item()), initial_value, momentum) / world


@META_ARCH_REGISTRY.register()
class DistillMetaArch(DistillMixin, RetinaNet):
    """RetinaNet student + frozen teacher (RetinaNet, FCOS or Faster R-CNN, as each distiller's
    needs allow) + distillers (TBD = HD + TFD)."""

    stock_architecture = "RetinaNet"

    @configurable
    def __init__(self, *, distill: dict, **kwargs):
        """
        Args:
            distill: the arguments of ``DistillMixin.init_distillation`` (teacher, distillers,
                schedule, ...); ``{"teacher": None, "distillers": {}}`` trains a plain student.
            kwargs: RetinaNet's arguments (the student).
        """
        super().__init__(**kwargs)
        self.init_distillation(**distill)

    @classmethod
    def from_config(cls, cfg):
        ret = RetinaNet.from_config(cfg)
        ret["distill"] = cls.distillation_from_config(cfg, SimpleNamespace(family="RetinaNet",
                                                                           **ret))
        return ret

    def detection_targets(self, features: list[Tensor], gt_instances: list[Instances],
                          with_matches: bool) -> DetectionTargets:
        """Stock anchors and ``label_anchors``; the matcher's indices kept when asked for."""
        with record_function("tbd.label_anchors"):
            anchors = self.anchor_generator(features)
            recorder = _RecordingMatcher(self.anchor_matcher) if with_matches else None
            with self._matcher(recorder):
                gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        matched = torch.stack(recorder.matches) if recorder is not None else None
        return DetectionTargets(anchors, gt_labels, gt_boxes, matched)

    @contextlib.contextmanager
    def _matcher(self, recorder: Optional[_RecordingMatcher]):
        if recorder is None:
            yield
            return
        self.anchor_matcher = recorder
        try:
            yield
        finally:
            self.anchor_matcher = recorder.matcher

    def detection_losses(self, student: DenseTaps, targets: DetectionTargets
                         ) -> dict[str, Tensor]:
        """Stock RetinaNet losses on the stock labelling."""
        pred_logits, pred_deltas = self._transpose_dense_predictions(
            student.predictions, [self.num_classes, 4])
        return self.losses(targets.anchors, pred_logits, targets.gt_labels, pred_deltas,
                           targets.gt_boxes)
