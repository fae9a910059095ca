"""The accuracy benchmark's protocol: which runs a profile makes (methods, schedules, seeds,
splits, ablations) and how they are named. Orchestration is in ``accuracy.py``, statistics and
tables in ``accuracy_report.py``."""

from __future__ import annotations

from tbd.distillers import METHODS as LIBRARY_METHODS
from tbd_benchmarks.common import PAIR, SHAPES, method_config

# The main rows are tbd.METHODS (the student alone and every registered method), by lower-case
# name; "hd" and "tfd" are TBD's one-term ablations.
MAIN_METHODS = tuple(m.lower() for m in LIBRARY_METHODS)
METHODS = {  # method -> (config, extra overrides)
    **{m.lower(): (method_config(m), []) for m in LIBRARY_METHODS},
    "hd": (f"{SHAPES}/hd_only_{PAIR}.yaml", []),
    "tfd": (f"{SHAPES}/tfd_only_{PAIR}.yaml", []),
}
# The teacher every profile distils: trained once, to convergence (benchmarks/README.md, "The
# teacher").
TEACHER = f"{SHAPES}/retinanet_R18_FPN256_teacher.yaml"
PROFILES = {
    # iterations per student run, main-row seeds, ablation seeds, datasets, teacher config
    # smoke: a pipeline check, also with a briefly trained teacher, so the teacher check before
    # training accepts any AP (MODEL.DISTILL.TEACHER.EVAL_MIN_AP 0; it still runs and is logged).
    "smoke": dict(iters=20, seeds=[0], ablation_seeds=[0], train="tbd_shapes_mini_train",
                  val="tbd_shapes_mini_val", teacher=TEACHER, teacher_min_ap=0.0),
    "cpu": dict(iters=500, seeds=[0, 1, 2], ablation_seeds=[0], train="tbd_shapes_train",
                val="tbd_shapes_val", teacher=TEACHER),
    # The cpu protocol run on a GPU: its run time there, and a check that results carry over.
    "gpu": dict(iters=500, seeds=[0, 1, 2], ablation_seeds=[0], train="tbd_shapes_train",
                val="tbd_shapes_val", teacher=TEACHER),
    # 6x the cpu schedule; the teacher is trained 3x as long as these students.
    "full": dict(iters=3000, seeds=[0, 1, 2], ablation_seeds=[0], train="tbd_shapes_train",
                 val="tbd_shapes_val", teacher=TEACHER),
}
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]



def run_specs(profile: dict, methods: tuple = MAIN_METHODS, ablations: bool = True) -> list[dict]:
    """The runs of a profile, seed-major: every method's seed-0 run comes before any seed-1 run,
    so a long profile stopped early (and resumed later) already compares all methods."""
    specs = []
    for seed in profile["seeds"]:
        for method in methods:
            specs.append({"method": method, "hs_form": "harmony" if method == "tbd" else None,
                          "seed": seed, "indicative": False})
    for seed in profile["ablation_seeds"] if ablations else []:
        specs.append({"method": "hd", "hs_form": "harmony", "seed": seed, "indicative": True})
        specs.append({"method": "tfd", "hs_form": None, "seed": seed, "indicative": True})
        for form in ("aligned", "consistency"):
            specs.append({"method": "tbd", "hs_form": form, "seed": seed, "indicative": True})
        for variant, opts in TBD_VARIANTS.items():
            specs.append({"method": "tbd", "hs_form": "harmony", "variant": variant, "opts": opts,
                          "seed": seed, "indicative": True})
    return specs


# TBD with one default changed (indicative ablations of the weights and the balance mode), and
# TBD with its defaults again ("defaults": a same-code reference when rows come from several
# commits of a resumed benchmark).
TBD_VARIANTS = {
    "defaults": [],
    "tfd_dynamic": ["MODEL.DISTILL.TFD.BALANCE_MODE", "dynamic"],
    "tfd_w0.0025": ["MODEL.DISTILL.TFD.WEIGHT", "0.0025"],
    "hd_bg0.5": ["MODEL.DISTILL.HD.BG_WEIGHT", "0.5"],
}


def label_by_opts(specs: list[dict], opts: list[str]) -> list[dict]:
    """The specs with TBD runs labelled by the HS form ``opts`` (a variant's --opts) gives them:
    the form they train with, so their names and results rows say it."""
    form = dict(zip(opts[::2], opts[1::2])).get("MODEL.DISTILL.HS.FORM")
    return [dict(s, hs_form=form) if form and s["method"] == "tbd" else s for s in specs]


def run_name(spec: dict) -> str:
    if spec.get("variant"):
        return f"tbd_{spec['variant']}_s{spec['seed']}"
    form = f"_{spec['hs_form']}" if spec["hs_form"] and spec["method"] == "tbd" else ""
    return f"{spec['method']}{form}_s{spec['seed']}"


def label(row: dict) -> str:
    if row.get("variant"):
        return f"tbd ({row['variant']})"
    if row["method"] == "tbd" and row["hs_form"] != "harmony":
        return f"tbd ({row['hs_form']} HS)"
    return row["method"]
