"""The accuracy benchmark v2's results: results.json, results.md and the charts, from the recorded
runs (rewritten after every finished run; a table of unfinished phases says it is partial)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from tbd_benchmarks.accuracy_v2_stats import summarise
from tbd_benchmarks.common import write_results


def model_cost(config: str, gflops_of: Callable[[str], dict]) -> dict:
    """Parameters (millions) and inference GFLOPs of one test-size image of a config's model."""
    from detectron2.modeling import build_model

    from tbd.config import load_config

    model = build_model(load_config(config, ["MODEL.DEVICE", "cpu"]))
    return {"params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops": gflops_of(config)["total"]}


def _cost(protocol: dict, work: Path, gflops_of: Callable[[str], dict]) -> dict:
    path = work / "cost.json"
    if path.is_file():
        return json.loads(path.read_text())
    cost = {"teacher": model_cost(protocol["teacher"]["config"], gflops_of),
            "student": model_cost(protocol["student"]["config"], gflops_of)}
    path.write_text(json.dumps(cost, indent=2))
    return cost


def _fmt(v, digits: int = 1, scale: float = 1.0) -> str:
    return "n/a" if v is None else f"{v * scale:.{digits}f}"


def _mean_std(mean, std) -> str:
    return _fmt(mean) + ("" if std is None else f" ± {std:.1f}")


def _paired_cells(d: Optional[dict]) -> tuple[str, str]:
    """A paired difference as "mean [low, high]" and its verdict; empty cells where none."""
    if d is None:
        return "", ""
    diff = f"{_fmt(d['mean'], 2)} [{_fmt(d['low'], 2)}, {_fmt(d['high'], 2)}]"
    if d["verdict"] == "pending":
        return diff, f"pending ({d['n']} of {d['seeds_required']} seeds)"
    return diff, {"above": "better", "below": "worse"}.get(d["verdict"], "inconclusive")


def markdown(protocol: dict, state: dict, settings: dict, table: list[dict]) -> str:
    claim = ("a claim" if protocol["claim"] else
             "no claim (a smoke check or an investigation, not a result)")
    lines = [f"# Accuracy benchmark v2: `{protocol['name']}`", "",
             f"Protocol: `{protocol['file']}` (sha256 `{protocol['sha256'][:12]}`), {claim}. "
             f"Train `{protocol['splits']['train']}`, choices on `{protocol['splits']['tune']}`, "
             f"report on `{protocol['splits']['test']}`. Status: **{settings['status']}**.", ""]
    if protocol["deviations"]:
        lines += ["Deviations from the protocol:", ""] + [f"- {d}" for d in protocol["deviations"]]
        lines.append("")
    if protocol.get("baseline_from"):
        src = protocol["baseline_from"]
        copied = {json.dumps(r, sort_keys=True) for r in [*settings["calibration_rows"],
                                                          *state["test"]]
                  if r and r.get("copied_from")}
        lines += [f"Baseline runs are shared with `{src['file']}` (sha256 `{src['sha256'][:12]}`; "
                  "the same student, splits, schedule, calibration and tune seed, checked when "
                  f"the protocol loads): {len(copied)} are its runs (read from its work dir or "
                  "its results), not trained again.", ""]
    trained = [r for r in [*settings["calibration_rows"], *state["tune"][1:],
                           *(state.get("auto") or []), *state["test"]] if r]
    if trained:
        by_cpu = Counter(r.get("cpu", "not recorded") for r in trained)
        lines += ["Machines (runs trained on each; `not recorded`: a run recorded before the "
                  "runner kept its machine): "
                  + "; ".join(f"{cpu}: {n}" for cpu, n in sorted(by_cpu.items())) + ".", ""]
    lines += ["## 1. Calibration: the baseline's learning curve on `tune`", ""]
    for c, row in zip(state["calibration"], settings["calibration_rows"]):
        curve = ", ".join(f"{p['iter']}: {p['AP']:.1f}" for p in row.get("curve", []))
        lines.append(f"- {c['iters']} iterations: AP by iteration {curve or 'n/a'}; last-quarter "
                     f"gain {_fmt(c['last_quarter_gain'], 2)} (must be < "
                     f"{c['max_last_quarter_gain']}): "
                     f"**{'converged' if c['converged'] else 'not converged'}**"
                     + (f" (the run of `{row['copied_from']}`: the same baseline run)"
                        if row.get("copied_from") else "") + ".")
    h = state.get("headroom")
    if h:
        lines.append(f"- Headroom on `tune`: teacher {h['teacher_AP']:.1f} AP minus the calibrated "
                     f"baseline's {h['baseline_AP']:.1f} = {h['gap']:+.1f} (must be >= "
                     f"{h['min_ap']}): **{'passed' if h['passed'] else 'failed: no main runs'}**.")
    tune = [r for r in state["tune"] if r and r["method"] != "baseline"]
    if tune:
        mults = sorted({r["multiplier"] for r in tune})
        lines += ["", "## 2. Tuning on `tune` (one run per loss-weight multiplier, seed "
                  f"{protocol['tuning']['seed']})", "",
                  "| method | " + " | ".join(f"x{m:g}" for m in mults) + " | chosen |",
                  "|---|" + "---|" * (len(mults) + 1)]
        for m in [x["name"] for x in protocol["methods"] if x["losses"]]:
            cells = []
            for x in mults:
                r = next((r for r in tune if r["method"] == m and r["multiplier"] == x), None)
                cells.append("-" if r is None else "diverged" if r.get("failed")
                             else _fmt(r.get("AP")))
            chosen = (state["choices"] or {}).get(m)
            chosen = "" if chosen is None else f"x{chosen:g}"
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {chosen} |")
    if table:
        ref = protocol["reference"]
        teacher = state.get("teacher") or {}
        base = next((t for t in table if t["method"] == "baseline"), None)
        headroom = ("" if base is None or base["AP_mean"] is None or teacher.get("AP") is None
                    else f", {teacher['AP'] - base['AP_mean']:+.1f} above the baseline's mean "
                    "(headroom on test)")
        lines += ["", f"## 3. Test (`{protocol['splits']['test']}`, seeds "
                  f"{protocol['test']['seeds']})", "",
                  f"Teacher: {_fmt(teacher.get('AP'))} AP{headroom}. Mean ± std over seeds; paired "
                  f"difference to `{ref}` (same seed) with its "
                  f"{protocol['statistics']['confidence']:.0%} t-interval (the protocol's "
                  "verdict), and to the baseline the same way (descriptive: does distillation "
                  "gain anything on the converged schedule?); failures by the protocol's rule, "
                  "with a Clopper-Pearson interval.", "",
                  "| method | weights | runs | AP (all runs) | AP (without failures) | "
                  f"minus {ref} | verdict | minus baseline | vs baseline | failures | "
                  "harmonious % | spearman |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in table:
            diff, verdict = _paired_cells(t["vs_reference"])
            diff_b, verdict_b = _paired_cells(t.get("vs_baseline"))
            lo, hi = t["failure_interval"]
            weights = "" if t["multiplier"] is None else f"x{t['multiplier']:g}"
            lines.append(
                f"| {t['method']} | {weights} "
                f"| {t['runs']} | {_mean_std(t['AP_mean'], t['AP_std'])} | "
                f"{_mean_std(t['AP_mean_ok'], t['AP_std_ok'])} | {diff} | {verdict} | "
                f"{diff_b} | {verdict_b} | "
                f"{t['failures']}/{t['runs']} [{lo:.2f}, {hi:.2f}] | "
                f"{_fmt(t['harmonious_proportion'], 1, 100)} | "
                f"{_fmt(t['score_iou_spearman'], 3)} |")
    auto = [r for r in state.get("auto") or [] if r]
    if auto:
        lines += ["", "## 4. Automatic loss weights on `tune` (`MODEL.DISTILL.AUTO_WEIGHT`, "
                  "default targets)", "",
                  "One run per distiller, the tune seed, starting from the published weights; "
                  "against the same distiller's tune run at its chosen multiplier. One seed: no "
                  "interval.", "",
                  "| method | auto AP | tuned AP (multiplier) | auto minus tuned | scales |",
                  "|---|---|---|---|---|"]
        for r in auto:
            chosen = (state["choices"] or {}).get(r["method"])
            tuned = next((t for t in tune if t["method"] == r["method"]
                          and t["multiplier"] == chosen), None)
            t_ap = None if tuned is None else tuned.get("AP")
            diff = None if t_ap is None or r.get("AP") is None else r["AP"] - t_ap
            scales = ", ".join(f"{k} {v:.3g}" for k, v in (r.get("auto_scales") or {}).items())
            lines.append(f"| {r['method']} | {'diverged' if r.get('failed') else _fmt(r.get('AP'))}"
                         f" | {_fmt(t_ap)} ({'' if chosen is None else f'x{chosen:g}'}) | "
                         f"{_fmt(diff)} | {scales} |")
    cost = settings.get("cost")
    if cost:
        lines += ["", f"Models: teacher {cost['teacher']['params_M']:.2f} M parameters, "
                  f"{cost['teacher']['gflops']:.3f} GFLOPs per 64x64 image; student "
                  f"{cost['student']['params_M']:.2f} M, {cost['student']['gflops']:.3f} GFLOPs "
                  "(fvcore, inference forward without post-processing)."]
        infer = settings.get("infer_ms")
        if infer:
            lines[-1] += (" Inference time (Detectron2's evaluator on the test split, forward "
                          "and post-processing, per image, median over runs): " + ", ".join(
                              f"{k} {v:.1f} ms" for k, v in infer.items())
                          + "; measured beside the benchmark's other runs, so not a speed "
                          "comparison (`speed.py` is).")
    lines += ["", f"Wall time: {settings['wall_minutes_all_invocations']} min over "
              f"{settings['invocations']} invocation(s)."]
    return "\n".join(lines) + "\n"


def plot_test(table: list[dict], teacher_ap, reference: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [t["method"] for t in table]
    a1.bar(names, [t["AP_mean"] or 0 for t in table], yerr=[t["AP_std"] or 0 for t in table],
           capsize=3, color="#4878a8")
    if teacher_ap is not None:
        a1.axhline(teacher_ap, color="#888", ls="--", label=f"teacher {teacher_ap:.1f}")
        a1.legend(loc="lower right")
    a1.set_ylabel("box AP (test), mean ± std")
    others = [t for t in table if t["vs_reference"] and t["vs_reference"]["mean"] is not None]
    for i, t in enumerate(others):
        d = t["vs_reference"]
        lo = d["low"] if d["low"] is not None else d["mean"]
        hi = d["high"] if d["high"] is not None else d["mean"]
        a2.errorbar([d["mean"]], [i], xerr=[[d["mean"] - lo], [hi - d["mean"]]], fmt="o",
                    capsize=4, color="#4878a8")
    a2.axvline(0, color="#888", lw=1)
    a2.set_yticks(range(len(others)), [t["method"] for t in others])
    a2.set_xlabel(f"AP minus {reference}, same seed (95% t-interval)")
    for ax in (a1,):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in rows:
        c = r.get("curve") or []
        label = r["method"] + ("" if r.get("multiplier") is None else f" x{r['multiplier']:g}")
        ax.plot([p["iter"] for p in c], [p["AP"] for p in c], marker="o", ms=3, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("box AP (tune)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve_rows(protocol: dict, state: dict) -> list[dict]:
    """The baseline, TBD and the best peer on `tune`, each at its chosen multiplier (x1 before
    the choices exist); the best peer is the one of highest tune AP among its chosen runs."""
    tune = [r for r in state["tune"] if r and r.get("curve")]
    choices = state["choices"] or {}

    def at_choice(m: str):
        want = choices.get(m, 1.0)
        return next((r for r in tune if r["method"] == m and r["multiplier"] == want), None)

    ref = protocol["reference"]
    rows = [r for r in tune if r["method"] == "baseline"][:1]
    rows += [r for r in [at_choice(ref)] if r]
    peers = [r for m in protocol["methods"] if m["losses"] and m["name"] != ref
             if (r := at_choice(m["name"])) and r.get("AP") is not None]
    if peers:
        rows.append(max(peers, key=lambda r: r["AP"]))
    return rows


def write_report(out: Path, protocol: dict, state: dict, runner, calls: list[dict], commit: str,
                 model_gflops_of: Callable[[str], dict]) -> None:
    methods = [m["name"] for m in protocol["methods"]]
    test = [r for r in state["test"] if r]
    table = summarise(test, methods, protocol["reference"], protocol["failure"]["stalled_below"],
                      protocol["statistics"]["confidence"],
                      len(protocol["test"]["seeds"])) if test else []
    n_tune = len([m for m in protocol["methods"] if m["losses"]]) * len(
        protocol["tuning"]["multipliers"])
    n_test = len(methods) * len(protocol["test"]["seeds"])
    done_test = len(test)
    done_tune = max(len(state["tune"]) - 1, 0)  # its first row is the baseline's
    ladder = protocol["calibration"]["ladder"]
    if state.get("headroom") and not state["headroom"]["passed"]:
        status = "headroom check failed: no main runs"
    elif state["calibration"] and not any(c["converged"] for c in state["calibration"]):
        tried = len(state["calibration"])
        status = ("calibration not passed: no main runs" if tried == len(ladder) else
                  f"calibrating: {ladder[tried - 1]} iterations did not pass, {ladder[tried]} "
                  "next")
    elif done_test == n_test:
        status = "complete"
    elif done_tune == n_tune and not done_test:
        # where an investigation (`--phase tune`) ends: finished, not "partial"
        status = f"tune complete ({n_tune}/{n_tune} runs), no test run"
    else:
        status = f"partial: tune {done_tune}/{n_tune} runs, test {done_test}/{n_test} runs"
    cal_rows = [runner.recorded({"split": "tune", "method": "baseline", "multiplier": None,
                                 "seed": protocol["tuning"]["seed"], "iters": c["iters"]}) or {}
                for c in state["calibration"]]
    settings = {
        "protocol": protocol["file"], "protocol_sha256": protocol["sha256"],
        "status": status, "calibration": state["calibration"], "choices": state["choices"],
        "headroom": state.get("headroom"),
        # a restored entry stands for the invocations whose total it carries (restore_work)
        "invocations": sum(c.get("invocations", 1) for c in calls),
        "wall_minutes_all_invocations": round(sum(c["wall_s"] for c in calls) / 60, 1),
        "jobs": runner.jobs, "cost": _cost(protocol, runner.work, model_gflops_of),
    }
    infer = {}
    for who, rs in (("teacher", [state.get("teacher") or {}]),
                    ("baseline student", [r for r in test if r["method"] == "baseline"])):
        times = [r["infer_s_per_image"] for r in rs if r.get("infer_s_per_image")]
        if times:
            infer[who] = 1000 * sorted(times)[len(times) // 2]
    settings["infer_ms"] = infer
    rows = [*cal_rows, *[r for r in state["tune"][1:] if r], *[r for r in state.get("auto") or []],
            *([state["teacher"]] if state.get("teacher") else []), *test]
    md = markdown(protocol, state, {**settings, "calibration_rows": cal_rows}, table)
    write_results(out, "accuracy_v2", {**settings, "summary": table}, rows, md, commit)
    payload = json.loads((out / "results.json").read_text())
    payload["protocol"] = protocol["file"]
    from tbd.checkpoint import atomic_write_text

    atomic_write_text(str(out / "results.json"), json.dumps(payload, indent=2))
    if table:
        plot_test(table, (state.get("teacher") or {}).get("AP"), protocol["reference"],
                  out / "accuracy_v2.png")
    curves = curve_rows(protocol, state) or cal_rows[-1:]
    if curves and any(r.get("curve") for r in curves):
        plot_curves(curves, out / "curves.png")
