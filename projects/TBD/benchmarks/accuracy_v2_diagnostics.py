#!/usr/bin/env python
"""Diagnostics of a v2 benchmark's tune runs: where a distiller gains or loses against the
baseline, read on ``tune`` only.

    .venv/bin/python projects/TBD/benchmarks/accuracy_v2_diagnostics.py \\
        --protocol projects/TBD/benchmarks/protocols/accuracy_v2_cpu_t16k.yaml

An investigation beside the pre-registered benchmark, not part of it: it trains nothing, chooses
nothing and never reads ``test``. For every finished tune run (one seed each: no intervals; the
benchmark's paired test seeds decide what beats what) it writes

1. the AP curve on ``tune`` against the baseline's at the same iterations: does distillation
   only speed training up, or does its gain last to the end of the converged schedule?
2. the loss terms averaged over three windows of the schedule (its first, middle and last
   sixteenth): the detection loss, each distillation term and their ratio, i.e. how much of
   the gradient signal the teacher supplies early and at convergence;
3. the harmony analysis on ``tune`` (harmonious proportion, Spearman score-IoU, mean score, mean
   IoU of the matched predictions) of the teacher, the baseline and each run: does the student
   become more harmonious, as the method intends? Cached in the work dir (``diag_<run>_h``).

Output: ``diagnostics.json`` and ``diagnostics.md`` beside the benchmark's results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from tbd_benchmarks.accuracy_v2 import (
    ProtocolError,
    Runner,
    analyze_harmony,
    auto_specs,
    calibration_spec,
    load_protocol,
    run_name,
    tune_specs,
)
from tbd_benchmarks.accuracy_v2_stats import calibration_verdict
from tbd_benchmarks.common import (
    ROOT,
    command_line,
    git_commit,
    machine_info,
)

# the share of the schedule each loss window averages over
WINDOW = 1 / 16
HARMONY_KEYS = ("num_predictions", "harmonious_proportion", "score_iou_spearman", "mean_score",
                "mean_iou")


def distill_loss_names() -> set[str]:
    """Every loss a registered distiller returns (the other ``loss_*`` are the detector's)."""
    from tbd.distillers import registered_distillers

    return {k for cls in registered_distillers().values() for k in cls.loss_keys}


def loss_windows(metrics_json: Path, iters: int, distill: set[str],
                 window: float = WINDOW) -> list[dict]:
    """Mean of every logged loss over the first, middle and last ``window`` of the schedule.

    Each entry: ``{"window", "from", "to", "detection", "distillation", "ratio", "terms"}``
    (iterations ``from`` to ``to - 1``); ``detection`` and ``distillation`` are the sums of the
    terms' means (None where the window has no logged row; ``distillation`` also for a run
    without distillation terms). An iteration logged twice (before an interruption and after
    the resume) keeps its last row, as the run's curve does.
    """
    by_iter: dict[int, dict] = {}
    for line in metrics_json.read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if "iteration" in r and any(k.startswith("loss_") for k in r):
            by_iter[r["iteration"]] = r
    n = iters * window
    out = []
    for label, lo, hi in (("start", 0, n), ("middle", iters / 2 - n, iters / 2),
                          ("end", iters - n, iters)):
        rows = [r for i, r in sorted(by_iter.items()) if lo <= i < hi]
        keys = sorted({k for r in rows for k in r if k.startswith("loss_")})
        terms = {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}
        det = sum(v for k, v in terms.items() if k not in distill) if rows else None
        dis = sum(v for k, v in terms.items() if k in distill) \
            if any(k in distill for k in terms) else None
        out.append({"window": label, "from": math.ceil(lo), "to": math.ceil(hi), "detection": det,
                    "distillation": dis, "ratio": dis / det if dis is not None and det else None,
                    "terms": terms})
    return out


def curve_gaps(curve: list[dict], baseline: list[dict]) -> list[dict]:
    """``curve`` with each point's difference to the baseline's AP at the same iteration (None
    where the baseline has no evaluation there)."""
    base = {p["iter"]: p["AP"] for p in baseline}
    return [{**p, "gap": p["AP"] - base[p["iter"]] if p["iter"] in base else None}
            for p in curve]


def harmony_on(split: str, config: str, weights: str, out: Path) -> dict:
    """The harmony analysis of a model on ``split``, run once (``out/harmony.json`` is reused)."""
    cached = out / "harmony.json"
    h = json.loads(cached.read_text()) if cached.is_file() else \
        analyze_harmony(split, config, weights, out)
    return {k: h.get(k) for k in HARMONY_KEYS}


def converged_iters(protocol: dict, runner: Runner) -> Optional[int]:
    """The schedule the benchmark's calibration chose (the first ladder entry whose recorded
    baseline curve passed), None while there is none."""
    for n in protocol["calibration"]["ladder"]:
        row = runner.recorded(calibration_spec(protocol, n))
        if row is None:
            return None
        if calibration_verdict(row.get("curve", []), n,
                               protocol["calibration"]["max_last_quarter_gain"])["converged"]:
            return n
    return None


def run_dir(runner: Runner, spec: dict, row: dict) -> Path:
    """Where a tune run's files are: a shared baseline run lives in its own protocol's work dir."""
    home = runner.baseline_work if row.get("copied_from") else runner.work
    return home / run_name(spec)


def earlier_entries(path: Path, protocol: dict) -> dict[str, dict]:
    """The run entries of the diagnostics committed at ``path``, by run name, when they were
    written under this very protocol file (its sha256); else none. A fresh clone has the
    benchmark's results (``restore_work``) but not the runs' folders, so the entries of runs
    diagnosed before are kept rather than lost; each says when and at which commit it was
    computed."""
    if not path.is_file():
        return {}
    d = json.loads(path.read_text())
    if d.get("protocol_sha256") != protocol["sha256"]:
        return {}
    stamp = {"date": d.get("date"), "commit": d.get("commit")}
    return {r["run"]: {**r, "computed": r.get("computed", stamp)} for r in d.get("runs", [])}


def diagnose(protocol: dict, runner: Runner, harmony: bool = True,
             earlier: Optional[dict[str, dict]] = None) -> dict:
    """The diagnostics of every finished tune run of ``protocol`` in ``runner``'s work dir.

    ``earlier``: entries computed before (``earlier_entries``), used for a recorded run whose
    folder is not in the work dir. A run that has neither gets its recorded curve alone where its
    row was restored from committed results (``restore_work``: the folder never was here), else
    it is an error (a wrong work dir, a moved folder)."""
    earlier = earlier or {}
    iters = converged_iters(protocol, runner)
    if iters is None:
        raise ProtocolError(f"{runner.work}: no calibrated schedule is recorded yet; run the "
                            "benchmark's calibration first.")
    split, distill = protocol["splits"]["tune"], distill_loss_names()
    base_spec = calibration_spec(protocol, iters)
    base_row = runner.recorded(base_spec)
    distilled = [m["name"] for m in protocol["methods"] if m["losses"]]
    specs = [base_spec] + tune_specs(protocol, iters) + auto_specs(protocol, iters, distilled)
    rows, failed = [], []
    for spec in tqdm(specs, desc="diagnostics", unit="run"):
        row = runner.recorded(spec)
        if row is None:
            continue
        if row.get("failed"):
            failed.append({"run": run_name(spec), "failed": row["failed"]})
            continue
        d = run_dir(runner, spec, row)
        entry = {"run": run_name(spec), "method": spec["method"],
                 "multiplier": spec.get("multiplier"), "auto": bool(spec.get("auto")),
                 "AP": row["AP"], "curve": curve_gaps(row.get("curve", []),
                                                      base_row.get("curve", []))}
        if not (d / "metrics.json").is_file():
            kept = earlier.get(run_name(spec))
            if kept is not None and (kept.get("harmony") or not harmony):
                rows.append(kept)
                continue
            if row.get("restored_from"):
                # Trained in a sitting whose work dir is gone and never diagnosed there: its
                # recorded curve is all that is left (no logged losses, no weights).
                rows.append({**entry, "loss_windows": None, "harmony": None,
                             "curve_only": row["restored_from"]})
                continue
            raise ProtocolError(f"{d / 'metrics.json'}: missing, but {run_name(spec)} is "
                                "recorded and not in the earlier diagnostics; the run's folder "
                                "was moved or deleted (pass --work-dir / --baseline-work-dir "
                                "where it is).")
        entry["loss_windows"] = loss_windows(d / "metrics.json", iters, distill)
        if harmony:
            entry["harmony"] = harmony_on(split, str(d / "config.yaml"),
                                          str(d / "model_final.pth"),
                                          runner.work / f"diag_{run_name(spec)}_h")
        rows.append(entry)
    teacher = None
    if harmony:
        t = protocol["teacher"]
        teacher = harmony_on(split, t["config"], t["weights"], runner.work / "diag_teacher_h")
    t_row = runner.recorded({"split": "tune", "method": "teacher", "multiplier": None, "seed": 0,
                             "iters": 0})  # the headroom gate's evaluation
    return {"protocol": protocol["file"], "protocol_sha256": protocol["sha256"], "split": split,
            "iters": iters, "teacher_AP": t_row["AP"] if t_row else None,
            "teacher_harmony": teacher, "runs": rows, "failed": failed}


def _f(x: Optional[float], fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _label(r: dict) -> str:
    if r["method"] == "baseline":
        return "baseline"
    return f"{r['method']} " + ("auto" if r["auto"] else f"x{r['multiplier']:g}")


def markdown(d: dict, meta: dict) -> str:
    """The diagnostics as ``diagnostics.md``."""
    lines = [f"# Diagnostics on `{d['split']}`: `{Path(d['protocol']).stem}`", "",
             f"An investigation beside the benchmark, not part of it: it trains and chooses "
             f"nothing and never reads the test split. One run per setting (tune seed): no "
             f"intervals, the benchmark's paired test seeds decide. Written {meta['date']} at "
             f"commit `{meta['commit']}` by `{meta['command']}` on {meta['machine']['cpu']} "
             f"({meta['machine']['cores']} cores); protocol `{d['protocol']}` (sha256 "
             f"`{d['protocol_sha256'][:12]}`), schedule {d['iters']} iterations.", "",
             "## AP on the tune split by iteration (difference to the baseline)", ""]
    its = sorted({p["iter"] for r in d["runs"] for p in r["curve"]})
    lines += ["| run | " + " | ".join(str(i) for i in its) + " |",
              "|---|" + "---|" * len(its)]
    for r in d["runs"]:
        at = {p["iter"]: p for p in r["curve"]}
        cells = ["-" if i not in at else _f(at[i]["AP"]) if r["method"] == "baseline" else
                 f"{_f(at[i]['AP'])} ({_f(at[i]['gap'], '+.1f')})" for i in its]
        lines.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
    lines += ["", "## Loss terms (mean of the logged values over a sixteenth of the schedule)",
              "", "| run | window (iterations) | detection | distillation | distillation / "
              "detection | distillation terms |", "|---|---|---|---|---|---|"]
    distill = distill_loss_names()
    for r in d["runs"]:
        for w in r["loss_windows"] or []:
            terms = ", ".join(f"{k} {v:.3f}" for k, v in w["terms"].items() if k in distill)
            lines.append(f"| {_label(r)} | {w['window']} ({w['from']}-{w['to']}) | "
                         f"{_f(w['detection'], '.3f')} | {_f(w['distillation'], '.3f')} | "
                         f"{_f(w['ratio'], '.2f')} | {terms or '-'} |")
    if d["teacher_harmony"] is not None:
        lines += ["", "## Harmony on the tune split (matched predictions, IoU >= 0.5)", "",
                  "| model | AP | predictions | harmonious % | Spearman score-IoU | mean score | "
                  "mean IoU |", "|---|---|---|---|---|---|---|"]
        for label, ap, h in [("teacher", d["teacher_AP"], d["teacher_harmony"])] + \
                [(_label(r), r["AP"], r["harmony"]) for r in d["runs"] if r["harmony"]]:
            hp = h["harmonious_proportion"]
            lines.append(f"| {label} | {_f(ap)} | {h['num_predictions']} | "
                         f"{_f(None if hp is None else 100 * hp)} | "
                         f"{_f(h['score_iou_spearman'], '.3f')} | {_f(h['mean_score'], '.3f')} | "
                         f"{_f(h['mean_iou'], '.3f')} |")
    kept = [r for r in d["runs"] if r.get("computed")]
    if kept:
        lines += ["", "Kept from the earlier diagnostics (the runs' folders are not in this work "
                  "dir, e.g. a fresh clone): " + ", ".join(
                      f"`{r['run']}` ({r['computed']['date']}, commit "
                      f"`{str(r['computed']['commit'])[:12]}`)" for r in kept) + "."]
    curve_only = [r for r in d["runs"] if r.get("curve_only")]
    if curve_only:
        lines += ["", "Curve only (restored from committed results, trained in a sitting whose "
                  "work dir, with the logged losses and weights, is gone; no loss terms, no "
                  "harmony): " + ", ".join(f"`{r['run']}`" for r in curve_only) + "."]
    if d["failed"]:
        lines += ["", "Failed tune runs (not diagnosed): " +
                  ", ".join(f"`{f['run']}` ({f['failed']})" for f in d["failed"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--protocol", required=True, help="the benchmark's protocol file (yaml)")
    p.add_argument("--output", default=None, help="folder for diagnostics.json and .md; default "
                   "the benchmark's results folder, projects/TBD/benchmarks/results/<name>")
    p.add_argument("--work-dir", default=None, help="the benchmark's work dir; default "
                   "output/benchmarks/<protocol name>")
    p.add_argument("--baseline-work-dir", default=None, help="with 'baseline_from': that "
                   "protocol's work dir (default output/benchmarks/<its name>)")
    p.add_argument("--no-harmony", action="store_true", help="skip the harmony analyses (they "
                   "evaluate each model on tune, about a minute each on one CPU core)")
    args = p.parse_args(argv)
    try:
        protocol = load_protocol(args.protocol)
        work = Path(args.work_dir or ROOT / "output/benchmarks" / protocol["name"])
        if not work.is_dir():
            raise ProtocolError(f"--work-dir {work}: no such folder; run the benchmark first.")
        runner = Runner(protocol, work, 1,
                        Path(args.baseline_work_dir) if args.baseline_work_dir else None)
        out = Path(args.output or ROOT / "projects/TBD/benchmarks/results" / protocol["name"])
        d = diagnose(protocol, runner, harmony=not args.no_harmony,
                     earlier=earlier_entries(out / "diagnostics.json", protocol))
    except ProtocolError as e:
        sys.exit(str(e))
    from tbd.checkpoint import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
            "command": command_line() if argv is None else " ".join(["accuracy_v2_diagnostics.py",
                                                                       *argv]),
            "machine": machine_info()}
    atomic_write_text(str(out / "diagnostics.json"), json.dumps({**meta, **d}, indent=2))
    atomic_write_text(str(out / "diagnostics.md"), markdown(d, meta))
    print(f"diagnostics of {len(d['runs'])} tune run(s) in {out}")


if __name__ == "__main__":
    main()
