#!/usr/bin/env python
"""What training without TorchScript graph optimisation costs (the trainer's ``exact_jit``).

    .venv/bin/python projects/TBD/benchmarks/jit_cost.py --rounds 4 --steps 20

The optimisation state cannot be switched back and forth in one process (a function optimised
once keeps its optimised graph), so each measurement is a fresh subprocess: per round, one with
the optimisation on (PyTorch's default) and one with it off, in shuffled order. Each builds the
shapes TBD pair (R18-FPN64 student, the R18-FPN256 teacher with random weights: the cost does not
depend on them), runs ``--warmup`` and then ``--steps`` timed SGD steps (forward, backward, update)
on one fixed batch, and reports its median step time. The ratio off / on of the per-round medians
comes with a bootstrap 95% interval over rounds.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tbd_benchmarks.common import ROOT, write_results
from tbd_benchmarks.speed import bootstrap_ratio

STUDENT = "projects/TBD/configs/shapes/retinanet_R18_FPN64_student.yaml"
TEACHER = "projects/TBD/configs/shapes/retinanet_R18_FPN256_teacher.yaml"
MODES = ("optimised", "exact")


def child(mode: str, steps: int, warmup: int, batch: int) -> float:
    """Median ms of one TBD training step in this process, with the optimisation as ``mode``."""
    import torch
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from tbd.config import load_config
    from tbd.engine.trainer import exact_jit
    from tbd_benchmarks.speed import distill_cfg, make_batch

    torch.manual_seed(0)
    cfg = distill_cfg(load_config(str(ROOT / STUDENT), ["MODEL.DEVICE", "cpu"]),
                      ROOT / TEACHER, ["HD", "TFD"], "")
    model = build_model(cfg).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    data = make_batch(argparse.Namespace(batch=batch), 128, 128)
    times = []
    context = exact_jit() if mode == "exact" else torch.jit.optimized_execution(True)
    with context, EventStorage(0):
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            loss = sum(model(data).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--output", default=str(ROOT / "projects/TBD/benchmarks/results/jit_cost_cpu"))
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps({"median_ms": child(args.child, args.steps, args.warmup, args.batch)}))
        return 0
    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    rng = random.Random(0)
    t0 = time.time()
    for r in tqdm(range(args.rounds), desc="Rounds", disable=None):
        for mode in rng.sample(MODES, len(MODES)):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--steps", str(args.steps),
                 "--warmup", str(args.warmup), "--batch", str(args.batch)],
                cwd=ROOT, capture_output=True, text=True, check=True)
            ms = json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]
            per_mode[mode].append(ms)
            print(f"round {r}: {mode} {ms:.1f} ms/step", flush=True)
    ratio, lo, hi = bootstrap_ratio(np.array(per_mode["exact"]), [np.array(per_mode["optimised"])])
    rows = [{"what": m, "median_ms_per_round": v, "median_ms": float(np.median(v))}
            for m, v in per_mode.items()]
    rows.append({"what": "ratio", "exact_over_optimised": ratio, "ci95": [lo, hi]})
    md = ["# Training without TorchScript graph optimisation", "",
          f"TBD shapes pair, batch {args.batch}, 128x128, CPU, {args.rounds} rounds of one fresh "
          f"process per mode, {args.steps} timed steps after {args.warmup} warm-up.", "",
          "| mode | median ms / step |", "|---|---|"]
    md += [f"| {r['what']} | {r['median_ms']:.1f} |" for r in rows[:len(MODES)]]
    md += ["", f"exact / optimised: {ratio:.3f} (95% interval {lo:.3f}-{hi:.3f}); "
           f"{(time.time() - t0) / 60:.1f} min in all."]
    text = "\n".join(md) + "\n"
    print(text)
    settings = {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                "batch": args.batch, "student": STUDENT, "teacher": TEACHER}
    write_results(Path(args.output), "jit_cost", settings, rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
