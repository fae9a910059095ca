"""DistillTrainer: Detectron2's DefaultTrainer with what multi-day distillation runs need.

* Checkpoints are atomic (:class:`tbd.checkpoint.TrainingCheckpointer`); ``--resume`` continues
  from the newest complete one, and partial files of an interrupted save are removed.
* Each checkpoint also holds what stock Detectron2 v0.6 does not persist and exact resumption
  needs: the optimizer state (SGD momentum) and AMP grad scaler, and under ``"tbd"`` the data
  stream's position (:class:`tbd.data.ResumableTrainLoader`), the RNG states (of process 0),
  RetinaNet's EMA loss normaliser, and the teacher's fingerprint (sha256 of its config and
  weights). ``--resume`` restores them; a different teacher is refused before (see
  :func:`tbd.engine.defaults.prepare_training`).
* Multi-process on CPU (gloo): DDP without ``device_ids``; never ``find_unused_parameters``
  (every adapter takes part in every step).
* COCO evaluation; the bundled synthetic datasets are generated on first use.
* ``memory/rss_mb`` is logged (:class:`tbd.engine.hooks.MemoryMonitor`).

The constructor accepts an already built model and checked dataset dicts, so that ``train_net.py``
can build and check everything before it writes to the output folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import weakref
from typing import Optional

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import TrainingCheckpointer, atomic_write_text, remove_stale_temporaries
from ..data import ensure_generated, is_shapes_dataset
from ..data.loader import ResumableTrainLoader, build_resumable_train_loader
from ..modeling.teacher import inherit_from_teacher
from .hooks import MemoryMonitor

logger = logging.getLogger(__name__)

# Detectron2 v0.6's DefaultTrainer checkpoints neither the optimizer (SGD momentum) nor AMP's grad
# scaler: only the iteration and hook states. Later versions save ``self._trainer.state_dict()``
# themselves under "_trainer"; we do it only where DefaultTrainer does not.
_D2_SAVES_INNER_TRAINER = "state_dict" in DefaultTrainer.__dict__


def create_ddp(model: nn.Module) -> nn.Module:
    """DDP for more than one process: Detectron2's on GPUs, ``device_ids=None`` on CPU."""
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type == "cuda":
        return create_ddp_model(model, broadcast_buffers=False)
    return DistributedDataParallel(model, broadcast_buffers=False)


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA, if initialised) RNG states, as checkpoint-safe types."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    st = {
        "python": [version, list(py_state), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    version, py_state, gauss = st["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        if len(st["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(st["cuda"])
        else:
            logger.warning("Checkpoint has CUDA RNG states of %d devices, this machine %d: not "
                           "restored.", len(st["cuda"]), torch.cuda.device_count())


def exact_jit():
    """A context in which scripted functions run the same graph on every call.

    Detectron2's RetinaNet loss calls fvcore's scripted focal loss. With TorchScript's graph
    optimisation on, its first call in a process runs a profiling graph and later calls an
    optimised one, which round differently: a process resumed at iteration k would compute step k
    unlike the uninterrupted process, and the difference grows. Off from a process's first call,
    every call runs the same graph, so a resumed run repeats an uninterrupted one bit for bit.
    """
    return torch.jit.optimized_execution(False)


class DistillTrainer(DefaultTrainer):
    """DefaultTrainer for DistillMetaArch / DistillFCOS (and plain RetinaNet or FCOS) runs; see
    the module doc."""

    def __init__(self, cfg: CfgNode, *, model: Optional[nn.Module] = None,
                 train_dicts: Optional[list[dict]] = None):
        # DefaultTrainer.__init__ rebuilt: v0.6's takes no prebuilt model, its DDP needs CUDA, and
        # its checkpointer is not atomic (the hooks are built from the checkpointer set here).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        if model is None:
            model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg, dataset_dicts=train_dicts)
        self.student = model  # unwrapped: resume state (loss normaliser, teacher fingerprint)
        resumable = isinstance(data_loader, ResumableTrainLoader)
        self.resumable_loader = data_loader if resumable else None
        model = create_ddp(model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = TrainingCheckpointer(model, cfg.OUTPUT_DIR,
                                                 trainer=weakref.proxy(self))
        if comm.is_main_process():
            remove_stale_temporaries(cfg.OUTPUT_DIR)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume: bool = True) -> None:
        """DefaultTrainer's; a new run (nothing to resume) then inherits from the teacher when
        MODEL.DISTILL.INHERIT is set, after MODEL.WEIGHTS is loaded."""
        fresh = not (resume and self.checkpointer.has_checkpoint())
        super().resume_or_load(resume=resume)
        teacher = getattr(self.student, "teacher", None)
        if fresh and teacher is not None and self.cfg.MODEL.DISTILL.INHERIT:
            inherit_from_teacher(self.student, teacher)

    def train(self):
        """DefaultTrainer.train, without TorchScript graph optimisation (see ``exact_jit``);
        the automatic loss weights, if on, are reported at the end (log and auto_weights.json)."""
        with exact_jit():
            results = super().train()
        auto = getattr(self.student, "auto_weight", None)
        if auto is not None and comm.is_main_process():
            logger.info("AUTO_WEIGHT at the end of training:\n%s", auto.report())
            atomic_write_text(os.path.join(self.cfg.OUTPUT_DIR, "auto_weights.json"),
                              json.dumps(auto.summary(), indent=2))
        return results

    def before_train(self):
        super().before_train()
        check = getattr(self.student, "teacher_check", None)
        if check is not None:  # the check ran before the storage existed: recorded once here
            bbox = {k: v for k, v in check["bbox"].items() if math.isfinite(v)}
            self.storage.put_scalars(**{f"teacher_check/{k}": v for k, v in bbox.items()},
                                     smoothing_hint=False)

    # ------------------------------------------------------------------------------- building
    @classmethod
    def build_train_loader(cls, cfg: CfgNode, dataset_dicts: Optional[list[dict]] = None):
        """The resumable loader (TrainingSampler); Detectron2's own for other samplers."""
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            logger.warning("DATALOADER.SAMPLER_TRAIN=%s: using Detectron2's loader, whose position "
                           "is not checkpointed (--resume restarts its sampler).",
                           cfg.DATALOADER.SAMPLER_TRAIN)
            if dataset_dicts is None:
                return build_detection_train_loader(cfg)
            return build_detection_train_loader(cfg, dataset=dataset_dicts)
        return build_resumable_train_loader(cfg, dataset_dicts)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        if is_shapes_dataset(dataset_name):
            ensure_generated(dataset_name)  # COCOEvaluator reads the json_file metadata
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    def build_hooks(self) -> list:
        ret = super().build_hooks()
        keep = self.cfg.SOLVER.get("CHECKPOINT_MAX_TO_KEEP", 0)
        for h in ret:  # Detectron2 builds it without fvcore's max_to_keep
            if isinstance(h, hooks.PeriodicCheckpointer) and keep:
                h.max_to_keep = keep
        # Before the PeriodicWriter (last on the main process), so its values are written at once.
        ret.insert(len(ret) - 1 if comm.is_main_process() else len(ret), MemoryMonitor(20))
        return ret

    # ------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        ret = super().state_dict()
        if not _D2_SAVES_INNER_TRAINER:
            ret["_trainer"] = self._trainer.state_dict()  # optimizer, grad scaler
        normaliser = getattr(self.student, "loss_normalizer", None)
        ret["tbd"] = {
            "teacher": getattr(self.student, "teacher_fingerprint", None),
            "data": self.resumable_loader.state_dict() if self.resumable_loader else None,
            "rng": rng_state(),
            "loss_normalizer": None if normaliser is None else float(normaliser),
        }
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        # The checkpoint's teacher was compared with this one before anything was written
        # (tbd.engine.defaults.prepare_training -> tbd.modeling.teacher.check_resume_teacher).
        extra = state_dict.get("tbd")
        if "_trainer" in state_dict:
            super().load_state_dict(state_dict)  # later versions: also the inner trainer
            if not _D2_SAVES_INNER_TRAINER:
                self._trainer.load_state_dict(state_dict["_trainer"])
        else:  # later DefaultTrainers raise KeyError: restore what the checkpoint has
            TrainerBase.load_state_dict(self, state_dict)
            logger.warning("The checkpoint has no optimizer state ('_trainer'; written by another "
                           "trainer): SGD momentum and the AMP grad scaler restart.")
        if extra is None:
            logger.warning("The checkpoint has no 'tbd' resume state (written by another "
                           "trainer): the data position, RNG states and loss normaliser restart.")
            return
        if extra.get("data") is not None and self.resumable_loader is not None:
            self.resumable_loader.load_state_dict(extra["data"])
        if extra.get("loss_normalizer") is not None:
            self.student.loss_normalizer = extra["loss_normalizer"]
        if comm.is_main_process():  # the states are process 0's; other processes keep their seeds
            set_rng_state(extra["rng"])
        logger.info("Restored the data position, loss normaliser and RNG states of iteration %d.",
                    self.iter)
