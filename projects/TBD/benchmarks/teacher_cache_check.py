#!/usr/bin/env python
"""The teacher cache on a benchmark's real pair: the same training, and how much faster.

    .venv/bin/python projects/TBD/benchmarks/teacher_cache_check.py \\
        --protocol projects/TBD/benchmarks/protocols/accuracy_v2_cpu_t16k.yaml --iters 1000

Trains one distilled run of the protocol (``--method``, the published weights, the tune seed,
``--iters`` iterations on the protocol's schedule shape) twice through ``train_net.py``, without
and with ``MODEL.DISTILL.TEACHER.CACHE_MB``, at the same time, one thread each (the same machine
load for both: the speed is a ratio side by side). It checks that the two trainings are the same:
every logged loss at every logged iteration, the final weights (bit for bit) and the final AP;
and reports the seconds per iteration of both over the last quarter, where the cache serves
almost every batch, and the share of batches it served. Output: ``results.json`` and
``results.md`` in ``--output`` (default ``results/teacher_cache_check``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tbd_benchmarks.accuracy_v2 import ProtocolError, load_protocol, method_of, train_opts
from tbd_benchmarks.common import ROOT, run_logged, write_results
from tbd_benchmarks.logs import last_eval

# logged values that are not the training's: timing, memory, the cache's own statistics
NOT_TRAINING = ("time", "data_time", "eta_seconds", "memory/", "distill/teacher_cache_")


def compare_metrics(plain: Path, cached: Path) -> dict:
    """The logged values of two runs, iteration by iteration: the training's keys that differ
    (none when the trainings are the same) and the cache's last statistics."""
    def rows(path: Path) -> dict[int, dict]:
        out = {}
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r.get("iteration", -1)] = r
        return out

    a, b = rows(plain), rows(cached)
    differ = []
    for it in sorted(set(a) | set(b)):
        ra, rb = a.get(it, {}), b.get(it, {})
        for k in sorted(set(ra) | set(rb)):
            if k.startswith(NOT_TRAINING) or k == "iteration":
                continue
            va, vb = ra.get(k), rb.get(k)
            if va != vb and not (va != va and vb != vb):  # NaN (e.g. APl without large boxes)
                differ.append({"iteration": it, "key": k, "plain": va, "cached": vb})
    served = [r["distill/teacher_cache_served"] for _, r in sorted(b.items())
              if "distill/teacher_cache_served" in r]
    return {"iterations_compared": len(set(a) & set(b)), "differences": differ[:20],
            "num_differences": len(differ), "served_share_at_end": served[-1] if served else None}


def same_weights(plain: Path, cached: Path) -> dict:
    """Whether two checkpoints hold bit-identical model tensors (the names that differ)."""
    sa = torch.load(plain, map_location="cpu", weights_only=False)["model"]
    sb = torch.load(cached, map_location="cpu", weights_only=False)["model"]
    differ = sorted(k for k in set(sa) | set(sb)
                    if k not in sa or k not in sb or not torch.equal(sa[k], sb[k]))
    return {"tensors": len(sa), "differ": differ}


def tail_speed(metrics_json: Path, iters: int) -> float:
    """Median seconds per iteration over the last quarter of the schedule."""
    times = [r["time"] for r in map(json.loads, metrics_json.read_text().splitlines())
             if "time" in r and r.get("iteration", 0) >= 0.75 * iters]
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--protocol", required=True, help="a v2 benchmark protocol (its pair, data, "
                   "schedule shape and tune seed)")
    p.add_argument("--method", default="tbd", help="a distilled method of the protocol")
    p.add_argument("--iters", type=int, default=1000, help="iterations of each run")
    p.add_argument("--cache-mb", type=float, default=512.0)
    p.add_argument("--output", default=None)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--reuse", action="store_true", help="compare the two runs already in the "
                   "work dir (both finished) instead of training them again")
    args = p.parse_args(argv)
    try:
        protocol = load_protocol(args.protocol)
        if not method_of(protocol, args.method)["losses"]:
            raise ProtocolError(f"--method {args.method}: not a distilled method of "
                                f"{protocol['file']}.")
    except (ProtocolError, StopIteration) as e:
        sys.exit(str(e) or f"--method {args.method}: not a method of {args.protocol}.")
    work = Path(args.work_dir or ROOT / "output/benchmarks/teacher_cache_check")
    work.mkdir(parents=True, exist_ok=True)
    spec = {"split": "tune", "method": args.method, "multiplier": 1.0,
            "seed": protocol["tuning"]["seed"], "iters": args.iters}
    cfg = str(ROOT / protocol["student"]["config"])

    def run(name: str, extra: list[str]) -> Path:
        out = work / name
        if args.reuse and (out / "model_final.pth").is_file():
            return out
        cmd = [sys.executable, "projects/TBD/train_net.py", "--config-file", cfg,
               *train_opts(protocol, spec, out), "TEST.EVAL_PERIOD", "0", *extra]
        run_logged(cmd, work / f"{name}.log", {"OMP_NUM_THREADS": "1"})
        return out

    with ThreadPoolExecutor(max_workers=2) as pool:
        plain_f = pool.submit(run, "plain", [])
        cached_f = pool.submit(run, "cached", ["MODEL.DISTILL.TEACHER.CACHE_MB",
                                               str(args.cache_mb)])
        plain, cached = plain_f.result(), cached_f.result()
    metrics = compare_metrics(plain / "metrics.json", cached / "metrics.json")
    weights = same_weights(plain / "model_final.pth", cached / "model_final.pth")
    ap = {k: last_eval(d / "metrics.json").get("AP") for k, d in (("plain", plain),
                                                                   ("cached", cached))}
    speed = {k: tail_speed(d / "metrics.json", args.iters) for k, d in (("plain", plain),
                                                                         ("cached", cached))}
    same = metrics["num_differences"] == 0 and not weights["differ"] and ap["plain"] == ap["cached"]
    settings = {"protocol": protocol["file"], "protocol_sha256": protocol["sha256"],
                "method": args.method, "iters": args.iters, "cache_mb": args.cache_mb,
                "same_training": same, "metrics": metrics, "weights": weights, "AP": ap,
                "s_per_iter_last_quarter": speed, "cached_over_plain": speed["cached"]
                / speed["plain"]}
    md = "\n".join([
        f"# Teacher cache on `{protocol['name']}`'s pair", "",
        f"`{args.method}` (published weights, seed {spec['seed']}), {args.iters} iterations, "
        "without and with `MODEL.DISTILL.TEACHER.CACHE_MB "
        f"{args.cache_mb:g}`, side by side at one thread each.", "",
        f"- Same training: **{'yes' if same else 'NO'}** ({metrics['iterations_compared']} "
        f"logged iterations compared, {metrics['num_differences']} values differ; "
        f"{weights['tensors'] - len(weights['differ'])} of {weights['tensors']} weight tensors "
        f"bit-identical; final AP {ap['plain']} vs {ap['cached']}).",
        f"- Batches served from the cache by the end: "
        f"{100 * (metrics['served_share_at_end'] or 0):.1f}% of all so far.",
        f"- Seconds per iteration over the last quarter: {speed['plain']:.3f} without, "
        f"{speed['cached']:.3f} with the cache: **x{speed['cached'] / speed['plain']:.2f}**.", ""])
    out = Path(args.output or ROOT / "projects/TBD/benchmarks/results/teacher_cache_check")
    write_results(out, "teacher_cache_check", settings, [], md)
    print(md)


if __name__ == "__main__":
    main()
