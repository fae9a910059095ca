#!/usr/bin/env python
"""Speed and memory of a distillation step against its floor (student step + teacher forward).

    .venv/bin/python projects/TBD/benchmarks/speed.py                    # CPU, shapes models
    python projects/TBD/benchmarks/speed.py --device cuda --coco         # GPU, 1333x800, batch 8

In one process, the variants are timed interleaved after warm-up, in a shuffled order each round:
student training step, teacher inference, TBD / FRS / FGD training steps, and student inference
through DistillMetaArch vs stock RetinaNet. Ratios come with bootstrap 95% intervals over rounds.
Peak memory: one subprocess per variant on CPU (the RSS high-water mark only rises), or
torch.cuda.max_memory_allocated with resets on GPU. A torch.profiler pass gives the time share of
each TBD component (the ``tbd.*`` record_function scopes of DistillMetaArch).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tbd.distillers import METHODS
from tbd.modeling import dense_taps
from tbd.modeling.teacher import teacher_images
from tbd_benchmarks.common import ROOT, write_results

CFG = ROOT / "projects" / "TBD" / "configs"
INFER_VARIANTS = ["student_inference", "stock_inference"]
# One training-step row per method of tbd.METHODS (the student alone is "student_step").
DISTILLERS = {f"{m.lower()}_step": list(losses) for m, losses in METHODS.items() if losses}
STEP_VARIANTS = ["student_step", "teacher_forward", *DISTILLERS]
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def amp_dtype(device_type: str, name: str | None) -> str:
    """The autocast dtype's name: the one asked, else fp16 on cuda (AMPTrainer's) and bf16 on cpu
    (the only one CPU autocast runs fast)."""
    return name or ("fp16" if device_type == "cuda" else "bf16")


def precision(args) -> str:
    """'fp32', or 'AMP <dtype>' as used."""
    return f"AMP {amp_dtype(args.device.split(':')[0], args.amp_dtype)}" if args.amp else "fp32"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--coco", action="store_true",
                   help="COCO configs (R101 teacher, R50 student) at 1333x800 instead of shapes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="image size (default 128 128 for shapes, 800 1333 for --coco)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--amp", action="store_true", help="autocast (fp16 on cuda, bf16 on cpu)")
    p.add_argument("--amp-dtype", choices=sorted(AMP_DTYPES), default=None,
                   help="autocast dtype; default fp16 on cuda, bf16 on cpu. bf16 for random "
                   "weights at COCO size: the random R101 teacher overflows fp16")
    p.add_argument("--teacher-weights", default="", help="optional; random weights otherwise")
    p.add_argument("--teacher-config", default=None,
                   help="teacher config (default: the R101 3x on --coco, else the shapes "
                        "R34-FPN128 this benchmark was first run with)")
    p.add_argument("--output", default=None, help="results folder (default results/speed_<dev>)")
    p.add_argument("--memory-variant", default=None, help=argparse.SUPPRESS)  # child process
    p.add_argument("--skip-memory", action="store_true")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ building
def base_cfgs(args):
    from detectron2.config import get_cfg

    import tbd

    def load(path):
        cfg = get_cfg()
        tbd.add_tbd_config(cfg)
        cfg.merge_from_file(str(path))
        cfg.MODEL.DEVICE = args.device
        return cfg

    student = load(CFG / ("COCO-Detection/retinanet_R_50_FPN_1x.yaml" if args.coco
                          else "shapes/retinanet_R18_FPN64_student.yaml"))
    student.MODEL.WEIGHTS = ""
    return student, teacher_config(args)


def teacher_config(args) -> Path:
    """The teacher's config: --teacher-config, else the R101 3x (--coco) or the shapes R34-FPN128
    this benchmark was first run with."""
    if not args.teacher_config:
        return CFG / ("COCO-Detection/retinanet_R_101_FPN_3x.yaml" if args.coco
                      else "shapes/retinanet_R34_FPN128_teacher.yaml")
    path = ROOT / args.teacher_config
    if not path.is_file():
        raise FileNotFoundError(f"--teacher-config {args.teacher_config}: no such file")
    return path


def distill_cfg(student, teacher_path, losses, teacher_weights):
    cfg = student.clone()
    cfg.MODEL.META_ARCHITECTURE = "DistillMetaArch"
    cfg.MODEL.DISTILL.LOSSES = losses
    cfg.MODEL.DISTILL.TEACHER.CONFIG = str(teacher_path)
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = teacher_weights
    cfg.MODEL.DISTILL.TEACHER.ALLOW_RANDOM_INIT = not teacher_weights
    cfg.MODEL.DISTILL.WARMUP_ITERS = 0
    return cfg


def make_batch(args, h, w):
    from detectron2.structures import Boxes, Instances

    from tbd.data import ShapesSpec, render_image

    spec = ShapesSpec(num_images=args.batch, seed=123, image_size=max(h, w))
    batch = []
    for i in range(args.batch):
        img, anns = render_image(spec, i)
        img = torch.from_numpy(img[:h, :w]).permute(2, 0, 1).float().contiguous()
        inst = Instances((h, w))
        b = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                           a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32)
        b = b.reshape(-1, 4)
        b[:, 0::2] = b[:, 0::2].clamp(max=w)
        b[:, 1::2] = b[:, 1::2].clamp(max=h)
        keep = (b[:, 2] > b[:, 0] + 1) & (b[:, 3] > b[:, 1] + 1)
        inst.gt_boxes = Boxes(b[keep])
        inst.gt_classes = torch.tensor([a["category_id"] - 1 for a in anns])[keep]
        batch.append({"image": img, "instances": inst, "height": h, "width": w})
    return batch


class Runner:
    """Builds the models a set of variants needs and runs one measured call of each."""

    def __init__(self, args, variants):
        from detectron2.modeling import build_model
        from detectron2.utils.events import EventStorage

        import tbd

        self.args = args
        self.device = torch.device(args.device)
        h, w = args.size
        self.batch = make_batch(args, h, w)
        student_cfg, teacher_path = base_cfgs(args)
        self.models, self.opts = {}, {}
        self.storage = EventStorage(0)
        self.storage.__enter__()
        need_student = {"student_step", "stock_inference"} & set(variants)
        if need_student:
            self.models["student"] = build_model(tbd.student_config(student_cfg))
        if "teacher_forward" in variants:
            tcfg = distill_cfg(student_cfg, teacher_path, ["TFD"], args.teacher_weights)
            # a DistillMetaArch for its teacher and the two input formats
            self.teacher_holder = build_model(tcfg)
            self.models["teacher"] = self.teacher_holder.teacher
        for v, losses in DISTILLERS.items():
            if v in variants or (v == "tbd_step" and "student_inference" in variants):
                self.models[v] = build_model(
                    distill_cfg(student_cfg, teacher_path, losses, args.teacher_weights))
        # Every student-side model starts from the same weights, so detection counts (and hence
        # post-processing cost) and loss values are identical across variants.
        student_keys = [k for k in self.models if k != "teacher"]
        if student_keys:
            ref = self.models[student_keys[0]].state_dict()
            ref = {k: v for k, v in ref.items() if not k.startswith("distillers.")}
            for k in student_keys[1:]:
                missing, unexpected = self.models[k].load_state_dict(ref, strict=False)
                assert not unexpected and all(m.startswith("distillers.") for m in missing)
        for k, m in self.models.items():
            if k != "teacher":
                m.train()
                params = [p for p in m.parameters() if p.requires_grad]
                # lr 0: the full optimizer step is timed but weights stay put (stable timings).
                self.opts[k] = torch.optim.SGD(params, lr=0.0, momentum=0.9)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _autocast(self):
        dtype = AMP_DTYPES[amp_dtype(self.device.type, self.args.amp_dtype)]
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.args.amp)

    def call(self, variant: str) -> None:
        if variant == "teacher_forward":
            holder = self.teacher_holder
            teacher = self.models["teacher"]
            with torch.no_grad(), self._autocast():
                images = holder.preprocess_image(self.batch)
                dense_taps(teacher, teacher_images(teacher, self.batch, images,
                                                   holder.input_format,
                                                   holder.teacher_input_format))
            return
        if variant in ("student_inference", "stock_inference"):
            model = self.models["tbd_step" if variant == "student_inference" else "student"]
            model.eval()
            with torch.no_grad(), self._autocast():
                model(self.batch[:1])
            model.train()
            return
        key = "student" if variant == "student_step" else variant
        model, opt = self.models[key], self.opts[key]
        with self._autocast():
            losses = model(self.batch)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.storage.iter += 1

    def timed(self, variant: str) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.call(variant)
        self.sync()
        return (time.perf_counter() - t0) * 1000.0


# ------------------------------------------------------------------------------------ stats
def bootstrap_ratio(num: np.ndarray, den: list[np.ndarray], n_boot: int = 2000, seed: int = 0):
    """Ratio of medians num / sum(den) and its bootstrap 95% interval (rounds resampled)."""
    rng = np.random.default_rng(seed)
    point = np.median(num) / sum(np.median(d) for d in den)
    n = len(num)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        samples.append(np.median(num[idx]) / sum(np.median(d[idx]) for d in den))
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(point), float(lo), float(hi)


def profile_shares(runner: Runner, steps: int = 3) -> dict[str, float]:
    """Share of a TBD step's wall time spent in each ``tbd.*`` scope (rest: backward + update)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda"
                                     else [])
    totals: dict[str, float] = {}
    t_total = 0.0
    with profile(activities=acts) as prof:
        for _ in range(steps):
            t_total += runner.timed("tbd_step")
    for evt in prof.key_averages():
        if evt.key.startswith("tbd."):
            totals[evt.key] = totals.get(evt.key, 0.0) + evt.cpu_time_total / 1000.0
    shares = {k: v / t_total for k, v in sorted(totals.items())}
    shares["rest (backward, optimizer, loss sum)"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


# ------------------------------------------------------------------------------------ memory
def _proc_status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def child_memory(args) -> None:
    """Child process: run one variant and print its peak memory above the pre-build baseline.

    On Linux the RSS high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs, so
    the imports' transient peak does not hide the variant's; the baseline is VmRSS after that.
    """
    import detectron2.modeling  # noqa: F401  (import everything before the baseline)

    import tbd  # noqa: F401

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_mb("VmRSS")
        use_proc = True
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        use_proc = False
    runner = Runner(args, [args.memory_variant])
    for _ in range(max(args.warmup, 2) + 2):
        runner.call(args.memory_variant)
    if runner.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    elif use_proc:
        peak = _proc_status_mb("VmHWM") - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - base
    print(json.dumps({"variant": args.memory_variant, "peak_mem_mb": peak}))


def measure_memory(args, variants) -> dict[str, float]:
    out = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--memory-variant", v, "--device", args.device,
               "--batch", str(args.batch), "--size", *map(str, args.size), "--warmup", "2"]
        if args.coco:
            cmd.append("--coco")
        if args.amp:
            cmd.append("--amp")
        if args.amp_dtype:
            cmd += ["--amp-dtype", args.amp_dtype]
        if args.teacher_weights:
            cmd += ["--teacher-weights", args.teacher_weights]
        if args.teacher_config:
            cmd += ["--teacher-config", args.teacher_config]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in res.stdout.splitlines() if x.startswith("{")]
        if res.returncode != 0 or not line:
            raise RuntimeError(f"memory child for {v} failed:\n{res.stderr[-3000:]}")
        out[v] = json.loads(line[-1])["peak_mem_mb"]
        print(f"  peak memory {v}: {out[v]:.0f} MB", flush=True)
    return out


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.size is None:
        args.size = [800, 1333] if args.coco else [128, 128]
    if args.memory_variant:
        child_memory(args)
        return
    variants = STEP_VARIANTS + INFER_VARIANTS
    runner = Runner(args, variants)
    times = {v: [] for v in variants}
    print(f"timing {variants} interleaved: {args.warmup} warm-up + {args.reps} rounds", flush=True)
    order_rng = np.random.default_rng(0)
    for r in tqdm(range(args.warmup + args.reps), desc="Timing rounds", disable=None):
        # a fresh (seeded) order every round: no variant always follows the same other one
        for v in order_rng.permutation(variants):
            t = runner.timed(v)
            if r >= args.warmup:
                times[v].append(t)
    t = {v: np.array(x) for v, x in times.items()}
    shares = profile_shares(runner)
    del runner
    # timings written first: a time limit during the memory stage does not lose them
    report(args, variants, t, shares, {}, memory="skipped" if args.skip_memory else "pending")
    if not args.skip_memory:
        report(args, variants, t, shares, measure_memory(args, variants), memory="measured")


def report(args, variants: list[str], t: dict, shares: dict, mem: dict, memory: str) -> None:
    """Print and write results.md/json; ``memory``: measured, pending or skipped."""
    h, w = args.size
    rows = []
    for v in variants:
        batch = 1 if v.endswith("inference") else args.batch
        rows.append({"what": v, "device": args.device, "batch": batch, "image_size": [h, w],
                     "amp": args.amp, "median_ms": float(np.median(t[v])),
                     "min_ms": float(t[v].min()), "max_ms": float(t[v].max()),
                     "peak_mem_mb": mem.get(v)})
    floor = [t["student_step"], t["teacher_forward"]]
    summary = []
    for v in DISTILLERS:
        ratio, lo, hi = bootstrap_ratio(t[v], floor)
        mem_ratio = (mem[v] / (mem["student_step"] + mem["teacher_forward"])) if mem else None
        summary.append({"what": "ratio", "method": v.replace("_step", ""), "step_over_floor": ratio,
                        "step_over_floor_ci95": [lo, hi], "mem_over_floor": mem_ratio})
    inf, ilo, ihi = bootstrap_ratio(t["student_inference"], [t["stock_inference"]])
    summary.append({"what": "ratio", "method": "student_inference_over_stock",
                    "step_over_floor": inf, "step_over_floor_ci95": [ilo, ihi],
                    "mem_over_floor": None})
    rows += summary
    rows.append({"what": "tbd_profile_shares", **{k: round(v, 4) for k, v in shares.items()}})

    md = [f"# Speed and memory ({args.device}, batch {args.batch}, {h}x{w}, "
          f"{precision(args)}, {args.reps} interleaved rounds)", "",
          "| what | median ms | min | max | peak MB |", "|---|---|---|---|---|"]
    for r in rows[: len(variants)]:
        pm = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        md.append(f"| {r['what']} (batch {r['batch']}) | {r['median_ms']:.1f} | "
                  f"{r['min_ms']:.1f} | {r['max_ms']:.1f} | {pm} |")
    md += ["", "| ratio | value | 95% CI | memory / floor |", "|---|---|---|---|"]
    for s in summary:
        lo, hi = s["step_over_floor_ci95"]
        mr = "n/a" if s["mem_over_floor"] is None else f"{s['mem_over_floor']:.3f}"
        label = (s["method"] if s["method"].startswith("student_inference")
                 else f"{s['method']} step / (student step + teacher forward)")
        md.append(f"| {label} | {s['step_over_floor']:.3f} | [{lo:.3f}, {hi:.3f}] | {mr} |")
    md += ["", "TBD step time shares (torch.profiler, CPU-side scope times):", ""]
    md += [f"- {k}: {v:.1%}" for k, v in shares.items()]
    if memory == "pending":
        md += ["", "Peak memory: not measured yet (this file is rewritten when it is)."]
    text = "\n".join(md) + "\n"
    print(text, flush=True)
    default_name = f"speed_{args.device}{'_coco' if args.coco else ''}"
    out = Path(args.output or ROOT / "projects/TBD/benchmarks/results" / default_name)
    settings = {"batch": args.batch, "image_size": [h, w], "amp": args.amp,
                "precision": precision(args), "warmup": args.warmup,
                "reps": args.reps, "coco": args.coco,
                "teacher_weights": args.teacher_weights or "random",
                "teacher_config": os.path.relpath(teacher_config(args), ROOT),
                "optimizer": "SGD lr=0 momentum 0.9 (full step timed, weights fixed)",
                "memory": memory}
    write_results(out, "speed", settings, rows, text)


if __name__ == "__main__":
    main()
