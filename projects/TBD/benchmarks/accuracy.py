#!/usr/bin/env python
"""Accuracy benchmark: baseline vs FRS vs FGD vs TBD students on the synthetic shapes dataset.

    .venv/bin/python projects/TBD/benchmarks/accuracy.py \\
        --teacher-weights output/shapes/teacher_R18_FPN256/model_final.pth --profile cpu

The teacher is trained once, to convergence, outside this benchmark (see benchmarks/README.md)
and passed in; each profile names its teacher's config (``--teacher-config`` overrides it): all
use the R18-FPN256 teacher (9000 iterations).
Every student row uses the same data, schedule and evaluation; a seed changes initialisation and
data order, not the dataset. Main rows (baseline, FRS, FGD, TBD) run with 3 seeds; ablations
(HD only, TFD only, TBD with each other HS form, TBD with one weight or the balance mode changed)
with 1 seed and are marked indicative.

Each run is a ``train_net.py`` subprocess; finished runs are kept in ``--work-dir`` (checkpoints,
logs, one json per run) and skipped when the benchmark is re-run, so an interrupted benchmark
resumes, also in another sitting: ``invocations.json`` in the work dir sums the wall time of
every invocation, the profile's real run time. A work dir belongs to one teacher: re-running it
with another is refused. Results (results.json, results.md, accuracy.png)
go to ``--output`` after every run. A run that stops on a non-finite loss (``FloatingPointError``)
is recorded as diverged, outside the means, and kept like a finished run (delete its json to try
it again); any other failure stops the benchmark once the runs in progress are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    eval_bbox,
    git_commit,
    log_beside,
    model_gflops,
    run_logged,
    write_results,
)

SHAPES = "projects/TBD/configs/shapes"
METHODS = {  # method -> (config, extra overrides)
    "baseline": (f"{SHAPES}/retinanet_R18_FPN64_student.yaml", []),
    "frs": (f"{SHAPES}/frs_R34_to_R18.yaml", []),
    "fgd": (f"{SHAPES}/fgd_R34_to_R18.yaml", []),
    "tbd": (f"{SHAPES}/tbd_R34_to_R18.yaml", []),
    "hd": (f"{SHAPES}/hd_only_R34_to_R18.yaml", []),
    "tfd": (f"{SHAPES}/tfd_only_R34_to_R18.yaml", []),
}
# Trained to convergence (9000 iterations, 40.9 AP): benchmarks/README.md. The R34-FPN128 teacher
# (3000 iterations, 4.8 AP) that the cpu profile used first was undertrained.
TEACHER = f"{SHAPES}/retinanet_R18_FPN256_teacher.yaml"
PROFILES = {
    # iterations per student run, main-row seeds, ablation seeds, datasets, teacher config
    "smoke": dict(iters=20, seeds=[0], ablation_seeds=[0], train="tbd_shapes_mini_train",
                  val="tbd_shapes_mini_val", teacher=TEACHER),
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


MAIN_METHODS = ("baseline", "frs", "fgd", "tbd")


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


def run_name(spec: dict) -> str:
    if spec.get("variant"):
        return f"tbd_{spec['variant']}_s{spec['seed']}"
    form = f"_{spec['hs_form']}" if spec["hs_form"] and spec["method"] == "tbd" else ""
    return f"{spec['method']}{form}_s{spec['seed']}"


THREADS: dict = {}  # extra environment of the subprocesses (OMP_NUM_THREADS with --jobs > 1)


def threads_per_run(torch_default: int) -> int:
    """The intra-op threads each run gets: 1 with --jobs > 1, else OMP_NUM_THREADS if the caller
    set it, else torch's default. Recorded because it changes the results: floating-point sums
    differ with the thread count, and a run that stalls with one thread may not with two."""
    return int(THREADS.get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
               or torch_default)


def sh(cmd: list[str], log: Path) -> None:
    run_logged(cmd, log, THREADS)


def last_eval(metrics_json: Path) -> dict:
    """Final bbox metrics and the median s/iter from a run's metrics.json."""
    records = [json.loads(x) for x in metrics_json.read_text().splitlines() if x.strip()]
    evals = [r for r in records if "bbox/AP" in r]
    times = [r["time"] for r in records if "time" in r]
    res = {k: evals[-1].get(f"bbox/{k}") for k in METRICS} if evals else {}
    res = {k: (None if v is None or v != v else float(v)) for k, v in res.items()}
    res["train_s_per_iter"] = statistics.median(times) if times else None
    return res


INFER_TIME = re.compile(r"Total inference pure compute time: .*?\(([\d.]+) s / iter per device")


def infer_time(log: Path) -> float | None:
    """The last inference time Detectron2's evaluator logged in ``log``, in s per image.

    Its "pure compute time" (model forward and post-processing, no data loading, first 5 images
    excluded) per iteration of the test loader, whose batch is 1 image.
    """
    hits = INFER_TIME.findall(log.read_text()) if log.is_file() else []
    return float(hits[-1]) if hits else None


DIVERGED = re.compile(r"^FloatingPointError: (.*)$", re.M)


def divergence(log: Path) -> str | None:
    """Why a training run stopped on a non-finite loss, from its log, or None.

    Detectron2's trainer and DistillMetaArch raise ``FloatingPointError`` when a loss becomes
    inf/NaN. With a fixed seed that is a result of the settings (it recurs on a rerun), so the
    benchmark records it as the run's outcome; any other failure (a bad option, a killed process)
    stops the benchmark instead.
    """
    hits = DIVERGED.findall(log.read_text()) if log.is_file() else []
    return hits[-1] if hits else None


def harmony(config: str, weights: str, val: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "projects/TBD/tools/analyze_harmony.py", "--config-file", config,
           "--dataset", val, "--output", str(out), *extra, "MODEL.WEIGHTS", weights]
    sh(cmd, log_beside(out))
    h = json.loads((out / "harmony.json").read_text())
    return {"harmonious_proportion": h["harmonious_proportion"],
            "score_iou_spearman": h["score_iou_spearman"]}


def train_student(spec: dict, args, profile: dict, runs: Path) -> dict:
    name = run_name(spec)
    done = runs / f"{name}.json"
    if done.is_file():  # rows of older code lack the inference time: read it from the log
        row = json.loads(done.read_text())
        return {"infer_s_per_image": infer_time(runs / f"{name}.log"), **row}
    config, extra = METHODS[spec["method"]]
    out = runs / name
    iters = profile["iters"]
    opts = ["SEED", str(spec["seed"]), "SOLVER.MAX_ITER", str(iters),
            "SOLVER.STEPS", f"({int(iters * 0.8)}, {int(iters * 0.93)})",
            "SOLVER.WARMUP_ITERS", str(min(200, iters // 5)),
            "SOLVER.CHECKPOINT_PERIOD", str(10 * iters), "TEST.EVAL_PERIOD", "0",
            "DATASETS.TRAIN", f"('{profile['train']}',)", "DATASETS.TEST", f"('{profile['val']}',)",
            "OUTPUT_DIR", str(out), *extra]
    if spec["method"] != "baseline":
        opts += ["MODEL.DISTILL.TEACHER.CONFIG", args.teacher_config,
                 "MODEL.DISTILL.TEACHER.WEIGHTS", args.teacher_weights]
        if spec["hs_form"]:
            opts += ["MODEL.DISTILL.HS.FORM", spec["hs_form"]]
        opts += spec.get("opts", []) + args.opts
    if out.exists():  # an interrupted invocation's unfinished run: start it again, cleanly
        print(f"removing the unfinished run {out}", flush=True)
        shutil.rmtree(out)
    t0 = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] training {name} ({iters} iters)", flush=True)
    log = runs / f"{name}.log"
    try:
        sh([sys.executable, "projects/TBD/train_net.py", "--config-file", config, *opts], log)
    except RuntimeError:
        reason = divergence(log)
        if reason is None:
            raise
        # kept like a finished run (delete <name>.json to try again); its folder keeps the logs
        print(f"[{time.strftime('%H:%M:%S')}] {name} diverged: {reason}", flush=True)
        row = {**spec, "iters": iters, "failed": reason, "wall_s": round(time.time() - t0, 1)}
        done.write_text(json.dumps(row, indent=2))
        return row
    row = {**spec, "iters": iters, **last_eval(out / "metrics.json"),
           "infer_s_per_image": infer_time(runs / f"{name}.log")}
    row.update(harmony(config, str(out / "model_final.pth"), profile["val"], runs / f"{name}_h",
                       []))
    row["wall_s"] = round(time.time() - t0, 1)
    done.write_text(json.dumps(row, indent=2))
    return row


def teacher_row(args, profile: dict, runs: Path) -> dict:
    done = runs / "teacher.json"
    if done.is_file():
        row = json.loads(done.read_text())
        kept = (row.get("teacher_config", args.teacher_config),
                row.get("teacher_weights", args.teacher_weights))
        if kept != (args.teacher_config, args.teacher_weights):
            sys.exit(f"{runs}: its runs used the teacher {kept}, not ({args.teacher_config!r}, "
                     f"{args.teacher_weights!r}). Give another --work-dir for another teacher.")
        return {"infer_s_per_image": infer_time(runs / "teacher_eval.log"), **row}
    config = args.teacher_config
    res = eval_bbox(config, args.teacher_weights, profile["val"], runs / "teacher_eval",
                    runs / "teacher_eval.log", THREADS)
    row = {"method": "teacher", "hs_form": None, "seed": None, "iters": None, "indicative": False,
           "teacher_config": args.teacher_config, "teacher_weights": args.teacher_weights,
           **{k: res.get(k) for k in METRICS}, "train_s_per_iter": None,
           "infer_s_per_image": infer_time(runs / "teacher_eval.log")}
    row.update(harmony(config, args.teacher_weights, profile["val"], runs / "teacher_h", []))
    done.write_text(json.dumps(row, indent=2))
    return row


def label(row: dict) -> str:
    if row.get("variant"):
        return f"tbd ({row['variant']})"
    if row["method"] == "tbd" and row["hs_form"] != "harmony":
        return f"tbd ({row['hs_form']} HS)"
    return row["method"]


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(label(r), []).append(r)
    out = []
    for name, rs in groups.items():
        ok = [r for r in rs if not r.get("failed")]
        agg = {"row": name, "n_seeds": len([r for r in ok if r["seed"] is not None]) or len(ok[:1]),
               "indicative": rs[0]["indicative"],
               "failed": [f"seed {r['seed']}: {r['failed']}" for r in rs if r.get("failed")]}
        for k in METRICS + ["harmonious_proportion", "score_iou_spearman", "infer_s_per_image"]:
            vals = [r[k] for r in ok if r.get(k) is not None]
            agg[k] = statistics.mean(vals) if vals else None
            agg[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(agg)
    return out


def markdown(agg: list[dict], settings: dict, pooled: float | None) -> str:
    def cell(a, k, scale=1.0, digits=1):
        v, s = a[k], a[k + "_std"]
        if v is None:
            return "n/a"
        return f"{v * scale:.{digits}f}" + ("" if s is None else f" ± {s * scale:.{digits}f}")

    lines = [f"# Accuracy benchmark ({settings['profile']} profile)", "",
             f"Students: R18-FPN64 (2 head convs), {settings['iters']} iterations at batch 8, "
             f"128x128, trained on {settings['train']} and evaluated on {settings['val']}. "
             "Mean ± standard deviation (ddof 1) over seeds; rows marked * ran 1 seed and are "
             "indicative only."
             + (f" Teacher: `{settings['teacher_config']}`." if settings.get("teacher_config")
                else "")
             + (f" Every distilled run adds `{' '.join(settings['extra_opts'])}`."
                if settings.get("extra_opts") else ""), "",
             "| row | seeds | AP | AP50 | AP75 | APs | APm | APl | harmonious % | spearman "
             "| infer ms/img |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in agg:
        mark = "*" if a["indicative"] else ""
        seeds = f"{a['n_seeds']}" + (f" (+{len(a['failed'])} failed)" if a.get("failed") else "")
        lines.append(
            f"| {a['row']}{mark} | {seeds} | " + " | ".join(cell(a, k) for k in METRICS)
            + f" | {cell(a, 'harmonious_proportion', 100)} | "
            f"{cell(a, 'score_iou_spearman', 1, 3)} | {cell(a, 'infer_s_per_image', 1000, 0)} |")
    failures = [f"- {a['row']}, {f}" for a in agg for f in a.get("failed", [])]
    if failures:
        lines += ["", "Runs that stopped on a non-finite loss (not in the means; their logs are "
                  "in the work dir):", "", *failures]
    cost = settings.get("gflops_per_image")
    if cost:
        t, s = cost["teacher"], cost["student"]
        lines += ["", f"Cost of one 128x128 image (fvcore, inference forward without "
                  f"post-processing): teacher {t['total']:.2f} GFLOPs (backbone+FPN "
                  f"{t['backbone_fpn']:.2f}, head {t['head']:.2f}), student {s['total']:.2f} "
                  f"({s['backbone_fpn']:.2f}, {s['head']:.2f}). Inference time: Detectron2's "
                  "evaluator, per image, forward and post-processing"
                  + (", one thread, beside another run." if settings.get("jobs", 1) > 1
                     else ".")]
    if settings.get("invocations"):
        lines += ["", f"Wall time: {settings['wall_minutes_all_invocations']} min over "
                  f"{settings['invocations']} invocation(s) of the benchmark"
                  + ("." if settings.get("complete") else ", not complete yet.")]
    if pooled is not None:
        lines += ["", f"Pooled seed standard deviation of AP over the main rows: {pooled:.2f}. "
                  f"A difference counts only above twice that ({2 * pooled:.2f} AP)."]
    return "\n".join(lines) + "\n"


def pooled_std(rows: list[dict]) -> float | None:
    groups: dict[str, list[float]] = {}
    for r in rows:
        if not r["indicative"] and r["method"] != "teacher" and r.get("AP") is not None:
            groups.setdefault(label(r), []).append(r["AP"])
    num = sum((len(v) - 1) * statistics.variance(v) for v in groups.values() if len(v) > 1)
    den = sum(len(v) - 1 for v in groups.values() if len(v) > 1)
    return (num / den) ** 0.5 if den else None


def plot(agg: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [a["row"] + ("*" if a["indicative"] else "") + ("\n(diverged)" if not a["n_seeds"]
                                                            else "") for a in agg]
    ap = [a["AP"] or 0 for a in agg]
    err = [a["AP_std"] or 0 for a in agg]
    fig, ax = plt.subplots(figsize=(1.1 * len(agg) + 2, 3.5))
    ax.bar(names, ap, yerr=err, capsize=3, color=["#888" if n == "teacher" else "#4878a8"
                                                   for n in names])
    ax.set_ylabel("box AP (val)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def record_invocation(runs: Path, started: str, wall_s: float, finished_runs: int,
                      commit: str) -> list[dict]:
    """Keep this invocation's wall time in ``runs/invocations.json``; return every invocation's.

    A profile too long for one sitting is finished over several invocations (finished runs are
    kept), so its real run time is the sum of theirs. Each counts up to its last finished run:
    time spent on a run that was interrupted, and repeated later, is not counted.
    ``finished_runs``: the profile's runs finished so far, by this invocation or earlier ones.
    """
    from tbd.checkpoint import atomic_write_text

    path = runs / "invocations.json"
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries = [e for e in entries if e["started"] != started]
    entries.append({"started": started, "wall_s": round(wall_s, 1),
                    "runs_finished": finished_runs, "commit": commit})
    atomic_write_text(str(path), json.dumps(entries, indent=2))
    return entries


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher-weights", required=True)
    p.add_argument("--teacher-config", default=None, help="the teacher's config; default: the "
                   "profile's teacher (PROFILES[...]['teacher'])")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument("--output", default=None, help="results folder (committed); default "
                   "projects/TBD/benchmarks/results/accuracy_<profile>")
    p.add_argument("--work-dir", default=None, help="run folders, logs and checkpoints (not "
                   "committed); default output/benchmarks/accuracy_<profile>")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="main-row seeds instead "
                   "of the profile's (e.g. 0 1 2 3 4 adds two seeds to a finished profile: its "
                   "runs are kept; the ablations keep their seeds)")
    p.add_argument("--methods", nargs="+", choices=MAIN_METHODS, default=list(MAIN_METHODS),
                   help="main rows to run (default: all four)")
    p.add_argument("--no-ablations", action="store_true", help="skip the one-seed ablation rows")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="config options added to every distilled run (a variant of the profile, "
                   "e.g. MODEL.DISTILL.WARMUP_ITERS 200); needs its own --work-dir and --output")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel; with more than one, "
                   "each run gets OMP_NUM_THREADS=1 (more throughput on few cores)")
    args = p.parse_args(argv)
    if args.jobs > 1:
        THREADS["OMP_NUM_THREADS"] = "1"
    if not Path(args.teacher_weights).is_file():
        sys.exit(f"--teacher-weights {args.teacher_weights!r}: file not found. Train the teacher "
                 "first (projects/TBD/README.md, 'Benchmarks').")
    if args.opts and (len(args.opts) % 2 or not (args.work_dir and args.output)):
        sys.exit("--opts takes KEY VALUE pairs and needs its own --work-dir and --output, so that "
                 "the variant's runs and results do not mix with the profile's.")
    profile = dict(PROFILES[args.profile])
    if args.seeds:
        profile["seeds"] = sorted(set(args.seeds))
    args.teacher_config = args.teacher_config or profile["teacher"]
    if not Path(args.teacher_config).is_file():
        sys.exit(f"--teacher-config {args.teacher_config!r}: file not found.")
    out = Path(args.output or ROOT / "projects/TBD/benchmarks/results" / f"accuracy_{args.profile}")
    runs = Path(args.work_dir or ROOT / "output/benchmarks" / f"accuracy_{args.profile}")
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    commit = git_commit()  # the code this invocation runs, even if commits land meanwhile
    rows = [teacher_row(args, profile, runs)]
    record_invocation(runs, started, time.time() - t0, 0, commit)
    import torch

    settings = {"profile": args.profile, **profile, "batch": 8, "image_size": [128, 128],
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "teacher_config": args.teacher_config, "teacher_weights": args.teacher_weights,
                "jobs": args.jobs, "methods": args.methods, "ablations": not args.no_ablations,
                "extra_opts": args.opts,
                "threads_per_run": threads_per_run(torch.get_num_threads()),
                "gflops_per_image": {"teacher": model_gflops(args.teacher_config),
                                     "student": model_gflops(METHODS["baseline"][0])}}
    specs = run_specs(profile, tuple(args.methods), not args.no_ablations)
    done: dict[int, dict] = {}
    # runs finished by earlier invocations first (they only read their rows), so that results.md
    # lists all of them from the start; then the rest in seed-major order (a stable sort)
    order = sorted(range(len(specs)),
                   key=lambda i: not (runs / f"{run_name(specs[i])}.json").is_file())
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(train_student, specs[i], args, profile, runs): i for i in order}
        errors = []
        for fut in as_completed(futures):
            if fut.cancelled():  # not started: an earlier run failed
                continue
            try:
                done[futures[fut]] = fut.result()
            except Exception as e:  # not a divergence: finish (and record) the runs in
                errors.append((run_name(specs[futures[fut]]), e))  # progress, start no more
                print(f"{errors[-1][0]} failed; the benchmark stops after the runs in progress",
                      flush=True)
                pool.shutdown(wait=False, cancel_futures=True)
            rows = rows[:1] + [done[i] for i in sorted(done)]
            agg = aggregate(rows)
            settings["wall_minutes_this_invocation"] = round((time.time() - t0) / 60, 1)
            calls = record_invocation(runs, started, time.time() - t0, len(done), commit)
            settings["invocations"] = len(calls)
            settings["wall_minutes_all_invocations"] = round(
                sum(c["wall_s"] for c in calls) / 60, 1)
            settings["complete"] = len(done) == len(specs)
            md = markdown(agg, settings, pooled_std(rows))
            write_results(out, "accuracy", settings, rows, md, commit)  # incremental
            plot(agg, out / "accuracy.png")
    if errors:
        raise RuntimeError(f"{len(errors)} run(s) failed: {', '.join(n for n, _ in errors)}; "
                           "see their logs in the work dir") from errors[0][1]
    print(markdown(aggregate(rows), settings, pooled_std(rows)))


if __name__ == "__main__":
    main()
