#!/usr/bin/env python
"""A teacher's learning curve: box AP of every checkpoint of a training run, on one dataset.

    .venv/bin/python projects/TBD/benchmarks/teacher_curve.py \\
        --run-dir output/shapes/teacher_R18_FPN256 --output results/teacher_curve_R18_FPN256

Evaluates each ``model_<iter>.pth`` (and ``model_final.pth``) in ``--run-dir`` with
``train_net.py --eval-only`` and the run's own ``config.yaml``. It answers "is this teacher
trained enough?": the AP still rising at the last constant-LR checkpoints means it is not, and a
student that outscores it at the benchmark's schedule makes distillation meaningless there.
``--extra-dir`` adds the checkpoints of other runs (e.g. architecture candidates) as rows.
Writes results.json and results.md to ``--output`` (relative paths: under benchmarks/results).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from tqdm import tqdm

from tbd_benchmarks.common import ROOT, eval_bbox, git_commit, log_beside, write_results

METRICS = ["AP", "AP50", "AP75", "APs", "APm"]


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(iterations trained, path) for every checkpoint of a run, in training order."""
    found = []
    for p in run_dir.glob("model_*.pth"):
        m = re.fullmatch(r"model_(\d+)\.pth", p.name)
        if m:
            found.append((int(m.group(1)) + 1, p))
    if (run_dir / "model_final.pth").is_file():
        cfg = (run_dir / "config.yaml").read_text()
        m = re.search(r"^\s*MAX_ITER:\s*(\d+)", cfg, re.M)
        final = int(m.group(1)) if m else -1
        if final not in {i for i, _ in found}:
            found.append((final, run_dir / "model_final.pth"))
    return sorted(found)


def evaluate(run_dir: Path, weights: Path, dataset: str, work: Path) -> dict:
    out = work / f"{run_dir.name}_{weights.stem}"
    out.parent.mkdir(parents=True, exist_ok=True)
    res = eval_bbox(str(run_dir / "config.yaml"), str(weights), dataset, out, log_beside(out))
    return {k: res.get(k) for k in METRICS}


def markdown(rows: list[dict], dataset: str) -> str:
    lines = [f"# Teacher learning curves (box AP on {dataset})", "",
             "| run | iterations | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for r in rows:
        vals = " | ".join("n/a" if r[k] is None else f"{r[k]:.1f}" for k in METRICS)
        lines.append(f"| {r['run']} | {r['iters']} | {vals} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a train_net.py OUTPUT_DIR")
    p.add_argument("--extra-dir", action="append", default=[], help="more runs to evaluate")
    p.add_argument("--dataset", default="tbd_shapes_val")
    p.add_argument("--output", required=True)
    p.add_argument("--work-dir", default="output/benchmarks/teacher_curve")
    args = p.parse_args(argv)
    out = Path(args.output)
    if not out.is_absolute():
        out = ROOT / "projects/TBD/benchmarks/results" / out
    commit, t0, rows = git_commit(), time.time(), []
    for run in [args.run_dir, *args.extra_dir]:
        run_dir = ROOT / run
        ckpts = checkpoints(run_dir)
        if not ckpts:
            sys.exit(f"--run-dir/--extra-dir {run!r}: no model_*.pth checkpoints found.")
        for iters, weights in tqdm(ckpts, desc=f"Checkpoints of {run}", disable=None):
            row = {"run": run, "iters": iters, "weights": weights.name,
                   **evaluate(run_dir, weights, args.dataset, ROOT / args.work_dir)}
            print(row, flush=True)
            rows.append(row)
    settings = {"dataset": args.dataset, "wall_minutes": round((time.time() - t0) / 60, 1)}
    write_results(out, "teacher_curve", settings, rows, markdown(rows, args.dataset), commit)
    print(markdown(rows, args.dataset))


if __name__ == "__main__":
    main()
