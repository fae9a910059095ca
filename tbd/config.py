"""Config keys of the TBD project: ``add_tbd_config(cfg)`` and their validation.

Every key has a comment. Keys marked [ours] are our reconstruction of the paper (only its abstract
is public); see projects/TBD/README.md and shared/docs/METHOD.md.
"""

from __future__ import annotations

import math

from detectron2.config import CfgNode as CN

HS_FORMS = ("harmony", "aligned", "consistency")
BALANCE_MODES = ("fixed", "dynamic")
HD_REG_LOSSES = ("giou", "l1")


def add_tbd_config(cfg: CN) -> None:
    """Add the ``MODEL.DISTILL`` keys (defaults are the method's defaults) to ``cfg`` in place."""
    _C = cfg
    _C.MODEL.DISTILL = CN()
    # Registered distillers (tbd.losses.DISTILL_LOSS_REGISTRY) applied to the student, in order.
    # TBD is ["HD", "TFD"]; ["HD"] and ["TFD"] are its ablations; [] trains the student alone.
    _C.MODEL.DISTILL.LOSSES = ["HD", "TFD"]
    # Iteration at which distillation starts (loss factor 0 before it).
    _C.MODEL.DISTILL.START_ITER = 0
    # Iteration at which distillation stops (factor 0 from it on); -1: never stop.
    _C.MODEL.DISTILL.STOP_ITER = -1
    # Linear warm-up of every distillation term, in iterations after START_ITER.
    # -1 means min(500, SOLVER.MAX_ITER // 10) [ours; FRS warms up over 500 iterations].
    _C.MODEL.DISTILL.WARMUP_ITERS = -1
    # Diagnostics (mean HS, mask masses, per-level losses) are written to the event storage every
    # LOG_PERIOD iterations with one batched device-to-host copy; 0 disables them.
    _C.MODEL.DISTILL.LOG_PERIOD = 20
    # Check every step that each distillation term is finite and stop with the term's name and a
    # diagnosis of its inputs if not (one device-to-host copy per step, which Detectron2's metric
    # writer already does). False leaves non-finite losses to Detectron2's own check.
    _C.MODEL.DISTILL.CHECK_FINITE = True

    _C.MODEL.DISTILL.TEACHER = CN()
    # Teacher config: a yaml path (relative to the working directory) or a Detectron2 model-zoo
    # name such as "COCO-Detection/retinanet_R_101_FPN_3x.yaml". Required.
    _C.MODEL.DISTILL.TEACHER.CONFIG = ""
    # Teacher weights: a local file or a detectron2:// URL. Required unless ALLOW_RANDOM_INIT.
    _C.MODEL.DISTILL.TEACHER.WEIGHTS = ""
    # Overrides merged into the teacher config, e.g. ["MODEL.RETINANET.NUM_CLASSES", "5"].
    _C.MODEL.DISTILL.TEACHER.OPTS = []
    # Allow a teacher with random weights (no WEIGHTS). For tests and debugging only.
    _C.MODEL.DISTILL.TEACHER.ALLOW_RANDOM_INIT = False

    _C.MODEL.DISTILL.HS = CN()
    # Harmony Score form [ours]: "harmony" (s^u * u^s, HQOD), "aligned" (TOOD's s^a * u^b,
    # normalised per GT) or "consistency" ((1 - |s - u|) * max(s, u)).
    _C.MODEL.DISTILL.HS.FORM = "harmony"
    # Exponent of the teacher's classification quality s in the "aligned" form.
    _C.MODEL.DISTILL.HS.ALIGNED_ALPHA = 1.0
    # Exponent of the teacher's localisation quality u in the "aligned" form (TOOD uses 6).
    _C.MODEL.DISTILL.HS.ALIGNED_BETA = 2.0

    _C.MODEL.DISTILL.HD = CN()
    # Weight of the HS-weighted classification distillation (BCE to the teacher's scores).
    # 0.5 avoided the stalled start that 1 of 3 seeds had on the synthetic full profile, but
    # lowered the other seeds (benchmarks README, "HD classification weight check").
    _C.MODEL.DISTILL.HD.CLS_WEIGHT = 1.0
    # Weight of the HS-weighted box distillation on foreground anchors.
    _C.MODEL.DISTILL.HD.REG_WEIGHT = 1.0
    # Weight of background anchors in the classification term, times the teacher's max score.
    # 0 distils foreground anchors only; > 0 also distils background suppression (FRS-style).
    _C.MODEL.DISTILL.HD.BG_WEIGHT = 0.0
    # Box distillation loss: "giou" on decoded boxes, or "l1" on box deltas.
    _C.MODEL.DISTILL.HD.REG_LOSS = "giou"

    _C.MODEL.DISTILL.TFD = CN()
    # Weight of the task-decoupled feature imitation loss (FRS's feature weight) [ours].
    _C.MODEL.DISTILL.TFD.WEIGHT = 0.005
    # Share of the classification-quality mask: M = GAMMA * M_cls + (1 - GAMMA) * M_reg.
    _C.MODEL.DISTILL.TFD.GAMMA = 0.5
    # "fixed": mix the raw masks; "dynamic": first divide each mask by its own mass per image and
    # level, so that neither task dominates by scale alone [ours].
    _C.MODEL.DISTILL.TFD.BALANCE_MODE = "fixed"
    # Kernel size of the student-to-teacher feature adapter (1 = 1x1 conv, 3 = FRS's 3x3).
    _C.MODEL.DISTILL.TFD.ADAPTER_KERNEL = 1

    # FRS baseline (Du et al. 2021), LOSSES: ["FRS"]. Official RetinaNet weights.
    _C.MODEL.DISTILL.FRS = CN()
    # Weight of the score-masked feature imitation term.
    _C.MODEL.DISTILL.FRS.FEAT_WEIGHT = 0.005
    # Weight of the score-masked classification (BCE to teacher scores) term.
    _C.MODEL.DISTILL.FRS.CLS_WEIGHT = 0.02
    # Kernel size of FRS's feature adapter (3 in the official code).
    _C.MODEL.DISTILL.FRS.ADAPTER_KERNEL = 3

    # FGD baseline (Yang et al. 2022), LOSSES: ["FGD"]. Official RetinaNet weights.
    _C.MODEL.DISTILL.FGD = CN()
    # Weight of the foreground focal (attention-weighted, GT-box-masked) feature term.
    _C.MODEL.DISTILL.FGD.ALPHA_FG = 1e-3
    # Weight of the background focal feature term.
    _C.MODEL.DISTILL.FGD.BETA_BG = 5e-4
    # Weight of the spatial + channel attention imitation term.
    _C.MODEL.DISTILL.FGD.GAMMA_ATTN = 5e-4
    # Weight of the global (context block) relation term.
    _C.MODEL.DISTILL.FGD.LAMBDA_GLOBAL = 5e-6
    # Temperature of the attention softmaxes.
    _C.MODEL.DISTILL.FGD.TEMPERATURE = 0.5


def load_config(config_file: str, opts: list | None = None, cpu_fallback: bool = True) -> CN:
    """get_cfg() + add_tbd_config + a yaml + overrides; ``cuda`` falls back to cpu if absent.

    Detectron2's default MODEL.DEVICE is "cuda"; the fallback lets the CPU-first configs and tools
    run anywhere (a warning is logged by callers that care).
    """
    import torch
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_tbd_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    if cpu_fallback and cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def _weight_keys(cfg: CN) -> dict[str, float]:
    d = cfg.MODEL.DISTILL
    return {
        "MODEL.DISTILL.HD.CLS_WEIGHT": d.HD.CLS_WEIGHT,
        "MODEL.DISTILL.HD.REG_WEIGHT": d.HD.REG_WEIGHT,
        "MODEL.DISTILL.HD.BG_WEIGHT": d.HD.BG_WEIGHT,
        "MODEL.DISTILL.TFD.WEIGHT": d.TFD.WEIGHT,
        "MODEL.DISTILL.HS.ALIGNED_ALPHA": d.HS.ALIGNED_ALPHA,
        "MODEL.DISTILL.HS.ALIGNED_BETA": d.HS.ALIGNED_BETA,
        "MODEL.DISTILL.FRS.FEAT_WEIGHT": d.FRS.FEAT_WEIGHT,
        "MODEL.DISTILL.FRS.CLS_WEIGHT": d.FRS.CLS_WEIGHT,
        "MODEL.DISTILL.FGD.ALPHA_FG": d.FGD.ALPHA_FG,
        "MODEL.DISTILL.FGD.BETA_BG": d.FGD.BETA_BG,
        "MODEL.DISTILL.FGD.GAMMA_ATTN": d.FGD.GAMMA_ATTN,
        "MODEL.DISTILL.FGD.LAMBDA_GLOBAL": d.FGD.LAMBDA_GLOBAL,
    }


def validate_distill_config(cfg: CN) -> None:
    """Check the student-side ``MODEL.DISTILL`` keys; raise ValueError naming the bad key."""
    d = cfg.MODEL.DISTILL
    for key, value in _weight_keys(cfg).items():
        if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
            raise ValueError(f"{key} must be a finite number >= 0, got {value!r}.")
    if d.HS.FORM not in HS_FORMS:
        raise ValueError(f"MODEL.DISTILL.HS.FORM={d.HS.FORM!r} is unknown; use one of {HS_FORMS}.")
    if d.TFD.BALANCE_MODE not in BALANCE_MODES:
        raise ValueError(
            f"MODEL.DISTILL.TFD.BALANCE_MODE={d.TFD.BALANCE_MODE!r} is unknown; "
            f"use one of {BALANCE_MODES}."
        )
    if not 0.0 <= d.TFD.GAMMA <= 1.0:
        raise ValueError(f"MODEL.DISTILL.TFD.GAMMA must be in [0, 1], got {d.TFD.GAMMA}.")
    if not d.FGD.TEMPERATURE > 0:
        raise ValueError(f"MODEL.DISTILL.FGD.TEMPERATURE must be > 0, got {d.FGD.TEMPERATURE}.")
    if d.FRS.ADAPTER_KERNEL not in (1, 3):
        raise ValueError(
            f"MODEL.DISTILL.FRS.ADAPTER_KERNEL must be 1 or 3, got {d.FRS.ADAPTER_KERNEL}."
        )
    if d.TFD.ADAPTER_KERNEL not in (1, 3):
        raise ValueError(
            f"MODEL.DISTILL.TFD.ADAPTER_KERNEL must be 1 or 3, got {d.TFD.ADAPTER_KERNEL}."
        )
    if d.HD.REG_LOSS not in HD_REG_LOSSES:
        raise ValueError(
            f"MODEL.DISTILL.HD.REG_LOSS={d.HD.REG_LOSS!r} is unknown; use one of {HD_REG_LOSSES}."
        )
    if d.STOP_ITER >= 0 and d.STOP_ITER <= d.START_ITER:
        raise ValueError(
            f"MODEL.DISTILL.STOP_ITER ({d.STOP_ITER}) must be -1 or > START_ITER ({d.START_ITER})."
        )
    if d.START_ITER < 0:
        raise ValueError(f"MODEL.DISTILL.START_ITER must be >= 0, got {d.START_ITER}.")


def resolve_warmup_iters(cfg: CN) -> int:
    """``MODEL.DISTILL.WARMUP_ITERS``, with -1 resolved to min(500, SOLVER.MAX_ITER // 10)."""
    w = cfg.MODEL.DISTILL.WARMUP_ITERS
    return min(500, cfg.SOLVER.MAX_ITER // 10) if w < 0 else int(w)


def student_config(cfg: CN) -> CN:
    """A stock-Detectron2 config of the student: RetinaNet, without ``MODEL.DISTILL`` keys.

    Stock ``get_cfg()`` rejects unknown keys, so a released student config must not carry them.
    """
    out = cfg.clone()
    out.defrost()
    out.MODEL.META_ARCHITECTURE = "RetinaNet"
    if "DISTILL" in out.MODEL:
        del out.MODEL["DISTILL"]
    return out
