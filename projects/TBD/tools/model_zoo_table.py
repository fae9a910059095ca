#!/usr/bin/env python
"""Release the benchmark's seed-0 students and teacher, and print MODEL_ZOO.md's synthetic rows.

    .venv/bin/python projects/TBD/tools/model_zoo_table.py \\
        --results projects/TBD/benchmarks/results/accuracy_cpu/results.json \\
        --work-dir output/benchmarks/accuracy_cpu --teacher-weights <teacher model_final.pth> \\
        --speed projects/TBD/benchmarks/results/speed_cpu/results.json --release-dir release

For each row (teacher, baseline, FRS, FGD, TBD; seed 0) it runs the export tool on the run's
checkpoint with the run's own saved config.yaml (release files are named by their sha256) and
prints a Markdown table with the columns
of Detectron2's MODEL_ZOO.md. Train time and inference time come from the speed benchmark (one
interleaved run, same machine); AP is the mean over seeds from the accuracy benchmark.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SHAPES = "projects/TBD/configs/shapes"
# Results written before accuracy.py recorded its teacher's config used this one.
LEGACY_TEACHER = f"{SHAPES}/retinanet_R34_FPN128_teacher.yaml"


def rows() -> list[tuple]:
    """(row, method in results.json, config, speed row for train time, run folder): the teacher,
    then every method of tbd.METHODS, seed 0 (names and folders as the benchmarks give them)."""
    from tbd.distillers import METHODS
    from tbd_benchmarks.accuracy_protocol import run_name
    from tbd_benchmarks.common import method_config

    out = [("teacher", "teacher", None, None, None)]  # config and name: teacher_of(settings)
    for method, losses in METHODS.items():
        key = method.lower()
        label = ("baseline R18-FPN64" if not losses else
                 method if len(losses) == 1 else f"{method} ({' + '.join(losses)})")
        spec = {"method": key, "hs_form": "harmony" if key == "tbd" else None, "seed": 0}
        out.append((label, key, method_config(method), f"{key}_step" if losses else "student_step",
                    run_name(spec)))
    return out


def teacher_of(settings: dict) -> tuple[str, str, int]:
    """(short name, config, training iterations) of the teacher an accuracy run distilled."""
    from tbd.config import load_config

    config = settings.get("teacher_config", LEGACY_TEACHER)
    name = Path(config).stem.removeprefix("retinanet_").removesuffix("_teacher")
    return name.replace("_", "-"), config, load_config(str(ROOT / config)).SOLVER.MAX_ITER


def check_same_teacher(acc_settings: dict, speed_settings: dict, speed_path: str) -> None:
    """Refuse a table whose train times come from another teacher than its APs (results written
    before either benchmark recorded its teacher config used the R34-FPN128 one)."""
    acc_teacher = acc_settings.get("teacher_config", LEGACY_TEACHER)
    speed_teacher = speed_settings.get("teacher_config", LEGACY_TEACHER)
    if acc_teacher != speed_teacher:
        raise SystemExit(
            f"--speed {speed_path} timed the teacher {speed_teacher}, but --results distilled "
            f"{acc_teacher}. Run projects/TBD/benchmarks/speed.py --teacher-config {acc_teacher} "
            "--teacher-weights <its weights> --output <new folder> and pass that.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--results", required=True)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--teacher-weights", required=True)
    p.add_argument("--speed", required=True)
    p.add_argument("--release-dir", default="release")
    args = p.parse_args(argv)
    acc = json.loads(Path(args.results).read_text())
    speed_json = json.loads(Path(args.speed).read_text())
    check_same_teacher(acc["settings"], speed_json["settings"], args.speed)
    speed = {r["what"]: r for r in speed_json["rows"] if "median_ms" in r}
    batch = speed_json["settings"]["batch"]
    iters = acc["settings"]["iters"]
    teacher_name, teacher_config, teacher_iters = teacher_of(acc["settings"])
    base_ap = None
    lines = ["| name | teacher | lr sched | train time (s/iter) | inference time (s/im) | "
             "train mem (GB) | box AP | ΔAP vs baseline | model id | download |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, method, config, speed_row, run in rows():
        if method == "teacher":
            name, config = f"teacher {teacher_name}", teacher_config
        runs = [r for r in acc["rows"] if r["method"] == method
                and (method != "tbd" or r["hs_form"] == "harmony") and not r["indicative"]]
        if method != "teacher" and not runs:
            continue  # a method these results did not run
        aps = [r["AP"] for r in runs if r.get("AP") is not None]
        ap = sum(aps) / len(aps) if aps else None
        if method == "baseline":
            base_ap = ap
        ckpt = (Path(args.teacher_weights) if run is None
                else Path(args.work_dir) / run / "model_final.pth")
        out = Path(args.release_dir) / (method if run is None else run)
        run_cfg = ckpt.parent / "config.yaml"  # the full config the run trained with
        cmd = [sys.executable, "projects/TBD/tools/export_student.py", "--config-file",
               str(run_cfg if run_cfg.is_file() else config),
               "--checkpoint", str(ckpt), "--output", str(out)]
        release = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        release_file = Path(release.stdout.strip().splitlines()[-1]).name
        model_id = release_file.removeprefix("model_final_").removesuffix(".pth")
        if speed_row:
            train = f"{speed[speed_row]['median_ms'] / 1000:.3f}"
            mem = speed[speed_row]["peak_mem_mb"]
            mem = "n/a" if mem is None else f"{mem / 1024:.2f}"
        else:
            train, mem = "n/a (see README)", "n/a"
        infer = speed["stock_inference"]["median_ms"] / 1000
        delta = "-" if ap is None or base_ap is None or method in ("teacher", "baseline") else (
            f"{ap - base_ap:+.1f}")
        sched = f"{teacher_iters} it" if method == "teacher" else f"{iters} it"
        teacher = "-" if method in ("teacher", "baseline") else teacher_name
        lines.append(
            f"| {name} | {teacher} | {sched} | {train} | "
            f"{'n/a' if method == 'teacher' else f'{infer:.4f}'} | {mem} | "
            f"{'n/a' if ap is None else f'{ap:.1f}'} | {delta} | {model_id} | "
            f"`{release_file}` \\| `{Path(release_file).stem}.json` |")
    print("\n".join(lines))
    print(f"\n(train time and memory: speed benchmark, batch {batch}; inference: batch 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
