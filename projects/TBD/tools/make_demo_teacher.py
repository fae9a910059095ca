#!/usr/bin/env python
"""Re-create the demo's teacher checkpoint (projects/TBD/demo_teacher/).

    python projects/TBD/tools/make_demo_teacher.py   # trains: about 30 min on 2 idle CPU cores
    python projects/TBD/tools/make_demo_teacher.py --skip-training --evaluate-checkpoints

Trains ``configs/demo/fcos_R50w16_FPN64_teacher.yaml`` with ``train_net.py`` (its own schedule,
evaluated on ``tbd_demo_test`` every 1000 iterations for the record), then writes the model
weights alone (no optimizer state) as ``model_final.pth``, its sha256 as ``SHA256``, and the
run's evaluations as ``curve.json``. ``--evaluate-checkpoints`` makes the curve from the run's
periodic checkpoints instead (``--eval-only`` of each), for a run trained without evaluations.
The demo refuses a file whose sha256 differs from ``SHA256``: a re-created teacher replaces both.
Training is seeded, but float rounding differs between machines and thread counts, so a teacher
re-created elsewhere is an equivalent file, not the same bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
CONFIG = "projects/TBD/configs/demo/fcos_R50w16_FPN64_teacher.yaml"
TARGET = ROOT / "projects" / "TBD" / "demo_teacher"


def evaluate_checkpoints(run: Path, trained: int, config: str = CONFIG) -> list[dict]:
    """``--eval-only`` on the config's test set of every ``model_<i>.pth`` of ``run`` (saved
    after i + 1 steps) and of ``model_final.pth``: the learning curve."""
    found = sorted(run.glob("model_[0-9]*.pth"))
    points = [(int(f.stem.split("_")[1]) + 1, f) for f in found]
    if not points or points[-1][0] != trained:  # the final weights, unless saved periodically
        points.append((trained, run / "model_final.pth"))
    evals = []
    for steps, weights in points:
        out = run / f"curve_eval_{steps}"
        cmd = [sys.executable, "projects/TBD/train_net.py", "--config-file", config, "--eval-only",
               "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(out)]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        bbox = json.loads((out / "eval_results.json").read_text())["bbox"]
        evals.append({"iteration": steps, **{f"bbox/{k}": v for k, v in bbox.items()}})
        print(f"after {steps} iterations: {bbox['AP']:.1f} AP", flush=True)
    return evals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=CONFIG, help="the teacher's config (another teacher, such "
                   "as the benchmark's, with --run-dir and --output)")
    p.add_argument("--run-dir", default="output/demo_fcos_teacher", help="training output folder")
    p.add_argument("--skip-training", action="store_true",
                   help="only write the checkpoint of an already finished --run-dir")
    p.add_argument("--output", default=str(TARGET), help="where model_final.pth and SHA256 go")
    p.add_argument("--evaluate-checkpoints", action="store_true",
                   help="the curve from --eval-only of the run's model_*.pth (and the final one)")
    args = p.parse_args(argv)
    from tbd.checkpoint.io import atomic_torch_save, atomic_write_text, sha256_file

    run = ROOT / args.run_dir
    if not args.skip_training:
        cmd = [sys.executable, "projects/TBD/train_net.py", "--config-file", args.config,
               "TEST.EVAL_PERIOD", "1000", "OUTPUT_DIR", str(run)]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    final = run / "model_final.pth"
    if not final.is_file():
        sys.exit(f"{final}: not found; train first (without --skip-training).")
    state = torch.load(final, map_location="cpu", weights_only=False)["model"]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"model": {k: v.contiguous() for k, v in state.items()}},
                      str(out / "model_final.pth"))
    sha = sha256_file(out / "model_final.pth")
    atomic_write_text(str(out / "SHA256"), sha + "\n")
    records = [json.loads(x) for x in (run / "metrics.json").read_text().splitlines() if x.strip()]
    trained = max(r["iteration"] for r in records if "total_loss" in r) + 1
    if args.evaluate_checkpoints:
        evals = evaluate_checkpoints(run, trained, args.config)
    else:
        # an evaluation logged at iteration i follows i + 1 steps (the final one: all of them)
        evals = [{"iteration": min(r["iteration"] + 1, trained),
                  **{k: r[k] for k in r if k.startswith("bbox/")}}
                 for r in records if "bbox/AP" in r]
    atomic_write_text(str(out / "curve.json"),
                      json.dumps({"config": args.config, "evaluations": evals}, indent=2))
    size = (out / "model_final.pth").stat().st_size / 1e6
    print(f"{out / 'model_final.pth'}: {size:.1f} MB, sha256 {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
