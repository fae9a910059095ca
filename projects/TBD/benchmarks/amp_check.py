#!/usr/bin/env python
"""Mixed-precision check (GPU): DistillMetaArch under fp16 autocast and Detectron2's AMPTrainer.

    python projects/TBD/benchmarks/amp_check.py --teacher-weights <teacher.pth> --iters 100 \
        [--teacher-config <its config; default: the accuracy benchmark's teacher>]

1. One training forward of the TBD student (shapes configs) under ``torch.autocast("cuda",
   float16)``: every distillation term must be fp32 and finite.
2. ``train_net.py`` with ``SOLVER.AMP.ENABLED True`` (AMPTrainer) for ``--iters`` iterations on
   the synthetic data, then evaluation: it must finish with finite losses, and its checkpoint must
   hold the grad scaler's state (needed for an exact ``--resume``).

Detectron2's AMPTrainer is CUDA-only; on CPU the tests check the distillation code under bf16.
Writes results.json / results.md to ``--output`` (default results/amp_<device>).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from tbd_benchmarks.common import ROOT, git_commit, write_results

CONFIG = "projects/TBD/configs/shapes/tbd_R18_FPN256_to_R18_FPN64.yaml"
TEACHER_CONFIG = "projects/TBD/configs/shapes/retinanet_R18_FPN256_teacher.yaml"


def autocast_forward(teacher_config: str, teacher_weights: str) -> dict:
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    import tbd  # noqa: F401 - registers DistillMetaArch and the datasets
    from tbd.config import load_config

    cfg = load_config(CONFIG, ["MODEL.DISTILL.TEACHER.CONFIG", teacher_config,
                               "MODEL.DISTILL.TEACHER.WEIGHTS", teacher_weights,
                               "MODEL.DEVICE", "cuda"])
    model = build_model(cfg).train()
    mapper = DatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get("tbd_shapes_mini_val")[:8]]
    with EventStorage(1000), torch.autocast("cuda", dtype=torch.float16):
        losses = model(batch)
    sum(losses.values()).backward()
    return {k: {"dtype": str(v.dtype).replace("torch.", ""), "value": float(v.detach()),
                "finite": bool(torch.isfinite(v))} for k, v in losses.items()}


def amp_training(teacher_config: str, teacher_weights: str, iters: int, out: Path) -> dict:
    run = out / "run"
    cmd = [sys.executable, "projects/TBD/train_net.py", "--config-file", CONFIG,
           "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", str(iters),
           "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", str(iters // 5),
           "DATASETS.TRAIN", "('tbd_shapes_mini_train',)",
           "DATASETS.TEST", "('tbd_shapes_mini_val',)",
           "MODEL.DISTILL.TEACHER.CONFIG", teacher_config,
           "MODEL.DISTILL.TEACHER.WEIGHTS", teacher_weights, "OUTPUT_DIR", str(run)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    res = {"returncode": proc.returncode}
    if proc.returncode != 0:
        res["stderr_tail"] = proc.stderr[-3000:]
        return res
    records = [json.loads(x) for x in (run / "metrics.json").read_text().splitlines() if x]
    last = [r for r in records if "total_loss" in r][-1]
    res["last_losses"] = {k: v for k, v in last.items() if k.startswith("loss_")}
    res["losses_finite"] = all(math.isfinite(v) for v in res["last_losses"].values())
    res["s_per_iter"] = last.get("time")
    ev = [r for r in records if "bbox/AP" in r]
    res["AP"] = ev[-1]["bbox/AP"] if ev else None
    ckpt = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)
    res["grad_scaler_in_checkpoint"] = "grad_scaler" in ckpt["trainer"].get("_trainer", {})
    res["grad_scale"] = ckpt["trainer"]["_trainer"].get("grad_scaler", {}).get("scale")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher-weights", required=True)
    p.add_argument("--teacher-config", default=TEACHER_CONFIG)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("amp_check.py needs CUDA: Detectron2's AMPTrainer is CUDA-only.")
    out = Path(args.output or ROOT / "projects/TBD/benchmarks/results/amp_cuda")
    commit = git_commit()
    fwd = autocast_forward(args.teacher_config, args.teacher_weights)
    distill = {k: v for k, v in fwd.items() if k not in ("loss_cls", "loss_box_reg")}
    fwd_ok = all(v["dtype"] == "float32" and v["finite"] for v in distill.values())
    train = amp_training(args.teacher_config, args.teacher_weights, args.iters, out)
    train_ok = (train["returncode"] == 0 and train.get("losses_finite")
                and train.get("grad_scaler_in_checkpoint"))
    rows = [{"check": "fp16 autocast forward", "passed": fwd_ok, "losses": fwd},
            {"check": f"AMPTrainer, {args.iters} iterations", "passed": bool(train_ok), **train}]
    md = ["# AMP check", "", "| check | passed | details |", "|---|---|---|",
          f"| fp16 autocast forward | {fwd_ok} | distillation terms: "
          + ", ".join(f"{k} {v['dtype']}" for k, v in distill.items()) + " |",
          f"| AMPTrainer, {args.iters} iterations | {bool(train_ok)} | losses finite: "
          f"{train.get('losses_finite')}, grad scaler checkpointed: "
          f"{train.get('grad_scaler_in_checkpoint')}, AP {train.get('AP')} |"]
    write_results(out, "amp_check", {"config": CONFIG, "teacher_config": args.teacher_config,
                                     "iters": args.iters}, rows,
                  "\n".join(md) + "\n", commit)
    print("\n".join(md))
    return 0 if fwd_ok and train_ok else 1


if __name__ == "__main__":
    sys.exit(main())
