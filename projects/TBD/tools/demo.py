#!/usr/bin/env python
"""Distillation demo on the synthetic shapes dataset (CPU, no downloads, about 12 minutes).

Runs the same commands a user runs, with short schedules:

1. train the teacher (R34-FPN128, 4 head convs);
2. train the baseline light student (R18-FPN64, 2 head convs);
3. distil a TBD student from the teacher checkpoint;
4. evaluate all three with ``train_net.py --eval-only`` and print an AP table.

This is a pipeline check. Its schedules are far too short for the AP to say anything about the
method; measured comparisons live in projects/TBD/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "projects" / "TBD" / "configs" / "shapes"
TRAIN_NET = ROOT / "projects" / "TBD" / "train_net.py"


def run(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        sys.exit(f"command failed ({proc.returncode}); last lines of {log}:\n" + "\n".join(tail))
    print(f"  done in {time.time() - t0:.0f} s (log: {log.relative_to(ROOT)})", flush=True)


def read_ap(out_dir: Path) -> dict:
    """The bbox metrics that ``train_net.py --eval-only`` wrote (undefined ones are null)."""
    res = json.loads((out_dir / "eval_results.json").read_text())
    return res["bbox"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--output", default="output/demo", help="output folder (relative to repo)")
    ap.add_argument("--teacher-iters", type=int, default=600)
    ap.add_argument("--student-iters", type=int, default=400)
    ap.add_argument("--train-set", default="tbd_shapes_mini_train")
    ap.add_argument("--val-set", default="tbd_shapes_mini_val")
    args = ap.parse_args()

    out = ROOT / args.output
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    data = ["DATASETS.TRAIN", f"('{args.train_set}',)", "DATASETS.TEST", f"('{args.val_set}',)"]

    def sched(iters: int) -> list[str]:
        return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.8)},)",
                "SOLVER.WARMUP_ITERS", str(min(100, iters // 5)), "SOLVER.CHECKPOINT_PERIOD",
                str(10 * iters), "TEST.EVAL_PERIOD", "0"]

    t_start = time.time()
    runs = {
        "teacher": (CONFIGS / "retinanet_R34_FPN128_teacher.yaml", args.teacher_iters, []),
        "baseline student": (CONFIGS / "retinanet_R18_FPN64_student.yaml", args.student_iters, []),
        "TBD student": (
            CONFIGS / "tbd_R18_FPN256_to_R18_FPN64.yaml",
            args.student_iters,
            ["MODEL.DISTILL.TEACHER.CONFIG",
             str((CONFIGS / "retinanet_R34_FPN128_teacher.yaml").relative_to(ROOT)),
             "MODEL.DISTILL.TEACHER.WEIGHTS", str(out / "teacher" / "model_final.pth")],
        ),
    }
    rows = []
    for name, (cfg, iters, extra) in runs.items():
        tag = name.split()[0].lower()
        train_dir = out / tag
        print(f"\n== {name}: train {iters} iterations", flush=True)
        run([py, str(TRAIN_NET), "--config-file", str(cfg.relative_to(ROOT)), *data, *sched(iters),
             *extra, "OUTPUT_DIR", str(train_dir)], out / f"{tag}_train.log")
        print(f"== {name}: --eval-only", flush=True)
        eval_dir = out / f"{tag}_eval"
        run([py, str(TRAIN_NET), "--config-file", str(cfg.relative_to(ROOT)), "--eval-only", *data,
             *extra, "MODEL.WEIGHTS", str(train_dir / "model_final.pth"), "OUTPUT_DIR",
             str(eval_dir)], out / f"{tag}_eval.log")
        rows.append({"model": name, "config": str(cfg.relative_to(ROOT)), "iters": iters,
                     **read_ap(eval_dir)})

    minutes = (time.time() - t_start) / 60
    keys = ["AP", "AP50", "AP75", "APs", "APm"]
    lines = ["| model | iters | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for r in rows:
        vals = " | ".join("n/a" if r.get(k) is None else f"{r[k]:.1f}" for k in keys)
        lines.append(f"| {r['model']} | {r['iters']} | {vals} |")
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo")
                 if x.startswith("model name")]
        cpu = names[0] if names else cpu
    machine = f"{cpu}, {os.cpu_count()} cores, CPU"
    header = (f"Demo on {args.val_set} ({time.strftime('%Y-%m-%d')}, {machine}, "
              f"{minutes:.1f} min). Pipeline check only: these short schedules make no accuracy "
              f"claim; see projects/TBD/benchmarks/.")
    table = "\n".join([header, "", *lines])
    print("\n" + table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"minutes": minutes, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
