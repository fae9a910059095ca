"""What the benchmarks read from a run's files: its final metrics and step time
(``metrics.json``), the evaluator's inference time and a divergence (its log)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def last_eval(metrics_json: Path) -> dict:
    """Final bbox metrics and the median s/iter from a run's metrics.json."""
    records = [json.loads(x) for x in metrics_json.read_text().splitlines() if x.strip()]
    evals = [r for r in records if "bbox/AP" in r]
    times = [r["time"] for r in records if "time" in r]
    res = {k: evals[-1].get(f"bbox/{k}") for k in METRICS} if evals else {}
    res = {k: (None if v is None or v != v else float(v)) for k, v in res.items()}
    res["train_s_per_iter"] = statistics.median(times) if times else None
    return res


INFER_TIME = re.compile(r"Total inference pure compute time: .*?\(([\d.]+) s / iter per device")


def infer_time(log: Path) -> float | None:
    """The last inference time Detectron2's evaluator logged in ``log``, in s per image.

    Its "pure compute time" (model forward and post-processing, no data loading, first 5 images
    excluded) per iteration of the test loader, whose batch is 1 image.
    """
    hits = INFER_TIME.findall(log.read_text()) if log.is_file() else []
    return float(hits[-1]) if hits else None


DIVERGED = re.compile(r"^FloatingPointError: (.*)$", re.M)


def divergence(log: Path) -> str | None:
    """Why a training run stopped on a non-finite loss, from its log, or None.

    Detectron2's trainer and DistillMetaArch raise ``FloatingPointError`` when a loss becomes
    inf/NaN. With a fixed seed that is a result of the settings (it recurs on a rerun), so the
    benchmark records it as the run's outcome; any other failure (a bad option, a killed process)
    stops the benchmark instead.
    """
    hits = DIVERGED.findall(log.read_text()) if log.is_file() else []
    return hits[-1] if hits else None
