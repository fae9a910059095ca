#!/usr/bin/env python
"""Distillation demo on the synthetic shapes data (CPU, no downloads, about 12 minutes).

Runs the commands a user runs, on the demo's easy task (64x64 images, ``tbd_demo_*``), with FCOS
detectors (``configs/demo/fcos_*``):

1. checks the shipped teacher (projects/TBD/demo_teacher/, sha256 against its SHA256 file);
2. trains the baseline student (``fcos_R50w8_FPN32_student.yaml``) for ``--iters`` and, side by
   side with it (half the cores each), distils a TBD student from the teacher, same schedule and
   seed;
3. evaluates all three with ``train_net.py --eval-only`` on the held-out ``tbd_demo_test``;
4. prints an AP table and writes ``demo.png``: the three APs as bars, and held-out images with the
   baseline's and the TBD student's detections side by side.

Every number it prints is measured in this run. The students train a short schedule: the gap shows
that the teacher's knowledge reaches the student, i.e. faster learning at an equal, short budget;
whether TBD wins on converged students is the accuracy benchmark's question
(projects/TBD/benchmarks/README.md). ``--quick`` trains each student 20 iterations (for the
tests): a pipeline check whose AP means nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "projects" / "TBD" / "configs" / "demo"
TRAIN_NET = ROOT / "projects" / "TBD" / "train_net.py"
TEACHER_DIR = ROOT / "projects" / "TBD" / "demo_teacher"
TEACHER_CONFIG = CONFIGS / "fcos_R50w16_FPN64_teacher.yaml"
STUDENT_CONFIG = CONFIGS / "fcos_R50w8_FPN32_student.yaml"
TBD_CONFIG = CONFIGS / "tbd_fcos_R50w16_to_R50w8.yaml"
RECREATE = "python projects/TBD/tools/make_demo_teacher.py"


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run ``cmd`` from the repository root, output to ``log``; its wall time in seconds."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        sys.exit(f"command failed ({proc.returncode}); last lines of {log}:\n" + "\n".join(tail))
    seconds = time.time() - t0
    print(f"  done in {seconds:.0f} s (log: {rel(log)})", flush=True)
    return seconds


def check_teacher_file(weights: Path) -> str:
    """The teacher checkpoint's sha256, refused unless it is the one SHA256 records."""
    from tbd.checkpoint.io import sha256_file

    expected_file = weights.parent / "SHA256"
    if not weights.is_file():
        sys.exit(f"Demo teacher {rel(weights)} not found. Re-create it with: {RECREATE}")
    if not expected_file.is_file():
        sys.exit(f"{rel(expected_file)} not found: it records the teacher's sha256. Re-create "
                 f"both with: {RECREATE}")
    expected = expected_file.read_text().strip()
    sha = sha256_file(weights)
    if sha != expected:
        sys.exit(f"Demo teacher {rel(weights)} has sha256 {sha}, {rel(expected_file)} says "
                 f"{expected}: the file is damaged or was replaced (a Git LFS pointer?). "
                 f"Check it out again, or re-create it with: {RECREATE}")
    return sha


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo")
                 if x.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, CPU"


def detections(config: Path, weights: Path, dataset: str, count: int, opts: list[str]):
    """(images, GT boxes, predicted instances) of the first ``count`` images of ``dataset``."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.modeling import build_model

    import tbd
    from tbd.config import load_config

    cfg = tbd.student_config(load_config(str(config), opts))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    model.eval()
    mapper = DatasetMapper(cfg, is_train=False)
    out = []
    for d in DatasetCatalog.get(dataset)[:count]:
        x = mapper(dict(d))
        with torch.no_grad():
            inst = model([x])[0]["instances"].to("cpu")
        image = x["image"].permute(1, 2, 0).numpy()[:, :, ::-1]  # BGR -> RGB for display
        out.append((image, [a["bbox"] for a in d["annotations"]], inst))
    return out


def plot(path: Path, rows: list[dict], shown: dict[str, list], classes: list[str],
         title: str) -> None:
    """Bars of the APs, then one row per image: the baseline's and TBD's detections.

    Each image shows each student's k highest-scoring detections, k = the image's number of
    objects: both students get the same number of boxes, and a student whose scores are all low
    (an FCOS score is sqrt(class probability x centerness)) still shows where it looks.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(next(iter(shown.values())))
    fig = plt.figure(figsize=(2.6 * n, 2.6 * 3 + 0.6))
    grid = fig.add_gridspec(3, n, height_ratios=[1.1, 1, 1])
    ax = fig.add_subplot(grid[0, :])
    names = [r["model"] for r in rows]
    aps = [r["AP"] or 0.0 for r in rows]
    bars = ax.bar(names, aps, color=["tab:gray", "tab:orange", "tab:blue"][: len(rows)])
    for b, v in zip(bars, aps):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.5, f"{v:.1f}", ha="center", va="bottom")
    ax.set_ylabel("bbox AP (held-out)")
    ax.set_ylim(0, max(aps + [1.0]) * 1.2)
    ax.set_title(title, fontsize=9)
    for r, (label, items) in enumerate(shown.items(), start=1):
        for c, (image, gt, inst) in enumerate(items):
            a = fig.add_subplot(grid[r, c])
            a.imshow(image)
            for x, y, w, h in gt:
                a.add_patch(Rectangle((x, y), w, h, fill=False, ec="white", ls="--", lw=1))
            keep = inst.scores.argsort(descending=True)[: len(gt)]
            for (x1, y1, x2, y2), k, s in zip(inst.pred_boxes.tensor[keep].tolist(),
                                              inst.pred_classes[keep].tolist(),
                                              inst.scores[keep].tolist()):
                a.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime", lw=1.5))
                a.text(x1, y1, f"{classes[k]} {s:.2f}", color="black", fontsize=6,
                       bbox=dict(fc="lime", ec="none", pad=0.5))
            a.set_xticks([])
            a.set_yticks([])
            if c == 0:
                a.set_ylabel(label)
    fig.text(0.5, 0.005, "dashed white: ground truth; green: each student's k best-scoring "
             "detections, k = the image's number of objects", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--output", default="output/demo", help="output folder (relative to repo)")
    # 1500: what fits the demo's 15 minutes on 2 cores with a margin, from the measured ~0.4 s
    # per TBD iteration at one thread beside another run (benchmarks/README.md, "Demo teacher
    # and demo run"); chosen from time alone, not from any AP.
    ap.add_argument("--iters", type=int, default=1500, help="student iterations (each student)")
    ap.add_argument("--teacher", default=str(TEACHER_DIR / "model_final.pth"),
                    help="teacher checkpoint (checked against the SHA256 file beside it)")
    ap.add_argument("--dataset", default="tbd_demo_test", help="the held-out split the three "
                    "models are evaluated on (tbd_bench_tune: how the demo's settings were "
                    "checked without looking at tbd_demo_test)")
    ap.add_argument("--quick", action="store_true",
                    help="20 iterations per student: a pipeline check for the tests")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    out = ROOT / args.output
    out.mkdir(parents=True, exist_ok=True)
    iters = 20 if args.quick else args.iters
    py = sys.executable
    teacher = Path(args.teacher).resolve()
    t_start = time.time()
    sha = check_teacher_file(teacher)
    print(f"Teacher {rel(teacher)} (sha256 {sha[:12]}...) checked.", flush=True)
    sched = ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.8)}, "
             f"{int(iters * 0.9)})", "SOLVER.WARMUP_ITERS", str(min(100, iters // 5)),
             "SOLVER.CHECKPOINT_PERIOD", str(10 * iters), "TEST.EVAL_PERIOD", "0"]
    teacher_opts = ["MODEL.DISTILL.TEACHER.WEIGHTS", str(teacher)]
    runs = {
        "baseline student": (STUDENT_CONFIG, sched, True),
        "TBD student": (TBD_CONFIG, sched + teacher_opts, True),
        "teacher": (TEACHER_CONFIG, [], False),
    }
    # The two students train side by side, each on half the cores: on 2 cores two one-thread
    # runs of these small models take about the time of one two-thread run.
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    trained, seconds = {}, {}
    print(f"\n== the baseline and the TBD student: train {iters} iterations each, side by side "
          f"({threads['OMP_NUM_THREADS']} thread(s) each)", flush=True)

    def train(name: str) -> None:
        cfg, opts, _ = runs[name]
        tag = name.split()[0].lower()
        seconds[name] = run([py, rel(TRAIN_NET), "--config-file", rel(cfg), *opts,
                             "OUTPUT_DIR", rel(out / tag)], out / f"{tag}_train.log", threads)
        trained[name] = (cfg, out / tag / "model_final.pth", opts)

    students = [n for n, (_, _, t) in runs.items() if t]
    with ThreadPoolExecutor(max_workers=len(students)) as pool:
        list(tqdm(pool.map(train, students), total=len(students), desc="Training", unit="model",
                  disable=None))
    rows = []
    for name, (cfg, _, is_student) in tqdm(runs.items(), desc="Evaluating", unit="model",
                                               disable=None):
        tag = name.split()[0].lower()
        weights = trained[name][1] if is_student else teacher
        print(f"== {name}: --eval-only", flush=True)
        eval_dir = out / f"{tag}_eval"
        extra = ["MODEL.DISTILL.TEACHER.WEIGHTS", str(teacher)] if cfg == TBD_CONFIG else []
        run([py, rel(TRAIN_NET), "--config-file", rel(cfg), "--eval-only", *extra,
             "DATASETS.TEST", f"('{args.dataset}',)", "MODEL.WEIGHTS", str(weights),
             "OUTPUT_DIR", rel(eval_dir)],
            out / f"{tag}_eval.log")
        bbox = json.loads((eval_dir / "eval_results.json").read_text())["bbox"]
        rows.append({"model": name, "config": rel(cfg), "iters": iters if is_student else None,
                     "train_seconds": seconds.get(name), **bbox})
    rows = [rows[2], rows[0], rows[1]]  # teacher, baseline, TBD

    minutes = (time.time() - t_start) / 60
    dataset = args.dataset
    keys = ["AP", "AP50", "AP75"]
    lines = ["| model | student iterations | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for r in rows:
        vals = " | ".join("n/a" if r.get(k) is None else f"{r[k]:.1f}" for k in keys)
        lines.append(f"| {r['model']} | {r['iters'] or '(shipped)'} | {vals} |")
    gain = (rows[2]["AP"] or 0.0) - (rows[1]["AP"] or 0.0)
    claim = ("Quick mode: a pipeline check; these APs mean nothing." if args.quick else
             f"TBD student minus baseline: {gain:+.1f} AP at the same {iters} iterations.")
    header = (f"Demo on {dataset} ({time.strftime('%Y-%m-%d')}, {machine()}, "
              f"{minutes:.1f} min). {claim}")
    table = "\n".join([header, "", *lines])
    print("\n" + table)

    from detectron2.data import MetadataCatalog

    classes = MetadataCatalog.get(dataset).thing_classes
    shown = {name: detections(*trained[name][:2], dataset, 4, trained[name][2])
             for name in students}
    plot(out / "demo.png", rows, shown, classes,
         f"{dataset}: teacher (shipped), students after {iters} iterations")
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(
        {"minutes": minutes, "dataset": dataset, "teacher_sha256": sha, "machine": machine(),
         "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"\nWrote {rel(out / 'results.md')} and {rel(out / 'demo.png')}")


if __name__ == "__main__":
    import tbd  # noqa: F401  (registers the synthetic datasets)

    main()
