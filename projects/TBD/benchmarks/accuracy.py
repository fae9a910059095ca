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

The protocol (runs, schedules, seeds) is in ``accuracy_protocol.py``, the statistics and the
report in ``accuracy_report.py``; this module runs them. Each run is a ``train_net.py``
subprocess; finished runs are kept in ``--work-dir`` (checkpoints, logs, one json per run) and
skipped when the benchmark is re-run, so an interrupted benchmark resumes, also in another
sitting: ``invocations.json`` in the work dir sums the wall time of every invocation, the
profile's real run time. A work dir belongs to one teacher: re-running it with another is
refused. Results (results.json, results.md, accuracy.png) go to ``--output`` after every run.
A run that stops on a non-finite loss (``FloatingPointError``) is recorded as diverged, outside
the means, and kept like a finished run (delete its json to try it again); any other failure
stops the benchmark once the runs in progress are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from tbd_benchmarks.accuracy_protocol import (
    MAIN_METHODS,
    METHODS,
    PROFILES,
    label_by_opts,
    run_name,
    run_specs,
)
from tbd_benchmarks.accuracy_report import aggregate, markdown, plot, pooled_std
from tbd_benchmarks.common import (
    ROOT,
    eval_bbox,
    git_commit,
    log_beside,
    model_gflops,
    run_logged,
    write_results,
)
from tbd_benchmarks.logs import METRICS, divergence, infer_time, last_eval

THREADS: dict = {}  # extra environment of the subprocesses (OMP_NUM_THREADS with --jobs > 1)


def threads_per_run(torch_default: int) -> int:
    """The intra-op threads each run gets: 1 with --jobs > 1, else OMP_NUM_THREADS if the caller
    set it, else torch's default. Recorded because it changes the results: floating-point sums
    differ with the thread count, and a run that stalls with one thread may not with two."""
    return int(THREADS.get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
               or torch_default)


def sh(cmd: list[str], log: Path) -> None:
    run_logged(cmd, log, THREADS)


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
        if "teacher_min_ap" in profile:
            opts += ["MODEL.DISTILL.TEACHER.EVAL_MIN_AP", str(profile["teacher_min_ap"])]
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
                   help="main rows to run (default: all of tbd.METHODS)")
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
                 "first (projects/TBD/benchmarks/README.md, 'The teacher').")
    if args.opts and (len(args.opts) % 2 or not (args.work_dir and args.output)):
        sys.exit("--opts takes KEY VALUE pairs and needs its own --work-dir and --output, so that "
                 "the variant's runs and results do not mix with the profile's.")
    if "MODEL.DISTILL.HS.FORM" in args.opts[::2] and not args.no_ablations:
        sys.exit("--opts MODEL.DISTILL.HS.FORM sets the form of every TBD run: add --no-ablations "
                 "(the ablations compare the forms).")
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
    specs = label_by_opts(run_specs(profile, tuple(args.methods), not args.no_ablations),
                          args.opts)
    done: dict[int, dict] = {}

    def report() -> list[dict]:
        """results.json/.md and the plot of the runs done so far (incremental)."""
        table = rows[:1] + [done[i] for i in sorted(done)]
        agg = aggregate(table)
        settings["wall_minutes_this_invocation"] = round((time.time() - t0) / 60, 1)
        calls = record_invocation(runs, started, time.time() - t0, len(done), commit)
        settings["invocations"] = len(calls)
        settings["wall_minutes_all_invocations"] = round(
            sum(c["wall_s"] for c in calls) / 60, 1)
        settings["complete"] = len(done) == len(specs)
        write_results(out, "accuracy", settings, table, markdown(agg, settings,
                                                                 pooled_std(table)), commit)
        plot(agg, out / "accuracy.png")
        return table

    # runs finished by earlier invocations are read first, before any training, so that the
    # first results.md lists all of them; then the rest in seed-major order
    finished = [i for i in range(len(specs))
                if (runs / f"{run_name(specs[i])}.json").is_file()]
    for i in finished:
        done[i] = train_student(specs[i], args, profile, runs)  # reads its recorded row
    if finished:
        rows = report()
    order = [i for i in range(len(specs)) if i not in done]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(train_student, specs[i], args, profile, runs): i for i in order}
        errors = []
        for fut in tqdm(as_completed(futures), desc="Runs", total=len(futures), disable=None):
            if fut.cancelled():  # not started: an earlier run failed
                continue
            try:
                done[futures[fut]] = fut.result()
            except Exception as e:  # not a divergence: finish (and record) the runs in
                errors.append((run_name(specs[futures[fut]]), e))  # progress, start no more
                print(f"{errors[-1][0]} failed; the benchmark stops after the runs in progress",
                      flush=True)
                pool.shutdown(wait=False, cancel_futures=True)
            rows = report()
    if errors:
        raise RuntimeError(f"{len(errors)} run(s) failed: {', '.join(n for n, _ in errors)}; "
                           "see their logs in the work dir") from errors[0][1]
    print(markdown(aggregate(rows), settings, pooled_std(rows)))


if __name__ == "__main__":
    main()
