#!/usr/bin/env python
"""Accuracy benchmark v2: converged students, a tune split for every choice, a test split for the
report, equal tuning per distiller, paired seeds.

    .venv/bin/python projects/TBD/benchmarks/accuracy_v2.py \\
        --protocol projects/TBD/benchmarks/protocols/accuracy_v2_cpu_t16k.yaml --jobs 2

Everything the benchmark decides is in its protocol file (committed before the main runs; its
sha256 is recorded in every result): the pair, the splits, the schedule, the tuning grid, the
seeds, the failure rule and the statistics.

1. Calibration: the baseline student on the schedule, evaluated on ``tune`` at
   ``schedule.eval_points`` checkpoints; the schedule passes when the last quarter gains less than
   ``calibration.max_last_quarter_gain`` AP, else the next ``calibration.ladder`` entry is tried.
   Then the headroom gate (``headroom``): the teacher's AP on ``tune`` minus the calibrated
   baseline's must reach ``headroom.min_ap``. No other run starts before both pass
   (``--phase calibrate`` stops here).
2. Tuning: each distiller once per loss-weight multiplier (the tune seed), evaluated on
   ``tune``; its choice is frozen in ``choices.json`` before any of its test runs.
3. Test: the teacher and every method at its choice, every test seed, evaluated once on ``test``
   (with the harmony analysis). ``--phase tune`` stops before this step: an investigation
   profile (several settings of one method, one tune run each) never reads ``test``.

Tuning and test runs go in the order of ``stages``: TBD's tune runs and the baseline's test runs,
then TBD's test runs and the next method's tune runs, and so on, so the first answer comes early
and each method's row completes in turn. A run waits only for the runs it needs (a method's test
runs for its tune runs), never for the end of a stage: a free worker takes the first run that
can start.

Every run is a ``train_net.py`` subprocess in ``--work-dir`` with periodic checkpoints: an
interrupted run resumes from its last checkpoint (``--resume``, exact), finished runs are kept
(one json each) and skipped, so the benchmark continues across sittings. ``results.json``,
``results.md`` and the charts in ``--output`` are rewritten after every finished run and say
whether the table is complete. ``--phase report`` only rewrites them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import yaml
from tqdm import tqdm

from tbd_benchmarks.accuracy_v2_stats import calibration_verdict, choose_multiplier
from tbd_benchmarks.common import (
    ROOT,
    cpu_name,
    eval_bbox,
    git_commit,
    log_beside,
    model_gflops,
    run_logged,
)
from tbd_benchmarks.logs import METRICS, divergence, infer_time, last_eval

logger = logging.getLogger(__name__)

REQUIRED = {
    "name": str, "claim": bool, "teacher": dict, "student": dict, "splits": dict,
    "schedule": dict, "calibration": dict, "tuning": dict, "methods": list, "reference": str,
    "test": dict, "failure": dict, "statistics": dict, "deviations": list,
}
SUBKEYS = {
    "teacher": ["config", "weights"], "student": ["config", "distill_architecture"],
    "splits": ["train", "tune", "test"],
    "schedule": ["iters", "lr_step", "gamma", "warmup_iters", "eval_points"],
    "calibration": ["ladder", "max_last_quarter_gain"], "tuning": ["seed", "multipliers", "tie_ap"],
    "test": ["seeds"], "failure": ["stalled_below"], "statistics": ["confidence"],
}


class ProtocolError(ValueError):
    """A protocol file that cannot be run; the message names the file and the key."""


class StopRequested(Exception):
    """A ``STOP`` file in the work dir: the runs in progress finish, no other starts."""


def load_protocol(path: str | os.PathLike) -> dict:
    """The protocol file, checked: every key the benchmark reads exists with the right type."""
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"--protocol {path}: no such file.")
    p = yaml.safe_load(path.read_text()) or {}
    for key, kind in REQUIRED.items():
        if not isinstance(p.get(key), kind):
            raise ProtocolError(f"{path}: key {key!r} is missing or not a {kind.__name__}.")
    for key, subs in SUBKEYS.items():
        for sub in subs:
            if sub not in p[key]:
                raise ProtocolError(f"{path}: key {key}.{sub} is missing.")
    names = [m.get("name") for m in p["methods"]]
    if "baseline" not in names or p["reference"] not in names:
        raise ProtocolError(f"{path}: methods must include 'baseline' and the reference "
                            f"{p['reference']!r}; got {names}.")
    if len(set(names)) != len(names):
        raise ProtocolError(f"{path}: methods has repeated names {names}.")
    for m in p["methods"]:
        if not isinstance(m.get("losses"), list) or (m["name"] == "baseline") != (not m["losses"]):
            raise ProtocolError(f"{path}: methods entry {m!r}: 'losses' must be a list, empty "
                                "for the baseline only.")
    if p["schedule"]["iters"] != p["calibration"]["ladder"][0]:
        raise ProtocolError(f"{path}: schedule.iters ({p['schedule']['iters']}) must be the first "
                            f"calibration.ladder entry ({p['calibration']['ladder']}).")
    if "headroom" in p and not isinstance((p["headroom"] or {}).get("min_ap"), (int, float)):
        raise ProtocolError(f"{path}: key headroom.min_ap must be a number (AP points).")
    if not isinstance(p.get("auto_weight_check", False), bool):
        raise ProtocolError(f"{path}: key 'auto_weight_check' must be true or false.")
    if not isinstance(p.get("auto_weight_opts", []), list) or len(p.get("auto_weight_opts",
                                                                        [])) % 2:
        raise ProtocolError(f"{path}: key 'auto_weight_opts' must be a list of KEY VALUE pairs.")
    if 1.0 not in [float(x) for x in p["tuning"]["multipliers"]]:
        raise ProtocolError(f"{path}: tuning.multipliers must include 1.0 (the published "
                            "weights, the sweep's centre).")
    for split in p["splits"].values():
        _check_dataset(path, split)
    for what in ("config", "weights"):
        if not (ROOT / p["teacher"][what]).is_file():
            raise ProtocolError(f"{path}: teacher.{what} {p['teacher'][what]} does not exist.")
    if p["teacher"].get("sha256_file"):  # the registered teacher, not another file of its name
        from tbd.checkpoint.io import sha256_file

        expected = (ROOT / p["teacher"]["sha256_file"]).read_text().strip()
        if sha256_file(ROOT / p["teacher"]["weights"]) != expected:
            raise ProtocolError(f"{path}: teacher.weights {p['teacher']['weights']} does not "
                                f"match the sha256 in {p['teacher']['sha256_file']}: not the "
                                "registered teacher.")
    p["file"] = str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) \
        else str(path)
    p["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    if "baseline_from" in p:
        p["baseline_from"] = _baseline_source(path, p)
    return p


# what makes a baseline run the same run under two protocols (the baseline never sees a teacher)
BASELINE_KEYS = ("student", "splits", "schedule", "calibration")


def _baseline_source(path: Path, p: dict) -> dict:
    """The protocol named by ``baseline_from``, checked to train the same baseline runs: the
    same student, splits, schedule, calibration and tune seed, and a baseline row without other
    options. Its recorded baseline runs are then read instead of trained again."""
    if not isinstance(p["baseline_from"], str):
        raise ProtocolError(f"{path}: key 'baseline_from' must be the path of a protocol file.")
    other_path = ROOT / p["baseline_from"]
    if other_path.resolve() == path.resolve():
        raise ProtocolError(f"{path}: key 'baseline_from' names this file itself.")
    try:
        other = load_protocol(other_path)
    except ProtocolError as e:
        raise ProtocolError(f"{path}: key 'baseline_from': {e}") from e
    pairs = [(k, p[k], other[k]) for k in BASELINE_KEYS] + [
        ("tuning.seed", p["tuning"]["seed"], other["tuning"]["seed"]),
        ("methods (baseline)", method_of(p, "baseline"), method_of(other, "baseline"))]
    for key, mine, theirs in pairs:
        if mine != theirs:
            raise ProtocolError(f"{path}: key 'baseline_from' ({p['baseline_from']}): {key} "
                                f"differs ({mine!r} here, {theirs!r} there), so its baseline runs "
                                "are not this file's; remove the key to train them.")
    return {"file": other["file"], "sha256": other["sha256"], "name": other["name"]}


def _check_dataset(path: Path, name: str) -> None:
    from tbd.data import register_default_shapes

    register_default_shapes()
    from detectron2.data import DatasetCatalog

    if name not in DatasetCatalog.list():
        raise ProtocolError(f"{path}: split {name!r} is not a registered dataset.")


# ----------------------------------------------------------------------------------- the runs
def method_of(protocol: dict, name: str) -> dict:
    return next(m for m in protocol["methods"] if m["name"] == name)


def weight_opts(protocol: dict, losses: list[str], multiplier: float) -> list[str]:
    """KEY VALUE options that multiply every loss weight of the distillers ``losses`` (their
    ``loss_keys``) by ``multiplier``, from the values the student config gives them."""
    from tbd.config import load_config
    from tbd.distillers import registered_distillers
    from tbd.distillers.registry import config_value

    cfg = load_config(str(ROOT / protocol["student"]["config"]))
    classes = registered_distillers()
    opts = []
    for name in losses:
        for key in sorted(set(classes[name].loss_keys.values())):
            opts += [key, repr(float(config_value(cfg, key)) * multiplier)]
    return opts


def schedule_opts(protocol: dict, iters: int, split: str, curve: bool) -> list[str]:
    s = protocol["schedule"]
    period = iters // s["eval_points"]
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * s['lr_step'])},)",
            "SOLVER.GAMMA", str(s["gamma"]), "SOLVER.WARMUP_ITERS", str(s["warmup_iters"]),
            # periodic checkpoints: an interrupted run resumes from the last one
            "SOLVER.CHECKPOINT_PERIOD", str(period), "SOLVER.CHECKPOINT_MAX_TO_KEEP", "1",
            "TEST.EVAL_PERIOD", str(period if curve else 0),
            "DATASETS.TRAIN", f"('{protocol['splits']['train']}',)",
            "DATASETS.TEST", f"('{protocol['splits'][split]}',)"]


def run_name(spec: dict) -> str:
    mult = "_auto" if spec.get("auto") else \
        "" if spec["multiplier"] is None else f"_x{spec['multiplier']:g}"
    return f"{spec['split']}_{spec['method']}{mult}_s{spec['seed']}_i{spec['iters']}"


def train_opts(protocol: dict, spec: dict, out: Path) -> list[str]:
    opts = ["SEED", str(spec["seed"]),
            *schedule_opts(protocol, spec["iters"], spec["split"], spec["split"] == "tune"),
            "OUTPUT_DIR", str(out)]
    losses = method_of(protocol, spec["method"])["losses"]
    if losses:
        opts += ["MODEL.META_ARCHITECTURE", protocol["student"]["distill_architecture"],
                 "MODEL.DISTILL.LOSSES", repr(list(losses)),
                 "MODEL.DISTILL.TEACHER.CONFIG", protocol["teacher"]["config"],
                 "MODEL.DISTILL.TEACHER.WEIGHTS", protocol["teacher"]["weights"]]
        if spec.get("auto"):  # the published weights, then scaled to the default targets
            opts += ["MODEL.DISTILL.AUTO_WEIGHT.ENABLED", "True",
                     *[str(x) for x in protocol.get("auto_weight_opts", [])]]
        else:
            opts += weight_opts(protocol, losses, spec["multiplier"])
        if "teacher_min_ap" in protocol:
            opts += ["MODEL.DISTILL.TEACHER.EVAL_MIN_AP", str(protocol["teacher_min_ap"])]
    return opts + [str(x) for x in method_of(protocol, spec["method"]).get("opts", [])]


def curve_of(metrics_json: Path, max_iter: int) -> list[dict]:
    """Every evaluation of a run: [{"iter": iterations trained, "AP": ...}].

    Detectron2 records a periodic evaluation at the index of the iteration it follows (``k *
    period - 1``) and the final one at ``max_iter``, hence the ``min``. An evaluation period
    shorter than the metrics writer's (20) would lose evaluations: only the latest value of a
    key reaches metrics.json. A resumed run appends to the same file; an iteration evaluated
    twice keeps its last value.
    """
    out: dict[int, float] = {}
    for line in metrics_json.read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if "bbox/AP" in r:
            out[min(r["iteration"] + 1, max_iter)] = r["bbox/AP"]
    return [{"iter": i, "AP": ap} for i, ap in sorted(out.items())]


def auto_scales(metrics_json: Path) -> dict[str, float]:
    """The scales ``MODEL.DISTILL.AUTO_WEIGHT`` chose, per distiller (their last logged value)."""
    out = {}
    for line in metrics_json.read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        out.update({k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("auto_weight/")})
    return out


def analyze_harmony(split: str, config: str, weights: str, out: Path, opts: list[str] = (),
                    env: Optional[dict] = None) -> dict:
    """``tools/analyze_harmony.py`` on a model and ``split``, logged beside ``out``: the values of
    the ``harmony.json`` it writes there."""
    run_logged([sys.executable, "projects/TBD/tools/analyze_harmony.py", "--config-file", config,
                "--dataset", split, "--output", str(out), *opts, "MODEL.WEIGHTS", weights],
               log_beside(out), env)
    return json.loads((out / "harmony.json").read_text())


class Group(NamedTuple):
    """Runs (``specs()``) that may start once the runs ``after`` are recorded."""

    after: list[dict]
    specs: Callable[[], list[dict]]


class Runner:
    """Runs (or reads) the protocol's runs in ``work``; ``jobs`` at a time."""

    def __init__(self, protocol: dict, work: Path, jobs: int,
                 baseline_work: Optional[Path] = None, teacher_cache_mb: float = 0.0):
        self.p, self.work, self.jobs = protocol, work, jobs
        # a speed option, not part of the protocol: the same training (tests/test_teacher_cache)
        self.teacher_cache_mb = teacher_cache_mb
        self.env = {"OMP_NUM_THREADS": "1"} if jobs > 1 else {}
        # where the baseline runs of ``baseline_from`` are recorded (default: its work dir)
        source = protocol.get("baseline_from")
        self.baseline_work = None if source is None else \
            baseline_work or ROOT / "output/benchmarks" / source["name"]
        work.mkdir(parents=True, exist_ok=True)

    def recorded(self, spec: dict) -> Optional[dict]:
        path = self.work / f"{run_name(spec)}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def train(self, spec: dict) -> dict:
        row = self.recorded(spec) or self.shared_baseline(spec)
        if row is not None:
            return row
        if (self.work / "STOP").exists():
            raise StopRequested(run_name(spec))
        name, cfg = run_name(spec), str(ROOT / self.p["student"]["config"])
        out, log = self.work / name, self.work / f"{name}.log"
        resume = (out / "last_checkpoint").is_file()
        cache = self.teacher_cache_mb if method_of(self.p, spec["method"])["losses"] else 0.0
        cmd = [sys.executable, "projects/TBD/train_net.py", "--config-file", cfg,
               *(["--resume"] if resume else []), *train_opts(self.p, spec, out),
               *(["MODEL.DISTILL.TEACHER.CACHE_MB", str(cache)] if cache else [])]
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {'resuming' if resume else 'training'} {name}",
              flush=True)
        if resume and log.is_file():  # keep the interrupted part's log
            log.rename(self.work / f"{name}.log.{int(t0)}")
        try:
            run_logged(cmd, log, self.env)
        except RuntimeError:
            reason = divergence(log)
            if reason is None:
                raise
            print(f"[{time.strftime('%H:%M:%S')}] {name} diverged: {reason}", flush=True)
            row = {**spec, "failed": reason, "wall_s": round(time.time() - t0, 1)}
            self._write(spec, row)
            return row
        extra = {"auto_scales": auto_scales(out / "metrics.json")} if spec.get("auto") else {}
        row = {**spec, **extra, **last_eval(out / "metrics.json"),
               "curve": curve_of(out / "metrics.json", spec["iters"]),
               "infer_s_per_image": infer_time(log), "resumed": resume,
               # a profile that spans sittings may span machines: its times are per machine
               "cpu": cpu_name(), **({"teacher_cache_mb": cache} if cache else {})}
        if spec["split"] == "test":
            row.update(self.harmony(cfg, str(out / "model_final.pth"), self.work / f"{name}_h",
                                    train_opts(self.p, spec, out)))
        row["wall_s"] = round(time.time() - t0, 1)
        self._write(spec, row)
        return row

    def shared_baseline(self, spec: dict) -> Optional[dict]:
        """A baseline run recorded under ``baseline_from`` (the same run: load_protocol checked
        it), copied into this work dir with its origin; None when there is none."""
        if self.baseline_work is None or spec["method"] != "baseline":
            return None
        src = self.baseline_work / f"{run_name(spec)}.json"
        if not src.is_file():
            return None
        row = {**json.loads(src.read_text()), "copied_from": self.p["baseline_from"]["file"]}
        print(f"[{time.strftime('%H:%M:%S')}] {run_name(spec)}: read from {src}", flush=True)
        self._write(spec, row)
        return row

    def _write(self, spec: dict, row: dict) -> None:
        from tbd.checkpoint import atomic_write_text

        atomic_write_text(str(self.work / f"{run_name(spec)}.json"), json.dumps(row, indent=2))

    def harmony(self, config: str, weights: str, out: Path, opts: list[str]) -> dict:
        """The harmony analysis of a model on the test split (harmonious %, Spearman)."""
        h = analyze_harmony(self.p["splits"]["test"], config, weights, out, opts, self.env)
        return {k: h[k] for k in ("harmonious_proportion", "score_iou_spearman")}

    def _teacher_row(self, split: str, extra=lambda row: {}) -> dict:
        """The teacher evaluated on ``split``, once (recorded like a run); ``extra(row)`` adds
        keys to a new row before it is written."""
        spec = {"split": split, "method": "teacher", "multiplier": None, "seed": 0, "iters": 0}
        row = self.recorded(spec)
        if row is None:
            t, log = self.p["teacher"], self.work / f"{split}_teacher.log"
            res = eval_bbox(t["config"], t["weights"], self.p["splits"][split],
                            self.work / f"{split}_teacher", log, self.env)
            row = {**spec, **{k: res.get(k) for k in METRICS}}
            row.update(extra(row))
            self._write(spec, row)
        return row

    def teacher(self) -> dict:
        """The teacher on ``test`` (AP, inference time and harmony), once."""
        t = self.p["teacher"]
        return self._teacher_row("test", lambda row: {
            "infer_s_per_image": infer_time(self.work / "test_teacher.log"),
            **self.harmony(t["config"], t["weights"], self.work / "test_teacher_h", [])})

    def headroom(self, iters: int) -> Optional[dict]:
        """The protocol's ``headroom`` check on ``tune``: teacher AP minus the calibrated
        baseline's final AP, at least ``headroom.min_ap`` (the teacher is evaluated once). None
        when the protocol has no such key."""
        if "headroom" not in self.p:
            return None
        row = self._teacher_row("tune")
        base = self.recorded(calibration_spec(self.p, iters))["AP"]
        gap, need = row["AP"] - base, self.p["headroom"]["min_ap"]
        return {"teacher_AP": row["AP"], "baseline_AP": base, "gap": gap, "min_ap": need,
                "passed": gap >= need}

    def train_all(self, specs: list[dict], on_done: Callable[[], None]) -> list[dict]:
        """Train ``specs`` (recorded ones are read first), ``on_done()`` after each."""
        rows = self.train_groups([Group([], lambda: specs)], on_done)
        return [rows[run_name(s)] for s in specs]

    def train_groups(self, groups: list[Group], on_done: Callable[[], None]) -> dict[str, dict]:
        """Train the groups' runs ``jobs`` at a time; return every row by run name.

        A group's runs are queued once the runs in its ``after`` are recorded (``specs()`` is
        called then: it may freeze a choice), and a free worker takes the first queued run in
        the groups' order. So no worker waits for a stage to end while another run of it
        trains: a run that depends on nothing unfinished takes the worker. After a failed run
        or a ``STOP`` file, the runs in progress finish and no other starts.
        """
        rows: dict[str, dict] = {}
        waiting = list(range(len(groups)))
        queue: list[tuple[int, int, dict]] = []  # (group, position in it, spec)
        running: dict[Future, dict] = {}
        errors: list[tuple[str, BaseException]] = []
        stopped = False
        bar = tqdm(total=0, desc="Runs", disable=None)

        def release() -> None:
            for g in list(waiting):
                if all(run_name(s) in rows or self.recorded(s) for s in groups[g].after):
                    waiting.remove(g)
                    for k, spec in enumerate(groups[g].specs()):
                        if (row := self.recorded(spec)) is not None:
                            rows[run_name(spec)] = row
                        else:
                            queue.append((g, k, spec))
                            bar.total += 1
            queue.sort(key=lambda item: item[:2])
            bar.refresh()

        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            while True:
                release()
                while queue and len(running) < self.jobs and not (errors or stopped):
                    spec = queue.pop(0)[2]
                    running[pool.submit(self.train, spec)] = spec
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    spec = running.pop(fut)
                    try:
                        rows[run_name(spec)] = fut.result()
                    except StopRequested:
                        stopped = True
                        continue
                    except Exception as e:  # noqa: BLE001 - record the rest, start no more
                        errors.append((run_name(spec), e))
                        on_done()
                        continue
                    bar.update()
                    on_done()
        bar.close()
        if errors:
            raise RuntimeError(f"{len(errors)} run(s) failed: {[n for n, _ in errors]}; see their "
                               f"logs in {self.work}") from errors[0][1]
        if stopped:
            raise StopRequested(str(self.work / "STOP"))
        if waiting or queue:  # a group after runs that no group trains: a bug, not a stop
            raise RuntimeError(f"runs never started: groups {waiting} wait for runs no group has")
        return rows


def restore_work(work: Path, results: Path, protocol: dict) -> list[str]:
    """Put the runs that a committed ``results.json`` records back into ``work``; return their
    names.

    The work dir (checkpoints, logs, one json per run) is not committed, so a fresh clone, or a
    machine whose scratch space was wiped, has none of it, while the committed results hold every
    finished run's full row. Without this the runner would train those runs again (hours each).
    A run already in ``work`` is left as it is; the frozen choices (``choices.json``) and the
    earlier invocations' wall time come back too. Only from results written under this very
    protocol file (its sha256), and before anything is trained: results of another version would
    be other runs (a warning says so, and they are trained again). A run that was interrupted is
    not in the results; it starts again."""
    if not results.is_file():
        return []
    payload = json.loads(results.read_text())
    settings = payload.get("settings", {})
    missing = [r for r in payload.get("rows", []) if not (work / f"{run_name(r)}.json").is_file()]
    if not missing:
        return []
    if settings.get("protocol_sha256") != protocol["sha256"]:
        logger.warning(
            "%s: written under another version of %s (sha256 %s; the file's is now %s): its %d "
            "run(s) are not restored into %s, so they are trained again (a work dir that holds "
            "them is read instead: --work-dir).", results, protocol["file"],
            settings.get("protocol_sha256"), protocol["sha256"], len(missing), work)
        return []
    from tbd.checkpoint import atomic_write_text

    work.mkdir(parents=True, exist_ok=True)
    for row in missing:
        atomic_write_text(str(work / f"{run_name(row)}.json"),
                          json.dumps({**row, "restored_from": str(results.relative_to(ROOT))
                                      if results.is_relative_to(ROOT) else str(results)},
                                     indent=2))
    if settings.get("choices") and not (work / "choices.json").is_file():
        atomic_write_text(str(work / "choices.json"), json.dumps(settings["choices"], indent=2))
    calls = work / "invocations.json"
    if not calls.is_file() and settings.get("invocations"):
        # the results keep the total, not each invocation: one entry that stands for them all
        atomic_write_text(str(calls), json.dumps([{
            "started": f"restored from results.json of {payload.get('date')}",
            "wall_s": round(60 * settings["wall_minutes_all_invocations"], 1),
            "rows_restored": len(payload["rows"]),
            "commit": payload.get("git_commit"), "invocations": settings["invocations"]}],
            indent=2))
    return [run_name(r) for r in missing]


# --------------------------------------------------------------------------------- the phases
def calibration_spec(protocol: dict, iters: int) -> dict:
    return {"split": "tune", "method": "baseline", "multiplier": None,
            "seed": protocol["tuning"]["seed"], "iters": iters}


def tune_specs(protocol: dict, iters: int, methods: Optional[list[str]] = None) -> list[dict]:
    """The tune runs of ``methods`` (default: every distilled method), multiplier-major: every
    x1 run comes before any other multiplier's."""
    mults = sorted(protocol["tuning"]["multipliers"], key=lambda m: (m != 1.0, m))
    names = methods or [m["name"] for m in protocol["methods"] if m["losses"]]
    return [{"split": "tune", "method": m, "multiplier": float(x),
             "seed": protocol["tuning"]["seed"], "iters": iters} for x in mults for m in names]


def test_specs(protocol: dict, iters: int, choices: dict[str, float],
               methods: Optional[list[str]] = None) -> list[dict]:
    """The test runs of ``methods`` (default: all) at their chosen multipliers, seed-major:
    every method's seed-0 run comes before any seed-1 run."""
    names = methods or [m["name"] for m in protocol["methods"]]
    return [{"split": "test", "method": m, "seed": s, "iters": iters,
             "multiplier": None if not method_of(protocol, m)["losses"] else choices[m]}
            for s in protocol["test"]["seeds"] for m in names]


def auto_specs(protocol: dict, iters: int, methods: list[str]) -> list[dict]:
    """One tune run per method with ``MODEL.DISTILL.AUTO_WEIGHT`` on (``auto_weight_check``)."""
    return [{"split": "tune", "method": m, "multiplier": None, "auto": True,
             "seed": protocol["tuning"]["seed"], "iters": iters} for m in methods]


def stages(protocol: dict) -> list[list[tuple[str, str]]]:
    """The order of the main runs, as stages of ("tune" | "test", method); a stage's runs
    depend only on earlier stages. A free worker takes the first run, in this order, whose
    dependencies are recorded (``groups``): no stage waits for the end of the one before.

    The first distilled method (TBD) is tuned beside the baseline's test runs (they need no
    choice), then its test runs give the first answer while the next method is tuned, and so on:
    each method's row completes in turn. A method's choice depends only on its own tune runs, so
    freezing it before the other methods are tuned changes nothing. The automatic-weight runs
    (``auto_weight_check``) come last: they answer a side question and choose nothing.
    """
    distilled = [m["name"] for m in protocol["methods"] if m["losses"]]
    out = [[("tune", distilled[0]), ("test", "baseline")]]
    for i, m in enumerate(distilled):
        stage = [("test", m)]
        if i + 1 < len(distilled):
            stage.append(("tune", distilled[i + 1]))
        out.append(stage)
    if protocol.get("auto_weight_check"):
        out.append([("auto", m) for m in distilled])
    return out


def groups(protocol: dict, iters: int, choices: dict[str, float],
           freeze: Callable[[str], None]) -> list[Group]:
    """The main runs as ``Runner.train_groups`` groups, in ``stages`` order: a method's tune
    runs depend on nothing; its test runs on its tune runs, and freeze its choice (``freeze``,
    which writes it into ``choices``) before they are made; the automatic-weight runs on
    nothing. A run waits only for what it needs, so a worker that a stage's last run leaves
    free takes the next stage's first run."""
    def test_group(method: str) -> Group:
        if method == "baseline":
            return Group([], lambda: test_specs(protocol, iters, choices, [method]))

        def specs() -> list[dict]:
            freeze(method)
            return test_specs(protocol, iters, choices, [method])

        return Group(tune_specs(protocol, iters, [method]), specs)

    out = []
    for stage in stages(protocol):
        for kind, m in stage:
            if kind == "tune":
                out.append(Group([], lambda m=m: tune_specs(protocol, iters, [m])))
            elif kind == "test":
                out.append(test_group(m))
            else:
                out.append(Group([], lambda m=m: auto_specs(protocol, iters, [m])))
    return out


def choices_of(protocol: dict, tune_rows: list[dict],
               methods: Optional[list[str]] = None) -> dict:
    """The chosen multiplier of each distiller in ``methods`` (default: all) from its tune runs
    (failed runs are never chosen); ``tune_rows`` holds the baseline's tune run and theirs."""
    base = [r for r in tune_rows if r["method"] == "baseline" and r.get("AP") is not None]
    floor = protocol["failure"]["stalled_below"] * base[0]["AP"] if base else None
    out = {}
    for m in protocol["methods"]:
        if not m["losses"] or (methods is not None and m["name"] not in methods):
            continue
        res = {r["multiplier"]: (None if r.get("failed") or r.get("AP") is None
                                 or (floor is not None and r["AP"] < floor) else r["AP"])
               for r in tune_rows if r["method"] == m["name"] and not r.get("auto")}
        out[m["name"]] = choose_multiplier(res, protocol["tuning"]["tie_ap"])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--protocol", required=True, help="the pre-registered protocol file (yaml)")
    p.add_argument("--phase", choices=["calibrate", "tune", "all", "report"], default="all",
                   help="'calibrate': only the schedule check; 'tune': the calibration and "
                   "every tune run, nothing on test (an investigation profile); 'all' (default): "
                   "every run; 'report': only rewrite the results from the recorded runs")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each then gets "
                   "OMP_NUM_THREADS=1)")
    p.add_argument("--output", default=None, help="results folder (committed); default "
                   "projects/TBD/benchmarks/results/<protocol name>")
    p.add_argument("--work-dir", default=None, help="runs, logs, checkpoints (not committed); "
                   "default output/benchmarks/<protocol name>")
    p.add_argument("--baseline-work-dir", default=None, help="with a protocol's "
                   "'baseline_from': the work dir of that protocol (default "
                   "output/benchmarks/<its name>)")
    p.add_argument("--teacher-cache-mb", type=float, default=0.0, help="distilled runs keep "
                   "the teacher's outputs per training input, up to this many MB each "
                   "(MODEL.DISTILL.TEACHER.CACHE_MB): faster, the same training; recorded in "
                   "each run's row. Default 0: off")
    args = p.parse_args(argv)
    try:
        protocol = load_protocol(args.protocol)
    except ProtocolError as e:
        sys.exit(str(e))
    try:
        _main(args, protocol)
    except StopRequested:
        print(f"[{time.strftime('%H:%M:%S')}] stopped: the work dir has a STOP file (the runs in "
              "progress were finished and recorded, no other was started); delete it and run "
              "the same command to continue.", flush=True)


def _main(args, protocol: dict) -> None:
    name = protocol["name"]
    out = Path(args.output or ROOT / "projects/TBD/benchmarks/results" / name)
    runner = Runner(protocol, Path(args.work_dir or ROOT / "output/benchmarks" / name), args.jobs,
                    Path(args.baseline_work_dir) if args.baseline_work_dir else None,
                    args.teacher_cache_mb)
    from tbd_benchmarks.accuracy import record_invocation
    from tbd_benchmarks.accuracy_v2_report import write_report

    sources = [(runner.work, out / "results.json", protocol)]
    if runner.baseline_work is not None:  # and the shared baseline runs, from their own results
        source = protocol["baseline_from"]
        sources.append((runner.baseline_work, ROOT / "projects/TBD/benchmarks/results"
                        / source["name"] / "results.json", source))
    for work, results, owner in sources:
        if restored := restore_work(work, results, owner):
            print(f"restored {len(restored)} finished run(s) from {results} into {work}: "
                  f"{', '.join(restored)}", flush=True)

    t0, started, commit = time.time(), time.strftime("%Y-%m-%dT%H:%M:%S"), git_commit()
    state: dict = {"calibration": [], "tune": [], "test": [], "teacher": None, "choices": None,
                   "auto": [], "headroom": None}

    def report() -> None:
        calls = record_invocation(runner.work, started, time.time() - t0,
                                  sum(len(state[k]) for k in ("tune", "test")), commit)
        write_report(out, protocol, state, runner, calls, commit,
                     model_gflops_of=lambda c: model_gflops(c, 64))

    # 1. calibration: the first schedule of the ladder whose baseline curve is flat
    iters = None
    for n in protocol["calibration"]["ladder"]:
        spec = calibration_spec(protocol, n)
        row = runner.recorded(spec)
        if row is None and args.phase == "report":
            break
        row = row or runner.train(spec)
        verdict = calibration_verdict(row.get("curve", []), n,
                                      protocol["calibration"]["max_last_quarter_gain"])
        state["calibration"].append({**verdict, "run": run_name(spec)})
        report()
        if verdict["converged"]:
            iters = n
            break
    if iters is None:
        report()
        msg = ("no schedule of calibration.ladder passed the convergence check: no main runs"
               if len(state["calibration"]) == len(protocol["calibration"]["ladder"]) else
               "the calibration is not complete")
        print(f"{msg}; results in {out}", flush=True)
        return
    # the headroom gate: the teacher on `tune` against the calibrated baseline (evaluated once;
    # --phase report reads it only when recorded)
    if args.phase != "report" or runner.recorded(
            {"split": "tune", "method": "teacher", "multiplier": None, "seed": 0, "iters": 0}):
        state["headroom"] = runner.headroom(iters)
    if state["headroom"] is not None and not state["headroom"]["passed"]:
        report()
        print(f"headroom check failed ({state['headroom']}): no main runs; results in {out}",
              flush=True)
        return
    if args.phase == "calibrate":
        report()
        return

    # 2 and 3: per method its tune runs, its frozen choice, its test runs (``stages``)
    base_row = runner.recorded(calibration_spec(protocol, iters))
    all_tune = tune_specs(protocol, iters)
    choices_path = runner.work / "choices.json"
    choices = json.loads(choices_path.read_text()) if choices_path.is_file() else {}

    def refresh() -> None:
        state["tune"] = [base_row] + [r for s in all_tune if (r := runner.recorded(s))]
        state["choices"] = dict(choices)
        tested = [m for m in methods if m == "baseline" or m in choices]
        state["test"] = [r for s in test_specs(protocol, iters, choices, tested)
                         if (r := runner.recorded(s))]
        state["auto"] = [r for s in auto_specs(protocol, iters, distilled)
                         if (r := runner.recorded(s))]

    def freeze(method: str) -> None:
        rows = [base_row] + [r for s in tune_specs(protocol, iters, [method])
                             if (r := runner.recorded(s))]
        chosen = choices_of(protocol, rows, [method])[method]
        if choices.get(method, chosen) != chosen:
            sys.exit(f"{choices_path}: the frozen choice of {method} ({choices[method]}) differs "
                     f"from its tune runs' ({chosen}); the work dir was changed by hand.")
        choices[method] = chosen
        choices_path.write_text(json.dumps(choices, indent=2))

    methods = [m["name"] for m in protocol["methods"]]
    distilled = [m for m in methods if method_of(protocol, m)["losses"]]
    state["teacher"] = runner.recorded({"split": "test", "method": "teacher",
                                        "multiplier": None, "seed": 0, "iters": 0})
    refresh()
    if args.phase == "report":
        report()
        return
    if args.phase == "tune":  # the tune runs alone: the test split stays unread
        runner.train_all(all_tune, lambda: (refresh(), report()))
        refresh()
        report()
        return
    state["teacher"] = runner.teacher()
    report()  # the gate's outcome and the teacher's row, before the first main run ends
    runner.train_groups(groups(protocol, iters, choices, freeze), lambda: (refresh(), report()))
    refresh()
    report()


if __name__ == "__main__":
    main()
