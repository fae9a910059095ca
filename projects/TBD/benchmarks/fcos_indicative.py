#!/usr/bin/env python
"""An indicative FCOS result: an FCOS student distilled with TBD and with FGD, against its baseline.

    python projects/TBD/benchmarks/fcos_indicative.py            # resumes; about 45 min on 2 cores

Fixed before any run (nothing here is chosen by looking at results):

* Task: the demo's (``tbd_demo_train`` 2000 images, reported on ``tbd_demo_test`` 200, 64 px).
* Teacher: ``configs/demo/fcos_R50w16_FPN64_teacher.yaml``, trained once with its own config
  (``--teacher-weights``; its AP on the test split and its sha256 are recorded).
* Student: ``configs/demo/fcos_R50w8_FPN32_student.yaml`` (its 1000-iteration schedule, the same
  for every method). Methods: baseline, TBD (HD + TFD) and FGD, each with its shipped default
  weights: no tuning, so no split is needed to choose on. FGD is the feature distiller because it
  was the strongest one of the committed v1 benchmark; PKD and MGD have no benchmark yet.
* Seeds 0, 1, 2 (``SEED``): the same seed gives every method the same initialisation and data
  order, so differences are paired.
* Failure: a run that stops with an error (a non-finite loss, say) or ends below 1.0 AP.
* Statistics: per method mean and standard deviation; paired differences (method - baseline,
  TBD - FGD) with 95% t-intervals (``scipy.stats``); failures as counts with a Clopper-Pearson
  interval.

Indicative only: 3 seeds, short schedules (the students are not converged), one task. It makes no
claim of the accuracy protocol v2 (docs/benchmarks.md). Each finished run writes its
``result.json``; a rerun skips finished runs and resumes an interrupted one (``--resume``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from tbd_benchmarks.common import (
    ROOT,
    eval_bbox,
    git_commit,
    log_beside,
    run_logged,
    write_results,
)

DEMO = "projects/TBD/configs/demo"
CONFIGS = {
    "baseline": f"{DEMO}/fcos_R50w8_FPN32_student.yaml",
    "TBD": f"{DEMO}/tbd_fcos_R50w16_to_R50w8.yaml",
    "FGD": f"{DEMO}/fgd_fcos_R50w16_to_R50w8.yaml",
}
TEACHER_CONFIG = f"{DEMO}/fcos_R50w16_FPN64_teacher.yaml"
TEST = "tbd_demo_test"
FAILED_BELOW_AP = 1.0


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of the paired differences a - b with its 95% t-interval (None below 2 pairs)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"n": len(d), "mean": mean, "ci95": None}
    sem = stats.sem(d)
    if sem == 0:
        return {"n": len(d), "mean": mean, "ci95": [mean, mean]}
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=mean, scale=sem)
    return {"n": len(d), "mean": mean, "ci95": [float(lo), float(hi)]}


def failure_interval(k: int, n: int) -> list[float]:
    from scipy import stats

    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return [float(ci.low), float(ci.high)]


def train_run(method: str, seed: int, teacher: str, runs: Path) -> dict:
    """Train one (method, seed) run, or return its recorded result."""
    out = runs / f"{method}_s{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    resume = (out / "last_checkpoint").is_file()
    cmd = [sys.executable, "projects/TBD/train_net.py", "--config-file", CONFIGS[method],
           *(["--resume"] if resume else []), "SEED", str(seed), "OUTPUT_DIR", str(out),
           "DATASETS.TEST", f"('{TEST}',)", "SOLVER.CHECKPOINT_PERIOD", "250"]
    if method != "baseline":
        cmd += ["MODEL.DISTILL.TEACHER.WEIGHTS", teacher]
    start = time.time()
    result = {"method": method, "seed": seed, "config": CONFIGS[method], "resumed": resume}
    try:
        run_logged(cmd, log_beside(out))
        metrics = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()
                   if x.strip()]
        ap = [m["bbox/AP"] for m in metrics if "bbox/AP" in m][-1]
        result.update(AP=ap, status="ok" if ap >= FAILED_BELOW_AP else "failed (AP < 1.0)")
    except RuntimeError as e:
        result.update(AP=None, status=f"failed ({str(e).splitlines()[-1][:200]})")
    result["wall_s"] = time.time() - start
    out.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2))
    return result


def summarise(rows: list[dict], methods: list[str], seeds: list[int]) -> dict:
    by = {(r["method"], r["seed"]): r for r in rows}
    summary: dict = {"methods": {}, "paired": {}}
    for m in methods:
        ok = [by[(m, s)]["AP"] for s in seeds if by[(m, s)]["status"] == "ok"]
        every = [by[(m, s)]["AP"] for s in seeds if by[(m, s)]["AP"] is not None]
        failures = len(seeds) - len(ok)
        summary["methods"][m] = {
            "AP": [by[(m, s)]["AP"] for s in seeds],
            "mean": statistics.fmean(every) if every else None,
            "std": statistics.stdev(every) if len(every) > 1 else None,
            "mean_without_failures": statistics.fmean(ok) if ok else None,
            "failures": failures, "failure_ci95": failure_interval(failures, len(seeds)),
        }
    comparisons = [(m, "baseline") for m in methods if m != "baseline"] + [("TBD", "FGD")]
    for a, b in comparisons:
        pairs = [(by[(a, s)]["AP"], by[(b, s)]["AP"]) for s in seeds
                 if by[(a, s)]["AP"] is not None and by[(b, s)]["AP"] is not None]
        summary["paired"][f"{a} - {b}"] = paired([x for x, _ in pairs], [y for _, y in pairs])
    return summary


def markdown(summary: dict, teacher: dict, seeds: list[int]) -> str:
    def fmt(x, nd=1):
        return "-" if x is None else f"{x:.{nd}f}"

    lines = [
        "# FCOS indicative result (demo task, 64 px; not protocol v2)", "",
        f"Teacher FCOS R50w16-FPN64: {fmt(teacher['AP'])} AP on {TEST}. Students FCOS "
        f"R50w8-FPN32, 1000 iterations, seeds {seeds}.", "",
        "| method | AP per seed | mean | std | failures (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for m, r in summary["methods"].items():
        ci = r["failure_ci95"]
        lines.append(f"| {m} | {', '.join(fmt(a) for a in r['AP'])} | {fmt(r['mean'])} | "
                     f"{fmt(r['std'])} | {r['failures']} of {len(seeds)} "
                     f"({ci[0]:.2f}-{ci[1]:.2f}) |")
    lines += ["", "| paired difference | mean (AP) | 95% t-interval | excludes 0 |",
              "|---|---|---|---|"]
    for k, p in summary["paired"].items():
        ci = p["ci95"]
        excl = "-" if ci is None else ("yes" if ci[0] > 0 or ci[1] < 0 else "no")
        lines.append(f"| {k} | {fmt(p['mean'], 2)} | "
                     f"{'-' if ci is None else f'{ci[0]:.2f} to {ci[1]:.2f}'} | {excl} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--teacher-weights", default="output/demo_fcos_teacher/model_final.pth")
    p.add_argument("--runs", default="output/benchmarks/fcos_indicative")
    p.add_argument("--out", default="projects/TBD/benchmarks/results/fcos_indicative_cpu")
    args = p.parse_args(argv)
    import tbd  # noqa: F401
    from tbd.checkpoint import sha256_file

    runs = ROOT / args.runs
    runs.mkdir(parents=True, exist_ok=True)
    teacher_w = str((ROOT / args.teacher_weights).resolve())
    if not Path(teacher_w).is_file():
        sys.exit(f"--teacher-weights {teacher_w}: not found. Train the teacher first: python "
                 f"projects/TBD/train_net.py --config-file {TEACHER_CONFIG}")
    commit = git_commit()
    started = time.time()
    teacher_file = runs / "teacher.json"
    if teacher_file.is_file():
        teacher = json.loads(teacher_file.read_text())
    else:
        bbox = eval_bbox(TEACHER_CONFIG, teacher_w, TEST, runs / "teacher_eval",
                         runs / "teacher_eval.log")
        teacher = {"config": TEACHER_CONFIG, "weights": args.teacher_weights,
                   "sha256": sha256_file(teacher_w), "AP": bbox["AP"]}
        teacher_file.write_text(json.dumps(teacher, indent=2))
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    rows = [train_run(m, s, teacher_w, runs)
            for m, s in tqdm(jobs, desc="FCOS runs", unit="run", disable=None)]
    summary = summarise(rows, args.methods, args.seeds)
    settings = {"task": "tbd_demo_train -> " + TEST, "teacher": teacher, "configs": CONFIGS,
                "seeds": args.seeds, "failed_below_AP": FAILED_BELOW_AP,
                "summary": summary, "wall_s_this_invocation": time.time() - started,
                "claim": "indicative (3 seeds, short schedule, no tuning); not protocol v2"}
    write_results(ROOT / args.out, "fcos_indicative", settings, rows,
                  markdown(summary, teacher, args.seeds), commit=commit)
    print(markdown(summary, teacher, args.seeds))


if __name__ == "__main__":
    main()
