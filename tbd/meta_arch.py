"""DistillMetaArch: a RetinaNet student trained with a frozen teacher and registered distillers.

Design (see projects/TBD/README.md, "Design decisions"):

* The class *is* the student: it subclasses RetinaNet, so the student's parameters keep stock
  names (``backbone.*``, ``head.*``) and stock or model-zoo checkpoints load as MODEL.WEIGHTS.
  Distillation-only parameters (adapters) live under ``distillers.*``.
* The teacher is kept outside the module tree (in a plain attribute holder), so it is not in
  ``state_dict()``, ``parameters()``, the optimizer or DDP, and ``model.train()`` (including the
  ``model.train(True)`` of Detectron2's ``inference_context``) cannot flip it out of eval mode.
  ``_apply`` is extended so that ``.to()``/``.cuda()`` move it with the student.
* In eval mode the forward is stock RetinaNet inference on the student: the teacher is not run.
* ``build_model(cfg)`` loads no weights by contract; the teacher's weights are the one exception:
  they are loaded here, from MODEL.DISTILL.TEACHER.WEIGHTS, when the meta-arch is built.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn
from torch.profiler import record_function

from .config import resolve_warmup_iters, validate_distill_config
from .losses import DISTILL_LOSS_REGISTRY, DistillInputs
from .teacher import TeacherError, build_teacher, freeze, teacher_fingerprint

logger = logging.getLogger(__name__)

# What a diverging student's error message suggests. Per-parameter clipping at 10 stopped the
# benchmarks' divergence and stall (per-parameter gradient norms of 17 to 3e8 against a usual
# largest of about 2; projects/TBD/benchmarks/README.md, "Gradient spike and clipping check").
_DIVERGED_FIX = ("enable gradient clipping (SOLVER.CLIP_GRADIENTS.ENABLED True, CLIP_TYPE norm, "
                 "CLIP_VALUE 10), lower SOLVER.BASE_LR or lower the distillation weights")


class _TeacherHolder:
    """Keeps the teacher out of the student's module tree (not an nn.Module attribute)."""

    def __init__(self, model: Optional[RetinaNet]):
        self.model = model


def _current_iter() -> Optional[int]:
    try:
        return get_event_storage().iter
    except AssertionError:  # no EventStorage: not inside a trainer
        return None


def check_compatible(
    student: RetinaNet, teacher: RetinaNet, distillers: dict[str, nn.Module]
) -> None:
    """Raise TeacherError (naming the key) if the pair cannot be distilled with ``distillers``."""
    s_names, t_names = list(student.head_in_features), list(teacher.head_in_features)
    if s_names != t_names:
        raise TeacherError(
            f"FPN levels differ: student MODEL.RETINANET.IN_FEATURES={s_names}, teacher "
            f"{t_names}. Distillation pairs levels by name; make them equal."
        )
    s_shapes, t_shapes = student.backbone.output_shape(), teacher.backbone.output_shape()
    for name in s_names:
        if s_shapes[name].stride != t_shapes[name].stride:
            raise TeacherError(
                f"FPN level {name} has stride {s_shapes[name].stride} in the student and "
                f"{t_shapes[name].stride} in the teacher (MODEL.FPN / MODEL.RESNETS settings)."
            )
    needs_anchors = [n for n, d in distillers.items() if getattr(d, "requires_same_anchors", False)]
    if not needs_anchors:
        return
    if student.num_classes != teacher.num_classes:
        raise TeacherError(
            f"MODEL.RETINANET.NUM_CLASSES differs: student {student.num_classes}, teacher "
            f"{teacher.num_classes}; {needs_anchors} distil per-class scores and need them equal."
        )
    sa, ta = student.anchor_generator, teacher.anchor_generator
    s_anchors = [a.tolist() for a in sa.cell_anchors]
    t_anchors = [a.tolist() for a in ta.cell_anchors]
    if s_anchors != t_anchors or sa.strides != ta.strides or sa.offset != ta.offset:
        raise TeacherError(
            "MODEL.ANCHOR_GENERATOR settings (SIZES, ASPECT_RATIOS, OFFSET) differ between student "
            f"and teacher; {needs_anchors} pair anchors one to one and need identical anchors."
        )


@META_ARCH_REGISTRY.register()
class DistillMetaArch(RetinaNet):
    """RetinaNet student + frozen RetinaNet-type teacher + distillers (TBD = HD + TFD)."""

    @configurable
    def __init__(
        self,
        *,
        teacher: Optional[RetinaNet],
        distillers: dict[str, nn.Module],
        teacher_input_format: str = "BGR",
        start_iter: int = 0,
        stop_iter: int = -1,
        warmup_iters: int = 0,
        log_period: int = 20,
        check_finite: bool = True,
        teacher_fingerprint: Optional[dict] = None,
        **kwargs,
    ):
        """
        Args:
            teacher: a RetinaNet-type detector (frozen here), or None to run as a plain student.
            distillers: name -> distiller module (see DISTILL_LOSS_REGISTRY); may be empty.
            teacher_input_format: the teacher's INPUT.FORMAT ("BGR"/"RGB").
            start_iter, stop_iter, warmup_iters: the distillation schedule (METHOD.md section 6).
            log_period: diagnostics are written to the event storage every this many iterations.
            check_finite: stop with the term's name when a distillation loss is not finite.
            teacher_fingerprint: sha256 of the teacher's config and weights (checkpointed, and
                compared on ``--resume``).
            kwargs: RetinaNet's arguments (the student).
        """
        super().__init__(**kwargs)
        self.distillers = nn.ModuleDict(distillers)
        self._teacher = _TeacherHolder(freeze(teacher) if teacher is not None else None)
        self.teacher_input_format = teacher_input_format
        self.start_iter = start_iter
        self.stop_iter = stop_iter
        self.warmup_iters = warmup_iters
        self.log_period = log_period
        self.check_finite = check_finite
        self.teacher_fingerprint = teacher_fingerprint
        self._diag_buffer: dict[str, list[Tensor]] = {}
        self._logged_raw = False
        if teacher is not None:
            check_compatible(self, teacher, self.distillers)
        elif len(self.distillers):
            raise TeacherError("Distillers were given without a teacher.")

    @classmethod
    def from_config(cls, cfg):
        validate_distill_config(cfg)
        ret = RetinaNet.from_config(cfg)
        names = list(cfg.MODEL.DISTILL.LOSSES)
        unknown = [n for n in names if n not in DISTILL_LOSS_REGISTRY]
        if unknown:
            raise ValueError(
                f"MODEL.DISTILL.LOSSES has unknown entries {unknown}; registered: "
                f"{sorted(k for k, _ in DISTILL_LOSS_REGISTRY)}."
            )
        if not names:  # distillation off: a plain student, no teacher is built
            logger.info("MODEL.DISTILL.LOSSES is empty: training the student alone.")
            ret.update(teacher=None, distillers={})
            return ret
        teacher, tcfg, _ = build_teacher(cfg)
        s_shapes = ret["backbone"].output_shape()
        t_shapes = teacher.backbone.output_shape()
        missing = [n for n in cfg.MODEL.RETINANET.IN_FEATURES if n not in t_shapes]
        if missing:
            raise TeacherError(
                f"FPN levels {missing} of the student (MODEL.RETINANET.IN_FEATURES) are missing "
                f"from the teacher's backbone outputs {sorted(t_shapes)}."
            )
        distillers = {
            n: DISTILL_LOSS_REGISTRY.get(n)(cfg, s_shapes, t_shapes) for n in names
        }
        ret.update(
            teacher=teacher,
            distillers=distillers,
            teacher_input_format=tcfg.INPUT.FORMAT,
            start_iter=cfg.MODEL.DISTILL.START_ITER,
            stop_iter=cfg.MODEL.DISTILL.STOP_ITER,
            warmup_iters=resolve_warmup_iters(cfg),
            log_period=cfg.MODEL.DISTILL.LOG_PERIOD,
            check_finite=cfg.MODEL.DISTILL.CHECK_FINITE,
            teacher_fingerprint=teacher_fingerprint(cfg, tcfg),
        )
        return ret

    # ----------------------------------------------------------------------------- teacher
    @property
    def teacher(self) -> Optional[RetinaNet]:
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

    def _teacher_images(self, batched_inputs, student_images: ImageList) -> Tensor:
        """The teacher's input: its own format and normalisation, padded like the student's."""
        teacher = self.teacher
        images = []
        for x in batched_inputs:
            img = x["image"].to(self.device)
            if self.teacher_input_format != self.input_format:
                img = img.flip(0)  # BGR <-> RGB
            images.append((img - teacher.pixel_mean) / teacher.pixel_std)
        tensor = ImageList.from_tensors(images, teacher.backbone.size_divisibility).tensor
        th, tw = student_images.tensor.shape[-2:]
        if tensor.shape[-2] > th or tensor.shape[-1] > tw:
            raise TeacherError(
                "The teacher pads inputs to a larger size than the student (size_divisibility "
                f"{teacher.backbone.size_divisibility} vs {self.backbone.size_divisibility}); "
                "use FPN settings with the same divisibility."
            )
        return F.pad(tensor, (0, tw - tensor.shape[-1], 0, th - tensor.shape[-2]))

    # ----------------------------------------------------------------------------- schedule
    def distill_factor(self, it: Optional[int]) -> float:
        """Loss factor at iteration ``it``: linear warm-up from START_ITER, 0 from STOP_ITER."""
        if it is None:
            return 1.0
        if it < self.start_iter or (self.stop_iter >= 0 and it >= self.stop_iter):
            return 0.0
        if self.warmup_iters <= 0:
            return 1.0
        return min(max((it - self.start_iter) / self.warmup_iters, 0.0), 1.0)

    # ----------------------------------------------------------------------------- forward
    def _ema_update(self, name: str, value: float, initial_value: float, momentum: float = 0.9):
        """RetinaNet's EMA loss normaliser, made global over processes.

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

    @torch.no_grad()
    def label_anchors_with_indices(
        self, anchors: list[Boxes], gt_instances: list[Instances]
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """RetinaNet's anchor labelling, also returning the matched GT index of every anchor.

        Same matcher and same rules as ``RetinaNet.label_anchors``; done once per step and shared
        by the detection loss and the distillers.
        """
        anchors = Boxes.cat(anchors)
        gt_labels, matched_gt_boxes, matched = [], [], []
        for gt_per_image in gt_instances:
            quality = pairwise_iou(gt_per_image.gt_boxes, anchors)
            matched_idxs, anchor_labels = self.anchor_matcher(quality)
            del quality
            if len(gt_per_image) > 0:
                boxes_i = gt_per_image.gt_boxes.tensor[matched_idxs]
                labels_i = gt_per_image.gt_classes[matched_idxs]
                labels_i[anchor_labels == 0] = self.num_classes
                labels_i[anchor_labels == -1] = -1
            else:
                boxes_i = torch.zeros_like(anchors.tensor)
                labels_i = torch.zeros_like(matched_idxs) + self.num_classes
            gt_labels.append(labels_i)
            matched_gt_boxes.append(boxes_i)
            matched.append(matched_idxs)
        return gt_labels, matched_gt_boxes, torch.stack(matched)

    def forward(self, batched_inputs):
        if not self.training or self.teacher is None:
            return super().forward(batched_inputs)
        assert "instances" in batched_inputs[0], "Instance annotations are missing in training!"
        # record_function scopes name each component for torch.profiler (speed benchmark);
        # they cost nothing measurable when no profiler is running.
        taps = self._student_taps(batched_inputs)
        images, feats, logits, deltas, gt_instances, anchors, gt_labels, gt_boxes, matched = taps
        with record_function("tbd.student_det_loss"):
            pred_logits, pred_deltas = self._transpose_dense_predictions(
                [logits, deltas], [self.num_classes, 4]
            )
            losses = self.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)

        if len(self.distillers) == 0:
            return losses
        inputs = self._distill_inputs(batched_inputs, images, feats, logits, deltas, anchors,
                                      gt_labels, matched, gt_instances)
        it = _current_iter()
        factor = self.distill_factor(it)
        raw: dict[str, Tensor] = {}
        diag: dict[str, Tensor] = {}
        # Distillation losses are computed in fp32, also under AMP autocast.
        with torch.autocast(device_type=self.device.type, enabled=False):
            inputs = inputs.float()
            for name, distiller in self.distillers.items():
                with record_function(f"tbd.distill.{name}"):
                    d_losses, d_diag = distiller(inputs)
                overlap = set(d_losses) & (set(raw) | set(losses))
                if overlap:
                    raise KeyError(f"Distiller {name} returned duplicate loss keys {overlap}.")
                raw.update(d_losses)
                diag.update(d_diag)
        if self.check_finite:
            self._check_finite(raw, inputs, it)
        # Always multiply, never skip: every adapter takes part in every step (DDP-safe).
        for k, v in raw.items():
            losses[k] = v * factor
        with record_function("tbd.diagnostics"):
            self._record(it, raw, diag, factor)
        return losses

    def _check_finite(self, raw: dict[str, Tensor], inputs: DistillInputs,
                      it: Optional[int]) -> None:
        """Raise FloatingPointError naming the non-finite distillation term(s) and likely cause.

        With several processes the verdict is all-reduced, so every process stops at the same
        step instead of the others waiting in the next collective until its timeout.
        """
        if not raw:
            return
        values = torch.stack([v.detach().float() for v in raw.values()])
        flag = (~torch.isfinite(values)).any().float().reshape(1)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(flag)
        if float(flag.item()) == 0.0:
            return
        bad = [k for k, v in raw.items() if not torch.isfinite(v.detach()).all()]
        if not bad:
            raise FloatingPointError(
                f"A distillation loss is not finite at iteration {it} on another process (rank "
                f"{comm.get_rank()} is finite); see that process's message."
            )
        tensors = {
            "teacher FPN features": inputs.teacher_features,
            "teacher head outputs": list(inputs.teacher_logits) + list(inputs.teacher_deltas),
            "student FPN features": inputs.student_features,
            "student head outputs": list(inputs.student_logits) + list(inputs.student_deltas),
        }
        nonfinite = [n for n, ts in tensors.items()
                     if not all(bool(torch.isfinite(t).all()) for t in ts)]
        if any(n.startswith("teacher") for n in nonfinite):
            hint = ("the teacher produces non-finite outputs: check MODEL.DISTILL.TEACHER.WEIGHTS "
                    "and that the teacher runs in its own precision")
        elif nonfinite:
            hint = f"the student diverged: {_DIVERGED_FIX}"
        else:
            largest = {n: max((float(t.detach().abs().max()) for t in ts if t.numel()),
                              default=0.0) for n, ts in tensors.items()}
            sizes = ", ".join(f"{n} {v:.3g}" for n, v in largest.items())
            student = max(v for n, v in largest.items() if n.startswith("student"))
            teacher = max(v for n, v in largest.items() if n.startswith("teacher"))
            if student > 1e3 * max(teacher, 1.0):  # e.g. |F_S|^2 overflows fp32 above ~1e19
                hint = (f"the inputs are finite but the student's are huge (largest |value|: "
                        f"{sizes}): the student is diverging; {_DIVERGED_FIX}")
            else:
                hint = (f"the inputs are finite (largest |value|: {sizes}), so the term itself "
                        "overflowed: lower its weight (MODEL.DISTILL.*) and report it with this "
                        "message")
        raise FloatingPointError(
            f"Distillation loss {bad} is not finite at iteration {it} "
            f"(values {[float(raw[k].detach()) for k in bad]}). Non-finite inputs: "
            f"{nonfinite or 'none'}; {hint}."
        )

    def _distill_inputs(self, batched_inputs, images, feats, logits, deltas, anchors, gt_labels,
                        matched_idxs, gt_instances) -> DistillInputs:
        teacher = self.teacher
        with torch.no_grad(), record_function("tbd.teacher_forward"):
            t_feats = teacher.backbone(self._teacher_images(batched_inputs, images))
            t_feats = [t_feats[f] for f in teacher.head_in_features]
            t_logits, t_deltas = teacher.head(t_feats)
        return DistillInputs(
            level_names=list(self.head_in_features),
            student_features=feats,
            teacher_features=t_feats,
            student_logits=logits,
            student_deltas=deltas,
            teacher_logits=t_logits,
            teacher_deltas=t_deltas,
            anchors=anchors,
            gt_labels=torch.stack(gt_labels),
            matched_idxs=matched_idxs,
            gt_instances=gt_instances,
            num_classes=self.num_classes,
            student_box2box=self.box2box_transform,
            teacher_box2box=teacher.box2box_transform,
            image_sizes=list(images.image_sizes),
        )

    @torch.no_grad()
    def distill_inputs(self, batched_inputs: list[dict]) -> DistillInputs:
        """The taps of one batch (with GT instances), in the current mode, without gradient.

        For analysis and visualisation tools: call it in eval mode to leave BN statistics alone.
        """
        if self.teacher is None:
            raise TeacherError("distill_inputs needs a teacher (MODEL.DISTILL.TEACHER.*).")
        images, feats, logits, deltas, gt_instances, anchors, gt_labels, _, matched = (
            self._student_taps(batched_inputs)
        )
        return self._distill_inputs(batched_inputs, images, feats, logits, deltas, anchors,
                                    gt_labels, matched, gt_instances)

    def _student_taps(self, batched_inputs):
        """Student forward (features, raw head outputs) and its anchor labelling, once."""
        with record_function("tbd.student_forward"):
            images = self.preprocess_image(batched_inputs)
            feats = self.backbone(images.tensor)
            feats = [feats[f] for f in self.head_in_features]
            logits, deltas = self.head(feats)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        with record_function("tbd.label_anchors"):
            anchors = self.anchor_generator(feats)
            gt_labels, gt_boxes, matched = self.label_anchors_with_indices(anchors, gt_instances)
        return images, feats, logits, deltas, gt_instances, anchors, gt_labels, gt_boxes, matched

    # ----------------------------------------------------------------------------- diagnostics
    def _record(self, it: Optional[int], raw: dict, diag: dict, factor: float) -> None:
        if not self._logged_raw:
            self._logged_raw = True
            logger.info(
                "Distillation terms at the first step (weighted, before the schedule factor "
                "%.3f): %s. Use them to set the MODEL.DISTILL weights on a new dataset.",
                factor, {k: round(float(v.detach()), 6) for k, v in raw.items()},
            )
        if it is None or self.log_period <= 0:
            return
        for k, v in diag.items():
            self._diag_buffer.setdefault(k, []).append(v.detach().float())
        if (it + 1) % self.log_period == 0:
            keys = sorted(self._diag_buffer)
            # One batched device-to-host copy of every diagnostic, once per log period.
            means = torch.stack([torch.stack(self._diag_buffer[k]).mean() for k in keys]).tolist()
            storage = get_event_storage()
            for k, m in zip(keys, means):
                storage.put_scalar(f"distill/{k}", m, smoothing_hint=False)
            storage.put_scalar("distill/factor", factor, smoothing_hint=False)
            self._diag_buffer.clear()
