#!/usr/bin/env python
"""Soak run: a long TBD training with periodic evaluation and checkpoints; resident-memory slope.

    .venv/bin/python projects/TBD/benchmarks/soak.py \\
        --teacher-weights output/shapes/teacher_R34_FPN128/model_final.pth --iters 4000

Trains the shapes TBD student (R34-FPN128 teacher -> R18-FPN64) through ``train_net.py`` with
data-loader workers, evaluation every ``--eval-period`` and a checkpoint every
``--checkpoint-period`` iterations. ``train_net`` logs ``memory/rss_mb`` (main process) and
``memory/rss_workers_mb`` (data-loader workers) every 20 iterations (tbd.engine.MemoryMonitor).
After the warm-up (``--warmup-frac`` of the run, and at least the first evaluation), a least
squares line gives the slope in MB per 1000 iterations; a leak shows as a clearly positive slope.
Writes results.json, results.md and rss.png to ``--output`` (default results/soak_<device>).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tbd_benchmarks.common import ROOT, git_commit, write_results

CONFIG = "projects/TBD/configs/shapes/tbd_R18_FPN256_to_R18_FPN64.yaml"


def slope(iters: np.ndarray, mb: np.ndarray) -> tuple[float, float]:
    """Least-squares slope (MB per 1000 iterations) and the residual standard deviation (MB)."""
    a, b = np.polyfit(iters / 1000.0, mb, 1)
    return float(a), float(np.std(mb - (a * iters / 1000.0 + b)))


def history_growth_mb_per_1000(records: list[dict], iters: int = 2000) -> tuple[float, float]:
    """What Detectron2's EventStorage histories alone add per 1000 iterations (tracemalloc).

    Every scalar put into the storage is kept (up to a million values per name), so RSS grows by
    design. Replays the run's scalar rate (names written every iteration, and those written every
    20) into an EventStorage and measures the Python memory it takes.
    """
    import tracemalloc

    from detectron2.utils.events import EventStorage

    keys = max((r for r in records if "total_loss" in r), key=len).keys()
    periodic = [k for k in keys if k.startswith(("distill/", "memory/")) or k == "eta_seconds"]
    every = [k for k in keys if k not in periodic and k != "iteration"
             and not k.startswith("bbox/")]  # evaluation results: a few values per run
    tracemalloc.start()
    with EventStorage(0) as st:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(iters):
            st.iter = i
            for k in every:
                st.put_scalar(k, float(i))
            if i % 20 == 0:
                for k in periodic:
                    st.put_scalar(k, float(i), smoothing_hint=False)
        used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / 2**20 * 1000 / iters, len(every) + len(periodic) / 20


def plot(it, own, workers, start, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(it, own, label="main process")
    ax.plot(it, workers, label="data-loader workers")
    ax.axvline(start, color="#888", ls="--", lw=1, label="end of warm-up")
    ax.set_xlabel("iteration")
    ax.set_ylabel("resident memory (MB)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher-weights", required=True)
    p.add_argument("--teacher-config",
                   default="projects/TBD/configs/shapes/retinanet_R34_FPN128_teacher.yaml",
                   help="the teacher's config (default: the R34-FPN128 teacher the committed soak "
                   "results used)")
    p.add_argument("--iters", type=int, default=4000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--eval-period", type=int, default=1000)
    p.add_argument("--checkpoint-period", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup-frac", type=float, default=0.25)
    p.add_argument("--output", default=None)
    p.add_argument("--work-dir", default=str(ROOT / "output/benchmarks/soak"))
    p.add_argument("--analyze-only", action="store_true",
                   help="no training: analyse the metrics.json already in --work-dir")
    args = p.parse_args(argv)
    out = Path(args.output or ROOT / "projects/TBD/benchmarks/results/soak_cpu")
    work = Path(args.work_dir)
    commit = git_commit()
    cmd = [sys.executable, "projects/TBD/train_net.py", "--config-file", CONFIG,
           "SOLVER.MAX_ITER", str(args.iters), "SOLVER.IMS_PER_BATCH", str(args.batch),
           "SOLVER.STEPS", f"({int(args.iters * 0.8)},)",
           "SOLVER.CHECKPOINT_PERIOD", str(args.checkpoint_period),
           "TEST.EVAL_PERIOD", str(args.eval_period),
           "DATASETS.TRAIN", "('tbd_shapes_mini_train',)",
           "DATASETS.TEST", "('tbd_shapes_mini_val',)",
           "DATALOADER.NUM_WORKERS", str(args.workers),
           "MODEL.DISTILL.TEACHER.CONFIG", args.teacher_config,
           "MODEL.DISTILL.TEACHER.WEIGHTS", args.teacher_weights, "OUTPUT_DIR", str(work),
           # memory, not accuracy: any teacher will do (the check still runs and is logged)
           "MODEL.DISTILL.TEACHER.EVAL_MIN_AP", "0"]
    t0 = time.time()
    if not args.analyze_only:
        work.parent.mkdir(parents=True, exist_ok=True)
        with open(work.parent / "soak.log", "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            sys.exit(f"training failed ({proc.returncode}); see {work.parent / 'soak.log'}")
    records = [json.loads(x) for x in (work / "metrics.json").read_text().splitlines() if x]
    mem = [r for r in records if "memory/rss_mb" in r]
    it = np.array([r["iteration"] for r in mem], dtype=float)
    own = np.array([r["memory/rss_mb"] for r in mem])
    workers = np.array([r["memory/rss_workers_mb"] for r in mem])
    start = max(args.warmup_frac * args.iters, args.eval_period if args.eval_period else 0)
    keep = it >= start
    s_own, r_own = slope(it[keep], own[keep])
    s_wrk, r_wrk = slope(it[keep], workers[keep])
    # The same fit on each half of the window: a steady leak gives two similar positive slopes,
    # allocator fluctuation gives slopes that disagree.
    mid = (start + it.max()) / 2
    halves = [slope(it[keep & (it < mid)], own[keep & (it < mid)])[0],
              slope(it[keep & (it >= mid)], own[keep & (it >= mid)])[0]]
    times = [r["time"] for r in records if "time" in r]
    hist_mb, per_iter = history_growth_mb_per_1000(records)
    wall = (time.time() - t0) if not args.analyze_only else None
    evals = [r["bbox/AP"] for r in records if "bbox/AP" in r]
    rows = [
        {"process": "main", "slope_mb_per_1000_iters": s_own, "residual_sd_mb": r_own,
         "slope_halves_mb_per_1000_iters": halves,
         "rss_mb_first": float(own[keep][0]), "rss_mb_last": float(own[-1]),
         "rss_mb_max": float(own.max())},
        {"process": "data-loader workers (sum)", "slope_mb_per_1000_iters": s_wrk,
         "residual_sd_mb": r_wrk, "rss_mb_first": float(workers[keep][0]),
         "rss_mb_last": float(workers[-1]), "rss_mb_max": float(workers.max())},
    ]
    settings = {**{k: v for k, v in vars(args).items() if k not in ("output", "work_dir")},
                "config": CONFIG, "warmup_end_iter": start, "samples": int(keep.sum()),
                "evaluations_ap": evals, "event_history_mb_per_1000_iters": hist_mb,
                "scalars_per_iter": per_iter, "median_s_per_iter": float(np.median(times)),
                "wall_minutes": None if wall is None else round(wall / 60, 1)}
    md = [f"# Soak run ({args.iters} iterations, batch {args.batch}, {args.workers} workers)", "",
          f"Resident memory sampled every 20 iterations; slope fitted from iteration {start:.0f} "
          f"({int(keep.sum())} samples). {len(evals)} evaluations, a checkpoint every "
          f"{args.checkpoint_period} iterations; median {np.median(times):.3f} s/iteration. "
          f"Main process, slope on each half of the window: {halves[0]:+.2f} and "
          f"{halves[1]:+.2f} MB / 1000 it. Detectron2's event histories alone (every logged "
          f"scalar is kept; {per_iter:.1f} scalars per iteration) grow by {hist_mb:.2f} MB / "
          "1000 it.", "",
          "| process | slope (MB / 1000 it) | residual sd (MB) | RSS after warm-up | last | max |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['process']} | {r['slope_mb_per_1000_iters']:+.2f} | "
                  f"{r['residual_sd_mb']:.1f} | {r['rss_mb_first']:.0f} | {r['rss_mb_last']:.0f} "
                  f"| {r['rss_mb_max']:.0f} |")
    write_results(out, "soak", settings, rows, "\n".join(md) + "\n", commit)
    plot(it, own, workers, start, out / "rss.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
