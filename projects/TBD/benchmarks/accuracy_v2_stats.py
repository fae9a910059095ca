"""Statistics and decisions of the accuracy benchmark v2, as its protocol file fixes them.

Pure functions of recorded run rows, so that every decision (the schedule check, the tuning
choice, failures, paired differences) can be recomputed from ``results.json`` and is tested by hand
(tests/test_benchmarks_v2.py). scipy provides the distributions.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

from scipy import stats


def last_quarter_gain(curve: list[dict], iters: int) -> Optional[float]:
    """AP at ``iters`` minus AP at the last evaluation at or before 3/4 of ``iters``.

    ``curve``: [{"iter": trained iterations, "AP": ...}] of one run. None when either point is
    missing (a run that stopped early).
    """
    by_iter = {c["iter"]: c["AP"] for c in curve if c.get("AP") is not None}
    early = [i for i in by_iter if i <= 0.75 * iters]
    if iters not in by_iter or not early:
        return None
    return by_iter[iters] - by_iter[max(early)]


def calibration_verdict(curve: list[dict], iters: int, max_gain: float,
                        min_points: int = 5) -> dict:
    """Whether a baseline's tune-split curve shows a converged schedule (protocol
    ``calibration``): at least ``min_points`` evaluations and a last-quarter gain below
    ``max_gain``."""
    gain = last_quarter_gain(curve, iters)
    points = len([c for c in curve if c.get("AP") is not None])
    converged = gain is not None and points >= min_points and gain < max_gain
    return {"iters": iters, "points": points, "last_quarter_gain": gain,
            "max_last_quarter_gain": max_gain, "converged": converged}


def choose_multiplier(results: dict[float, Optional[float]], tie_ap: float) -> float:
    """The tuning choice: the multiplier of highest tune AP (None: a failed run, never chosen).

    Multipliers within ``tie_ap`` of the best tie; among them the one closest to 1 in log scale,
    then the smaller. Raises ValueError when every run failed.
    """
    ok = {m: ap for m, ap in results.items() if ap is not None}
    if not ok:
        raise ValueError(f"every tuning run failed ({sorted(results)}): nothing to choose")
    best = max(ok.values())
    tied = [m for m, ap in ok.items() if ap >= best - tie_ap]
    return min(tied, key=lambda m: (abs(math.log(m)), m))


def status(row: dict, baseline_mean: Optional[float], stalled_below: float) -> str:
    """"diverged" (training stopped on a non-finite loss), "stalled" (final AP below
    ``stalled_below`` x the baseline's mean AP on the same split) or "ok"."""
    if row.get("failed"):
        return "diverged"
    if row.get("AP") is None:
        return "diverged"
    if baseline_mean is not None and row["method"] != "baseline" \
            and row["AP"] < stalled_below * baseline_mean:
        return "stalled"
    return "ok"


def paired_difference(a: dict[int, float], b: dict[int, float], confidence: float) -> dict:
    """Mean of a[seed] - b[seed] over the seeds both have, with its t-interval.

    ``verdict``: "above" / "below" when the interval excludes 0, else "inconclusive" (also with
    fewer than 2 pairs, where no interval exists).
    """
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    out = {"seeds": seeds, "n": len(d), "mean": statistics.mean(d) if d else None,
           "low": None, "high": None, "verdict": "inconclusive"}
    if len(d) >= 2:
        sem = statistics.stdev(d) / math.sqrt(len(d))
        if sem == 0:
            low = high = out["mean"]
        else:
            low, high = stats.t.interval(confidence, len(d) - 1, loc=out["mean"], scale=sem)
        out.update(low=float(low), high=float(high))
        if low > 0:
            out["verdict"] = "above"
        elif high < 0:
            out["verdict"] = "below"
    return out


def failure_interval(failures: int, runs: int, confidence: float) -> tuple[float, float]:
    """Clopper-Pearson interval of a failure rate (scipy's exact binomial interval)."""
    if runs == 0:
        return (0.0, 1.0)
    ci = stats.binomtest(failures, runs).proportion_ci(confidence_level=confidence,
                                                       method="exact")
    return (float(ci.low), float(ci.high))


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(rows: list[dict], methods: list[str], reference: str, stalled_below: float,
              confidence: float, seeds_required: int = 0) -> list[dict]:
    """One line per method from its test rows (``rows``: every run row of the test split).

    Each run's status is set in place. AP with failures counts every run whose AP exists (a
    diverged run has none); AP without failures only the "ok" runs. Paired differences, to
    ``reference`` (``vs_reference``, the protocol's verdict) and to the baseline (``vs_baseline``,
    descriptive), use every run with an AP, failed or not, so that the pairing never drops a seed
    silently. While either side of a comparison has fewer recorded runs than ``seeds_required``
    (the protocol's seeds), its verdict is "pending": an interval over the first seeds is shown,
    never read as the protocol's verdict.
    """
    base = [r["AP"] for r in rows if r["method"] == "baseline" and r.get("AP") is not None]
    base_mean = statistics.mean(base) if base else None
    for r in rows:
        r["status"] = status(r, base_mean, stalled_below)
    by_seed = {m: {r["seed"]: r["AP"] for r in rows if r["method"] == m and r.get("AP") is not None}
               for m in methods}
    complete = {m: sum(r["method"] == m for r in rows) >= seeds_required for m in methods}

    def compare(m: str, other: str) -> dict:
        d = paired_difference(by_seed[m], by_seed.get(other, {}), confidence)
        if not (complete[m] and complete.get(other, False)):
            d.update(verdict="pending", seeds_required=seeds_required)
        return d

    out = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        fails = sum(r["status"] != "ok" for r in mine)
        all_ap = [r["AP"] for r in mine if r.get("AP") is not None]
        ok_ap = [r["AP"] for r in mine if r["status"] == "ok"]
        line = {"method": m, "runs": len(mine), "failures": fails,
                "failure_interval": failure_interval(fails, len(mine), confidence),
                "multiplier": mine[0].get("multiplier")}
        line["AP_mean"], line["AP_std"] = mean_std(all_ap)
        line["AP_mean_ok"], line["AP_std_ok"] = mean_std(ok_ap)
        for k in ("AP50", "AP75", "harmonious_proportion", "score_iou_spearman"):
            line[k] = mean_std([r[k] for r in mine if r.get(k) is not None])[0]
        line["vs_reference"] = None if m == reference else compare(m, reference)
        # Descriptive, beside the registered comparison to ``reference``: does a distiller gain
        # anything over the student trained alone on the converged schedule?
        line["vs_baseline"] = (None if m == "baseline" or "baseline" not in by_seed else
                               compare(m, "baseline"))
        out.append(line)
    return out
