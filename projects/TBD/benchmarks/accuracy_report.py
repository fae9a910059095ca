"""The accuracy benchmark's statistics and report: per-row means and spreads, the pooled seed
spread, results.md and the bar chart."""

from __future__ import annotations

import statistics
from pathlib import Path

from tbd_benchmarks.accuracy_protocol import label
from tbd_benchmarks.logs import METRICS


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(label(r), []).append(r)
    out = []
    for name, rs in groups.items():
        ok = [r for r in rs if not r.get("failed")]
        agg = {"row": name, "n_seeds": len([r for r in ok if r["seed"] is not None]) or len(ok[:1]),
               "indicative": rs[0]["indicative"],
               "failed": [f"seed {r['seed']}: {r['failed']}" for r in rs if r.get("failed")]}
        for k in METRICS + ["harmonious_proportion", "score_iou_spearman", "infer_s_per_image"]:
            vals = [r[k] for r in ok if r.get(k) is not None]
            agg[k] = statistics.mean(vals) if vals else None
            agg[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(agg)
    return out


def markdown(agg: list[dict], settings: dict, pooled: float | None) -> str:
    def cell(a, k, scale=1.0, digits=1):
        v, s = a[k], a[k + "_std"]
        if v is None:
            return "n/a"
        return f"{v * scale:.{digits}f}" + ("" if s is None else f" ± {s * scale:.{digits}f}")

    lines = [f"# Accuracy benchmark ({settings['profile']} profile)", "",
             f"Students: R18-FPN64 (2 head convs), {settings['iters']} iterations at batch 8, "
             f"128x128, trained on {settings['train']} and evaluated on {settings['val']}. "
             "Mean ± standard deviation (ddof 1) over seeds; rows marked * ran 1 seed and are "
             "indicative only."
             + (f" Teacher: `{settings['teacher_config']}`." if settings.get("teacher_config")
                else "")
             + (f" Every distilled run adds `{' '.join(settings['extra_opts'])}`."
                if settings.get("extra_opts") else ""), "",
             "| row | seeds | AP | AP50 | AP75 | APs | APm | APl | harmonious % | spearman "
             "| infer ms/img |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in agg:
        mark = "*" if a["indicative"] else ""
        seeds = f"{a['n_seeds']}" + (f" (+{len(a['failed'])} failed)" if a.get("failed") else "")
        lines.append(
            f"| {a['row']}{mark} | {seeds} | " + " | ".join(cell(a, k) for k in METRICS)
            + f" | {cell(a, 'harmonious_proportion', 100)} | "
            f"{cell(a, 'score_iou_spearman', 1, 3)} | {cell(a, 'infer_s_per_image', 1000, 0)} |")
    failures = [f"- {a['row']}, {f}" for a in agg for f in a.get("failed", [])]
    if failures:
        lines += ["", "Runs that stopped on a non-finite loss (not in the means; their logs are "
                  "in the work dir):", "", *failures]
    cost = settings.get("gflops_per_image")
    if cost:
        t, s = cost["teacher"], cost["student"]
        lines += ["", f"Cost of one 128x128 image (fvcore, inference forward without "
                  f"post-processing): teacher {t['total']:.2f} GFLOPs (backbone+FPN "
                  f"{t['backbone_fpn']:.2f}, head {t['head']:.2f}), student {s['total']:.2f} "
                  f"({s['backbone_fpn']:.2f}, {s['head']:.2f}). Inference time: Detectron2's "
                  "evaluator, per image, forward and post-processing"
                  + (", one thread, beside another run." if settings.get("jobs", 1) > 1
                     else ".")]
    if settings.get("invocations"):
        lines += ["", f"Wall time: {settings['wall_minutes_all_invocations']} min over "
                  f"{settings['invocations']} invocation(s) of the benchmark"
                  + ("." if settings.get("complete") else ", not complete yet.")]
    if pooled is not None:
        lines += ["", f"Pooled seed standard deviation of AP over the main rows: {pooled:.2f}. "
                  f"A difference counts only above twice that ({2 * pooled:.2f} AP)."]
    return "\n".join(lines) + "\n"


def plot(agg: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [a["row"] + ("*" if a["indicative"] else "") + ("\n(diverged)" if not a["n_seeds"]
                                                            else "") for a in agg]
    ap = [a["AP"] or 0 for a in agg]
    err = [a["AP_std"] or 0 for a in agg]
    fig, ax = plt.subplots(figsize=(1.1 * len(agg) + 2, 3.5))
    ax.bar(names, ap, yerr=err, capsize=3, color=["#888" if n == "teacher" else "#4878a8"
                                                   for n in names])
    ax.set_ylabel("box AP (val)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pooled_std(rows: list[dict]) -> float | None:
    groups: dict[str, list[float]] = {}
    for r in rows:
        if not r["indicative"] and r["method"] != "teacher" and r.get("AP") is not None:
            groups.setdefault(label(r), []).append(r["AP"])
    num = sum((len(v) - 1) * statistics.variance(v) for v in groups.values() if len(v) > 1)
    den = sum(len(v) - 1 for v in groups.values() if len(v) > 1)
    return (num / den) ** 0.5 if den else None
