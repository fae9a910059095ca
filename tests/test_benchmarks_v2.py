"""The accuracy benchmark v2: its protocol files, decisions and statistics, checked by hand, and
its runner's bookkeeping (resume, recorded runs, divergences) with a fake ``train_net.py``."""

import json
import math
import threading
import time
from pathlib import Path

import pytest
import yaml

from tbd_benchmarks import accuracy_v2 as v2
from tbd_benchmarks import accuracy_v2_report as rep
from tbd_benchmarks import accuracy_v2_stats as st
from tbd_benchmarks.common import cpu_name

from .conftest import ROOT

PROTOCOLS = ROOT / "projects/TBD/benchmarks/protocols"


def curve(points: dict[int, float]) -> list[dict]:
    return [{"iter": i, "AP": ap} for i, ap in points.items()]


# ----------------------------------------------------------------------------- calibration
def test_last_quarter_gain_reads_the_end_against_three_quarters():
    c = curve({1000: 10.0, 2000: 20.0, 4000: 28.0, 6000: 30.0, 7000: 30.2, 8000: 30.4})
    assert st.last_quarter_gain(c, 8000) == pytest.approx(0.4)  # 30.4 - 30.0 (at 6000)
    # no evaluation exactly at 3/4: the last one before it
    c = curve({1000: 10.0, 5000: 29.0, 7000: 30.0, 8000: 31.0})
    assert st.last_quarter_gain(c, 8000) == pytest.approx(2.0)  # 31 - 29 (at 5000)
    assert st.last_quarter_gain(curve({1000: 1.0, 6000: 2.0}), 8000) is None  # no final point


def test_calibration_verdict_needs_five_points_and_a_flat_last_quarter():
    flat = curve({1000: 5.0, 2000: 15.0, 4000: 25.0, 6000: 30.0, 8000: 30.4})
    assert st.calibration_verdict(flat, 8000, 0.5)["converged"]
    rising = curve({1000: 5.0, 2000: 15.0, 4000: 25.0, 6000: 30.0, 8000: 30.6})
    v = st.calibration_verdict(rising, 8000, 0.5)
    assert not v["converged"] and v["last_quarter_gain"] == pytest.approx(0.6)
    four = curve({2000: 15.0, 4000: 25.0, 6000: 30.0, 8000: 30.1})
    assert not st.calibration_verdict(four, 8000, 0.5)["converged"]


# ------------------------------------------------------------------------------ tuning choice
def test_choose_multiplier_best_then_closest_to_one():
    assert st.choose_multiplier({0.5: 30.0, 1.0: 29.0, 2.0: 28.0}, 0.1) == 0.5
    # 0.5 and 2 are within 0.1 of the best (1.0 is not): equally far from 1, the smaller wins
    assert st.choose_multiplier({0.5: 31.0, 1.0: 30.0, 2.0: 30.95}, 0.1) == 0.5
    # 1.0 within the tie margin of the best: the published weights stay
    assert st.choose_multiplier({0.5: 30.05, 1.0: 30.0, 2.0: 29.0}, 0.1) == 1.0
    # a failed run (None) is never chosen, even if the others are worse
    assert st.choose_multiplier({0.5: None, 1.0: 10.0, 2.0: 11.0}, 0.1) == 2.0
    with pytest.raises(ValueError, match="every tuning run failed"):
        st.choose_multiplier({1.0: None, 2.0: None}, 0.1)


def test_choices_of_never_picks_a_stalled_tune_run():
    protocol = yaml.safe_load((PROTOCOLS / "accuracy_v2_smoke.yaml").read_text())
    protocol["methods"].append({"name": "fgd", "losses": ["FGD"]})
    rows = [{"method": "baseline", "multiplier": None, "AP": 20.0},
            {"method": "tbd", "multiplier": 1.0, "AP": 21.0},
            {"method": "tbd", "multiplier": 2.0, "AP": 9.0},  # below 0.5 x 20: stalled
            {"method": "fgd", "multiplier": 1.0, "failed": "loss is nan"},
            {"method": "fgd", "multiplier": 2.0, "AP": 12.0}]
    assert v2.choices_of(protocol, rows) == {"tbd": 1.0, "fgd": 2.0}
    # one method's choice, before the others have tune runs
    assert v2.choices_of(protocol, rows[:3], ["tbd"]) == {"tbd": 1.0}
    with pytest.raises(ValueError, match="every tuning run failed"):
        v2.choices_of(protocol, rows[:3])


# ---------------------------------------------------------------------------------- statistics
def test_paired_difference_three_seeds_by_hand():
    # d = (1, 2, 1): mean 4/3, sd sqrt(1/3), sem 1/3, t(0.975, 2) = 4.3027 (t table)
    d = st.paired_difference({0: 10.0, 1: 12.0, 2: 11.0, 7: 50.0}, {0: 9.0, 1: 10.0, 2: 10.0},
                             0.95)
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3  # seed 7 has no pair: left out
    assert d["mean"] == pytest.approx(4 / 3)
    assert d["low"] == pytest.approx(4 / 3 - 4.3027 / 3, abs=1e-3)
    assert d["high"] == pytest.approx(4 / 3 + 4.3027 / 3, abs=1e-3)
    assert d["verdict"] == "inconclusive"  # the interval holds 0


def test_paired_difference_five_seeds_excludes_zero():
    # d = (1, 1.2, 0.8, 1.1, 0.9): mean 1, sd sqrt(0.025), sem sqrt(0.005), t(0.975, 4) = 2.7764
    a = {s: 20.0 + x for s, x in enumerate([1, 1.2, 0.8, 1.1, 0.9])}
    d = st.paired_difference(a, {s: 20.0 for s in range(5)}, 0.95)
    half = 2.7764 * math.sqrt(0.005)
    assert d["mean"] == pytest.approx(1.0)
    assert (d["low"], d["high"]) == pytest.approx((1 - half, 1 + half), abs=1e-3)
    assert d["verdict"] == "above"
    assert st.paired_difference({s: 20.0 for s in range(5)}, a, 0.95)["verdict"] == "below"
    one = st.paired_difference({0: 1.0}, {0: 0.0}, 0.95)
    assert one["low"] is None and one["verdict"] == "inconclusive"


def test_failure_interval_is_clopper_pearson():
    # 0 of 5: [0, 1 - 0.025^(1/5)]; 5 of 5: [0.025^(1/5), 1]
    assert st.failure_interval(0, 5, 0.95) == pytest.approx((0.0, 1 - 0.025 ** 0.2))
    assert st.failure_interval(5, 5, 0.95) == pytest.approx((0.025 ** 0.2, 1.0))
    # 1 of 10 (the published exact interval, 0.0025 to 0.4450)
    lo, hi = st.failure_interval(1, 10, 0.95)
    assert lo == pytest.approx(0.00253, abs=1e-4) and hi == pytest.approx(0.44502, abs=1e-4)


def test_summarise_counts_failures_and_pairs_by_seed():
    rows = [{"method": "baseline", "seed": s, "AP": ap} for s, ap in enumerate([20, 22, 21])]
    rows += [{"method": "tbd", "seed": 0, "AP": 25.0}, {"method": "tbd", "seed": 1, "AP": 5.0},
             {"method": "tbd", "seed": 2, "failed": "loss is nan", "multiplier": 1.0}]
    for r in rows[3:5]:
        r["multiplier"] = 1.0
    table = st.summarise(rows, ["baseline", "tbd"], "tbd", 0.5, 0.95)
    base, tbd = table
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["ok", "stalled", "diverged"]
    assert tbd["failures"] == 2 and tbd["runs"] == 3
    assert tbd["AP_mean"] == pytest.approx(15.0)  # both runs with an AP (25, 5)
    assert tbd["AP_mean_ok"] == pytest.approx(25.0) and tbd["AP_std_ok"] is None
    assert base["AP_mean"] == pytest.approx(21.0) and base["AP_std"] == pytest.approx(1.0)
    # baseline - tbd on seeds 0 and 1 (seed 2 has no AP): (20 - 25, 22 - 5) = (-5, 17)
    assert base["vs_reference"]["seeds"] == [0, 1]
    assert base["vs_reference"]["mean"] == pytest.approx(6.0)
    assert tbd["vs_reference"] is None
    # tbd - baseline, descriptive, on the same seeds: (25 - 20, 5 - 22) = (5, -17)
    assert tbd["vs_baseline"]["seeds"] == [0, 1]
    assert tbd["vs_baseline"]["mean"] == pytest.approx(-6.0)
    assert base["vs_baseline"] is None
    # no baseline row in the table: nothing to pair with
    assert st.summarise(rows[3:], ["tbd"], "tbd", 0.5, 0.95)[0]["vs_baseline"] is None


def test_a_comparison_is_pending_until_both_sides_have_every_seed():
    """3 of 5 seeds with every peer ahead: an interval that excludes 0 but no verdict; with the
    5th seed of both (a diverged run counts as recorded, it has no AP to pair) the verdict."""
    ref = [{"method": "tbd", "seed": s, "AP": 20.0} for s in range(5)]
    peer = [{"method": "pkd", "seed": s, "AP": 20.0 + x, "multiplier": 2.0}
            for s, x in enumerate([1.0, 1.2, 0.8])]
    line = st.summarise(ref + peer, ["tbd", "pkd"], "tbd", 0.5, 0.95, 5)[1]
    d = line["vs_reference"]
    # d = (1, 1.2, 0.8): mean 1, sd 0.2, sem 0.2 / sqrt(3), t(0.975, 2) = 4.3027
    assert d["low"] == pytest.approx(1 - 4.3027 * 0.2 / math.sqrt(3), abs=1e-3) and d["low"] > 0
    assert d["verdict"] == "pending" and d["seeds_required"] == 5 and d["n"] == 3
    assert rep._paired_cells(d)[1] == "pending (3 of 5 seeds)"
    peer += [{"method": "pkd", "seed": 3, "AP": 21.1, "multiplier": 2.0},
             {"method": "pkd", "seed": 4, "failed": "loss is nan", "multiplier": 2.0}]
    d = st.summarise(ref + peer, ["tbd", "pkd"], "tbd", 0.5, 0.95, 5)[1]["vs_reference"]
    assert d["verdict"] == "above" and d["n"] == 4
    assert rep._paired_cells(d)[1] == "better"
    # the reference short of a seed: pending again, whatever the peer has
    d = st.summarise(ref[:4] + peer, ["tbd", "pkd"], "tbd", 0.5, 0.95, 5)[1]["vs_reference"]
    assert d["verdict"] == "pending"


# ------------------------------------------------------------------------------ the protocol
@pytest.mark.parametrize("name", ["accuracy_v2_cpu.yaml", "accuracy_v2_cpu_t16k.yaml",
                                  "accuracy_v2_smoke.yaml", "investigate_tbd_t16k.yaml"])
def test_committed_protocols_load(name):
    p = v2.load_protocol(PROTOCOLS / name)
    assert p["file"] == f"projects/TBD/benchmarks/protocols/{name}"
    assert len(p["sha256"]) == 64
    assert len({p["splits"][k] for k in ("train", "tune", "test")}) == 3


@pytest.mark.parametrize("name", ["accuracy_v2_cpu.yaml", "accuracy_v2_cpu_t16k.yaml"])
def test_main_protocol_is_the_one_the_issue_asks_for(name):
    p = v2.load_protocol(PROTOCOLS / name)
    assert p["claim"] and len(p["test"]["seeds"]) >= 5
    assert [m["name"] for m in p["methods"]][:2] == ["baseline", "tbd"]
    assert {"pkd", "mgd", "crosskd", "fgd", "frs"} <= {m["name"] for m in p["methods"]}
    from tbd.data.shapes import DEFAULT_SPLITS

    seeds = [DEFAULT_SPLITS[p["splits"][k]]["seed"] for k in ("train", "tune", "test")]
    assert len(set(seeds)) == 3 and DEFAULT_SPLITS["tbd_demo_test"]["seed"] not in seeds


def test_the_t16k_profile_is_the_first_one_with_another_teacher():
    """Everything but the teacher (and the file's own prose) is accuracy_v2_cpu.yaml's, so its
    baseline runs are shared; the teacher is the 16000-iteration one, checked by its sha256."""
    first = v2.load_protocol(PROTOCOLS / "accuracy_v2_cpu.yaml")
    t16k = v2.load_protocol(PROTOCOLS / "accuracy_v2_cpu_t16k.yaml")
    assert t16k["baseline_from"]["file"] == first["file"]
    differ = {k for k in first if k not in ("file", "sha256", "name") and first[k] != t16k.get(k)}
    assert differ == {"teacher"}
    assert t16k["teacher"]["config"] == first["teacher"]["config"]  # the same architecture
    assert "teachers/fcos_R50w16_16k" in t16k["teacher"]["weights"]


def test_the_tbd_investigation_is_the_main_profile_with_other_settings():
    """Only its settings differ from the main profile (so its runs train what TBD's tune runs
    train but for the setting), one tune run each at x1, and every setting is a real key."""
    main = v2.load_protocol(PROTOCOLS / "accuracy_v2_cpu_t16k.yaml")
    inv = v2.load_protocol(PROTOCOLS / "investigate_tbd_t16k.yaml")
    differ = {k for k in main if k not in ("file", "sha256") and main[k] != inv.get(k)}
    assert differ == {"name", "registered", "claim", "tuning", "methods", "reference",
                      "auto_weight_check", "estimate"}
    assert {**inv["tuning"], "multipliers": main["tuning"]["multipliers"]} == main["tuning"]
    assert inv["tuning"]["multipliers"] == [1.0] and not inv["claim"]
    assert "tbd" not in {m["name"] for m in inv["methods"]}  # the main profile's tune run
    from tbd.config import load_config

    cfgs = {}
    for spec in v2.tune_specs(inv, 16000):
        cfg = load_config(str(ROOT / inv["student"]["config"]))
        cfg.merge_from_list(v2.train_opts(inv, spec, Path("out")))  # a wrong key would raise
        cfgs[spec["method"]] = cfg
    assert cfgs["tbd_bg"].MODEL.DISTILL.HD.BG_WEIGHT == 1.0
    assert cfgs["tbd_crossed"].MODEL.DISTILL.LOSSES == ["CrossHD", "TFD"]
    assert cfgs["tbd_crossed"].MODEL.DISTILL.CROSS_HD.CLS_WEIGHT == 1.0  # x1: the defaults


def test_phase_tune_trains_the_tune_runs_and_never_reads_test(tmp_path, smoke, monkeypatch):
    fake = FakeTrainNet(evaluations=5)  # the smoke's 5: a flat enough curve for its calibration
    monkeypatch.setattr(v2, "run_logged", fake)
    monkeypatch.setattr(v2, "eval_bbox", lambda config, weights, dataset, out, log, env=None:
                        {"AP": 48.4, "dataset": dataset})
    monkeypatch.setattr(v2, "model_gflops", lambda config, size: {"total": 0.5})
    v2.main(["--protocol", str(PROTOCOLS / "accuracy_v2_smoke.yaml"), "--phase", "tune",
             "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path / "res")])
    trained = sorted(Path(c[c.index("OUTPUT_DIR") + 1]).name for c in fake.calls)
    assert trained == ["tune_baseline_s100_i100", "tune_tbd_x1_s100_i100",
                       "tune_tbd_x2_s100_i100"]  # no test run, no automatic-weight run
    assert {c[c.index("DATASETS.TEST") + 1] for c in fake.calls} == {"('tbd_bench_tune',)"}
    assert json.loads((tmp_path / "work/tune_teacher_s0_i0.json").read_text())["AP"] == 48.4
    assert not list((tmp_path / "work").glob("test_*"))  # the teacher's test row too
    md = (tmp_path / "res/results.md").read_text()
    assert "Status: **tune complete (2/2 runs), no test run**" in md
    assert f"{cpu_name()}: 3." in md


def test_the_whole_profile_runs_every_run_once_in_order(tmp_path, monkeypatch):
    # the smoke with a second distiller: TBD's choice is frozen while FGD has no tune run yet
    protocol = yaml.safe_load((PROTOCOLS / "accuracy_v2_smoke.yaml").read_text())
    protocol["methods"].append({"name": "fgd", "losses": ["FGD"]})
    path = tmp_path / "two_distillers.yaml"
    path.write_text(yaml.safe_dump(protocol))
    fake = FakeTrainNet(evaluations=5)
    monkeypatch.setattr(v2, "run_logged", fake)
    monkeypatch.setattr(v2, "eval_bbox", lambda config, weights, dataset, out, log, env=None:
                        {"AP": 48.4})
    monkeypatch.setattr(v2, "model_gflops", lambda config, size: {"total": 0.5})
    monkeypatch.setattr(v2.Runner, "harmony", lambda *a: {"harmonious_proportion": 0.2,
                                                          "score_iou_spearman": 0.6})
    v2.main(["--protocol", str(path), "--work-dir", str(tmp_path / "work"), "--output",
             str(tmp_path / "res")])
    trained = [Path(c[c.index("OUTPUT_DIR") + 1]).name for c in fake.calls]
    # one worker: the calibration, then the order of ``stages``; each choice is x1 (equal tune
    # APs: the multiplier closest to 1)
    assert trained == [
        "tune_baseline_s100_i100", "tune_tbd_x1_s100_i100", "tune_tbd_x2_s100_i100",
        "test_baseline_s0_i100", "test_baseline_s1_i100", "test_tbd_x1_s0_i100",
        "test_tbd_x1_s1_i100", "tune_fgd_x1_s100_i100", "tune_fgd_x2_s100_i100",
        "test_fgd_x1_s0_i100", "test_fgd_x1_s1_i100", "tune_tbd_auto_s100_i100",
        "tune_fgd_auto_s100_i100"]
    assert json.loads((tmp_path / "work/choices.json").read_text()) == {"tbd": 1.0, "fgd": 1.0}
    assert json.loads((tmp_path / "res/results.json").read_text())["settings"]["status"] == \
        "complete"


def test_a_fresh_work_dir_gets_the_committed_runs_back_and_trains_none_again(tmp_path, smoke,
                                                                             monkeypatch):
    fake = FakeTrainNet(evaluations=5)
    monkeypatch.setattr(v2, "run_logged", fake)
    monkeypatch.setattr(v2, "eval_bbox", lambda config, weights, dataset, out, log, env=None:
                        {"AP": 48.4})
    monkeypatch.setattr(v2, "model_gflops", lambda config, size: {"total": 0.5})
    args = ["--protocol", str(PROTOCOLS / "accuracy_v2_smoke.yaml"), "--phase", "tune",
            "--output", str(tmp_path / "res")]
    v2.main(args + ["--work-dir", str(tmp_path / "work")])
    assert len(fake.calls) == 3
    first = json.loads((tmp_path / "res/results.json").read_text())
    # a fresh clone: the committed results only, the work dir (checkpoints, run jsons) is gone
    v2.main(args + ["--work-dir", str(tmp_path / "fresh")])
    assert len(fake.calls) == 3  # nothing trained again
    for name in ("tune_baseline_s100_i100", "tune_tbd_x1_s100_i100", "tune_tbd_x2_s100_i100"):
        row = json.loads((tmp_path / f"fresh/{name}.json").read_text())
        was = json.loads((tmp_path / f"work/{name}.json").read_text())
        assert row == {**was, "restored_from": str(tmp_path / "res/results.json")}
    again = json.loads((tmp_path / "res/results.json").read_text())
    assert [{k: v for k, v in r.items() if k != "restored_from"} for r in again["rows"]] == \
        first["rows"]
    # the earlier invocation's wall time is kept, counted as the one invocation it was
    calls = json.loads((tmp_path / "fresh/invocations.json").read_text())
    assert calls[0]["invocations"] == 1 and again["settings"]["invocations"] == 2
    # a run already in the work dir is left as it is
    (tmp_path / "fresh/tune_tbd_x2_s100_i100.json").write_text(json.dumps({
        **json.loads((tmp_path / "work/tune_tbd_x2_s100_i100.json").read_text()), "AP": 1.0}))
    assert v2.restore_work(tmp_path / "fresh", tmp_path / "res/results.json", smoke) == []
    assert json.loads((tmp_path / "fresh/tune_tbd_x2_s100_i100.json").read_text())["AP"] == 1.0


def test_a_stop_file_lets_the_runs_in_progress_finish_and_starts_no_other(tmp_path, monkeypatch,
                                                                          capsys):
    work = tmp_path / "work"
    fake = FakeTrainNet(evaluations=5)

    def touching_stop(cmd, log, env=None):  # the user asks for a stop during the first run
        fake(cmd, log, env)
        (work / "STOP").touch()

    monkeypatch.setattr(v2, "run_logged", touching_stop)
    monkeypatch.setattr(v2, "eval_bbox", lambda config, weights, dataset, out, log, env=None:
                        {"AP": 48.4})
    monkeypatch.setattr(v2, "model_gflops", lambda config, size: {"total": 0.5})
    args = ["--protocol", str(PROTOCOLS / "accuracy_v2_smoke.yaml"), "--phase", "tune",
            "--work-dir", str(work), "--output", str(tmp_path / "res")]
    v2.main(args)  # returns: a stop is not a failure
    assert len(fake.calls) == 1 and (work / "tune_baseline_s100_i100.json").is_file()
    assert "stopped: the work dir has a STOP file" in capsys.readouterr().out
    assert "tune 0/2 runs" in (tmp_path / "res/results.md").read_text()
    (work / "STOP").unlink()
    monkeypatch.setattr(v2, "run_logged", fake)
    v2.main(args)  # continues where it stopped
    assert len(fake.calls) == 3


def test_a_failed_run_lets_the_others_in_progress_finish_and_starts_no_other(tmp_path, smoke,
                                                                            monkeypatch):
    calls = []

    def broken(cmd, log, env=None):  # not a divergence: the benchmark must stop
        calls.append(cmd)
        log.write_text("Traceback\nOSError: disk full\n")
        raise RuntimeError("train_net.py failed")

    monkeypatch.setattr(v2, "run_logged", broken)
    specs = v2.tune_specs(smoke, 100) + v2.test_specs(smoke, 100, {}, ["baseline"])
    assert len(specs) >= 3
    with pytest.raises(RuntimeError, match=r"1 run\(s\) failed"):
        v2.Runner(smoke, tmp_path, jobs=1).train_all(specs, lambda: None)
    assert len(calls) == 1  # the runs queued behind it returned without training


def test_results_of_another_protocol_version_are_not_restored(tmp_path, smoke, caplog):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"settings": {"protocol_sha256": "0" * 64}, "rows": [
        {**v2.calibration_spec(smoke, 100), "AP": 20.0}]}))
    assert v2.restore_work(tmp_path / "work", results, smoke) == []
    assert not (tmp_path / "work").exists()
    assert "written under another version of projects/TBD/benchmarks/protocols/" \
        "accuracy_v2_smoke.yaml" in caplog.text and "trained again" in caplog.text
    assert v2.restore_work(tmp_path / "work", tmp_path / "none.json", smoke) == []


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.pop("tuning"), "key 'tuning' is missing"),
    (lambda p: p["schedule"].pop("lr_step"), "schedule.lr_step is missing"),
    (lambda p: p.update(reference="nope"), "the reference 'nope'"),
    (lambda p: p["tuning"].update(multipliers=[0.5, 2.0]), "must include 1.0"),
    (lambda p: p["splits"].update(tune="no_such_split"), "'no_such_split' is not a registered"),
    (lambda p: p["calibration"].update(ladder=[50, 100]), "first calibration.ladder entry"),
    (lambda p: p["methods"].append({"name": "x", "losses": []}), "empty for the baseline only"),
    (lambda p: p["teacher"].update(sha256_file="projects/TBD/demo_teacher/README.md"),
     "does not match the sha256"),
])
def test_bad_protocols_are_refused_naming_the_key(tmp_path, edit, message):
    p = yaml.safe_load((PROTOCOLS / "accuracy_v2_smoke.yaml").read_text())
    edit(p)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(p))
    with pytest.raises(v2.ProtocolError, match=message) as e:
        v2.load_protocol(path)
    assert str(path) in str(e.value)
    with pytest.raises(v2.ProtocolError, match="no such file"):
        v2.load_protocol(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- the runs
@pytest.fixture
def smoke():
    return v2.load_protocol(PROTOCOLS / "accuracy_v2_smoke.yaml")


def test_weight_opts_multiply_every_loss_weight(smoke):
    # the student config's defaults: HD 1.0 / 1.0, TFD 0.005 (tbd/config.py)
    opts = dict(zip(*[iter(v2.weight_opts(smoke, ["HD", "TFD"], 2.0))] * 2))
    assert {k: float(v) for k, v in opts.items()} == pytest.approx(
        {"MODEL.DISTILL.HD.CLS_WEIGHT": 2.0, "MODEL.DISTILL.HD.REG_WEIGHT": 2.0,
         "MODEL.DISTILL.TFD.WEIGHT": 0.01})


def test_specs_order_and_names(smoke):
    tune = v2.tune_specs(smoke, 100, ["tbd", "fgd"])
    assert [(s["method"], s["multiplier"]) for s in tune] == [
        ("tbd", 1.0), ("fgd", 1.0), ("tbd", 2.0), ("fgd", 2.0)]  # every x1 run first
    assert [s["method"] for s in v2.tune_specs(smoke, 100)] == ["tbd", "tbd"]  # the smoke's
    with_fgd = {**smoke, "methods": [*smoke["methods"], {"name": "fgd", "losses": ["FGD"]}]}
    test = v2.test_specs(with_fgd, 100, {"tbd": 2.0, "fgd": 1.0}, ["baseline", "tbd", "fgd"])
    assert [(s["seed"], s["method"], s["multiplier"]) for s in test] == [
        (0, "baseline", None), (0, "tbd", 2.0), (0, "fgd", 1.0),
        (1, "baseline", None), (1, "tbd", 2.0), (1, "fgd", 1.0)]
    assert v2.run_name(test[1]) == "test_tbd_x2_s0_i100"
    assert v2.run_name(v2.calibration_spec(smoke, 100)) == "tune_baseline_s100_i100"


def test_stages_give_tbd_against_the_baseline_first_and_depend_only_on_earlier_ones():
    protocol = v2.load_protocol(PROTOCOLS / "accuracy_v2_cpu.yaml")
    got = v2.stages(protocol)
    assert got[:3] == [[("tune", "tbd"), ("test", "baseline")],
                       [("test", "tbd"), ("tune", "pkd")],
                       [("test", "pkd"), ("tune", "crosskd")]]
    assert got[-2] == [("test", "frs")]
    assert got[-1] == [("auto", m["name"]) for m in protocol["methods"] if m["losses"]]
    tuned = set()
    for stage in got:
        assert all(m in tuned or m == "baseline" for kind, m in stage if kind == "test")
        tuned |= {m for kind, m in stage if kind == "tune"}
    # every method is tuned and tested once
    flat = [x for stage in got[:-1] for x in stage]
    distilled = [m["name"] for m in protocol["methods"] if m["losses"]]
    assert sorted(flat) == sorted([("tune", m) for m in distilled]
                                  + [("test", m["name"]) for m in protocol["methods"]])


class GatedRunner(v2.Runner):
    """A runner whose runs end when the test says so: which runs train at once is observable."""

    def __init__(self, protocol, work, jobs):
        super().__init__(protocol, work, jobs)
        self.events, self.gates, self.lock = [], {}, threading.Lock()

    def gate(self, name: str) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(name, threading.Event())

    def train(self, spec):
        name = v2.run_name(spec)
        self.events.append(("start", name))
        assert self.gate(name).wait(10), f"{name} was never let finish"
        self.events.append(("end", name))
        return {**spec, "AP": 1.0}

    def running(self) -> set[str]:
        started = {n for e, n in self.events if e == "start"}
        return started - {n for e, n in self.events if e == "end"}

    def finish(self, name: str, then_running: set[str]) -> None:
        """Let ``name`` end, then wait until exactly ``then_running`` train."""
        self.gate(name).set()
        deadline = time.time() + 10
        while self.running() != then_running or ("end", name) not in self.events:
            assert time.time() < deadline, f"running {self.running()}, not {then_running}"
            time.sleep(0.01)


def spec_named(name: str) -> dict:
    return {"split": "tune", "method": name, "multiplier": None, "seed": 0, "iters": 1}


def test_a_worker_takes_the_next_stages_run_while_the_last_run_of_a_stage_trains(tmp_path,
                                                                                smoke):
    a, b1, b2, c, d = (spec_named(n) for n in ("a", "b1", "b2", "c", "d"))
    made = []

    def after_a() -> list[dict]:  # called once ``a`` is recorded (a choice is frozen here)
        made.append([e for e in runner.events if e[0] == "end"])
        return [c]

    groups = [v2.Group([], lambda: [a]), v2.Group([], lambda: [b1, b2]),
              v2.Group([a], after_a), v2.Group([], lambda: [d])]
    runner = GatedRunner(smoke, tmp_path, jobs=2)
    result = {}
    thread = threading.Thread(target=lambda: result.update(runner.train_groups(groups, list)))
    thread.start()
    names = {s["method"]: v2.run_name(s) for s in (a, b1, b2, c, d)}
    deadline = time.time() + 10
    while runner.running() != {names["a"], names["b1"]}:
        assert time.time() < deadline
        time.sleep(0.01)
    assert made == []  # c's group is not made before a is recorded
    runner.finish(names["a"], {names["b1"], names["b2"]})  # b2 comes before c in the order
    assert made == [[("end", names["a"])]]
    # the last run of the first groups trains: the free worker takes c, not nothing
    runner.finish(names["b1"], {names["b2"], names["c"]})
    runner.finish(names["b2"], {names["c"], names["d"]})
    runner.finish(names["c"], {names["d"]})
    runner.finish(names["d"], set())
    thread.join(10)
    assert sorted(result) == sorted(names.values())


def test_a_group_after_a_run_no_group_trains_is_an_error_not_a_silent_end(tmp_path, smoke):
    runner = v2.Runner(smoke, tmp_path, jobs=1)
    with pytest.raises(RuntimeError, match="runs never started"):
        runner.train_groups([v2.Group([spec_named("nowhere")], lambda: [spec_named("x")])], list)


def test_groups_freeze_a_choice_once_its_tune_runs_are_recorded(smoke):
    frozen, choices = [], {}

    def freeze(method: str) -> None:
        frozen.append(method)
        choices[method] = 2.0

    got = v2.groups(smoke, 100, choices, freeze)
    assert [g.after for g in got] == [[], [], v2.tune_specs(smoke, 100, ["tbd"]), []]
    assert [s["method"] for s in got[0].specs()] == ["tbd", "tbd"]  # tune, x1 and x2
    assert {s["method"] for s in got[1].specs()} == {"baseline"} and frozen == []
    tests = got[2].specs()
    assert frozen == ["tbd"] and {(s["method"], s["multiplier"]) for s in tests} == {("tbd", 2.0)}
    assert [s["seed"] for s in tests] == smoke["test"]["seeds"]
    assert all(s.get("auto") for s in got[3].specs())


def test_train_opts_give_every_run_the_protocol_schedule(smoke):
    spec = {"split": "tune", "method": "tbd", "multiplier": 0.5, "seed": 100, "iters": 100}
    opts = v2.train_opts(smoke, spec, Path("out"))
    o = dict(zip(opts[::2], opts[1::2]))
    assert o["SOLVER.MAX_ITER"] == "100" and o["SOLVER.STEPS"] == "(70,)"
    assert o["TEST.EVAL_PERIOD"] == "20" and o["SOLVER.CHECKPOINT_PERIOD"] == "20"
    assert o["DATASETS.TEST"] == "('tbd_bench_tune',)"
    assert o["MODEL.META_ARCHITECTURE"] == "DistillFCOS"
    assert float(o["MODEL.DISTILL.TFD.WEIGHT"]) == pytest.approx(0.0025)
    base = dict(zip(*[iter(v2.train_opts(smoke, {**spec, "method": "baseline", "multiplier": None,
                                                   "split": "test"}, Path("o")))] * 2))
    assert "MODEL.META_ARCHITECTURE" not in base and base["TEST.EVAL_PERIOD"] == "0"
    assert base["DATASETS.TEST"] == "('tbd_bench_test',)"


def test_curve_of_reads_detectron2_iteration_numbers(tmp_path):
    # period 1000, 2000 iterations: a periodic evaluation after iteration index 999, the final
    # one recorded at 2000; a training record between them has no AP
    lines = [{"iteration": 19, "total_loss": 1.0}, {"iteration": 999, "bbox/AP": 3.0},
             {"iteration": 1019, "total_loss": 0.5}, {"iteration": 2000, "bbox/AP": 6.0},
             {"iteration": 999, "bbox/AP": 3.5}]  # appended by a resumed run: the last counts
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines))
    assert v2.curve_of(tmp_path / "metrics.json", 2000) == curve({1000: 3.5, 2000: 6.0})


class FakeTrainNet:
    """Stands in for ``train_net.py``: records the command, writes what a finished run writes
    (or a divergence), so the runner's bookkeeping is tested without training."""

    def __init__(self, diverge: bool = False, evaluations: int = 2):
        self.calls, self.diverge, self.evaluations = [], diverge, evaluations

    def __call__(self, cmd, log, env=None):
        self.calls.append(cmd)
        out = Path(cmd[cmd.index("OUTPUT_DIR") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if self.diverge:
            log.write_text("Traceback\nFloatingPointError: Loss became infinite or NaN\n")
            raise RuntimeError("train_net.py failed")
        iters = int(cmd[cmd.index("SOLVER.MAX_ITER") + 1])
        # ``evaluations - 1`` periodic ones at AP 4, then the final one at 7
        period = iters // self.evaluations
        (out / "metrics.json").write_text("\n".join(json.dumps(x) for x in [
            *[{"iteration": k * period - 1, "bbox/AP": 4.0, "time": 0.1}
              for k in range(1, self.evaluations)],
            {"iteration": iters, "bbox/AP": 7.0, "bbox/AP50": 9.0}]))
        log.write_text("done\n")


def test_runner_resumes_an_interrupted_run_and_skips_recorded_ones(tmp_path, smoke, monkeypatch):
    fake = FakeTrainNet()
    monkeypatch.setattr(v2, "run_logged", fake)
    runner = v2.Runner(smoke, tmp_path, jobs=1)
    spec = v2.calibration_spec(smoke, 100)
    (tmp_path / v2.run_name(spec)).mkdir()
    (tmp_path / v2.run_name(spec) / "last_checkpoint").write_text("model_0000039.pth")
    (tmp_path / f"{v2.run_name(spec)}.log").write_text("the interrupted part\n")
    row = runner.train(spec)
    assert "--resume" in fake.calls[0] and row["resumed"]
    assert row["AP"] == 7.0 and row["curve"] == curve({50: 4.0, 100: 7.0})
    kept = list(tmp_path.glob(f"{v2.run_name(spec)}.log.*"))
    assert len(kept) == 1 and kept[0].read_text() == "the interrupted part\n"
    assert row["cpu"] == cpu_name()  # a profile may span machines: each run names its own
    assert runner.train(spec) == row and len(fake.calls) == 1  # recorded: not run again
    other = {**spec, "seed": 1}
    runner.train(other)
    assert "--resume" not in fake.calls[1]


def test_the_teacher_cache_goes_to_distilled_runs_only_and_is_recorded(tmp_path, smoke,
                                                                       monkeypatch):
    fake = FakeTrainNet()
    monkeypatch.setattr(v2, "run_logged", fake)
    runner = v2.Runner(smoke, tmp_path, jobs=1, teacher_cache_mb=512.0)
    base, (x1, _) = v2.calibration_spec(smoke, 100), v2.tune_specs(smoke, 100, ["tbd"])
    assert "teacher_cache_mb" not in runner.train(base)
    assert runner.train(x1)["teacher_cache_mb"] == 512.0
    assert "MODEL.DISTILL.TEACHER.CACHE_MB" not in fake.calls[0]
    assert fake.calls[1][fake.calls[1].index("MODEL.DISTILL.TEACHER.CACHE_MB") + 1] == "512.0"
    v2.Runner(smoke, tmp_path / "off", jobs=1).train(x1)
    assert "MODEL.DISTILL.TEACHER.CACHE_MB" not in fake.calls[2]  # off by default


def test_runner_records_a_divergence_as_the_runs_outcome(tmp_path, smoke, monkeypatch):
    monkeypatch.setattr(v2, "run_logged", FakeTrainNet(diverge=True))
    runner = v2.Runner(smoke, tmp_path, jobs=1)
    spec = {"split": "tune", "method": "tbd", "multiplier": 2.0, "seed": 100, "iters": 100}
    row = runner.train(spec)
    assert row["failed"] == "Loss became infinite or NaN"
    assert json.loads((tmp_path / "tune_tbd_x2_s100_i100.json").read_text())["failed"]
    assert st.status(row, 20.0, 0.5) == "diverged"


def test_report_of_a_partial_profile(tmp_path, smoke):
    """results.md/json from hand rows: the calibration verdict, the tuning table with its choice,
    the test table with the paired difference, and the status saying what is missing."""
    from tbd_benchmarks.accuracy_v2_report import write_report

    cal = {"split": "tune", "method": "baseline", "multiplier": None, "seed": 100, "iters": 100,
           "AP": 20.0, "curve": curve({20: 5.0, 40: 10.0, 60: 18.0, 80: 19.9, 100: 20.0})}

    class Recorded:
        work, jobs = tmp_path, 1

        def recorded(self, spec):
            return cal if spec["method"] == "baseline" and spec["split"] == "tune" else None

    tune = [dict(cal, method="tbd", multiplier=m, AP=ap) for m, ap in ((1.0, 24.0), (2.0, 25.0))]
    test = [{"split": "test", "method": m, "seed": s, "iters": 100, "AP": ap,
             "multiplier": None if m == "baseline" else 2.0}
            for m, aps in (("baseline", (20.0, 21.0)), ("tbd", (24.0, 24.5))) for s, ap in
            enumerate(aps)]
    auto = {**v2.auto_specs(smoke, 100, ["tbd"])[0], "AP": 24.5,
            "auto_scales": {"HD": 0.5, "TFD": 2.0}}
    state = {"calibration": [{**st.calibration_verdict(cal["curve"], 100, 100.0), "run": "c"}],
             "tune": [cal, *tune], "choices": {"tbd": 2.0}, "teacher": {"AP": 40.0},
             "test": test[:3], "auto": [auto],
             "headroom": {"teacher_AP": 40.0, "baseline_AP": 20.0, "gap": 20.0, "min_ap": 5.0,
                          "passed": True}}
    write_report(tmp_path / "res", smoke, state, Recorded(), [{"wall_s": 120.0}], "abc",
                 model_gflops_of=lambda c: {"total": 0.5})
    md = (tmp_path / "res" / "results.md").read_text()
    assert "Status: **partial: tune 2/2 runs, test 3/4 runs**" in md
    assert "teacher 40.0 AP minus the calibrated baseline's 20.0 = +20.0 (must be >= 5.0): " \
        "**passed**" in md
    assert "last-quarter gain 2.00" in md and "**converged**" in md  # 20.0 - 18.0 (at 60)
    assert "| tbd | 24.0 | 25.0 | x2 |" in md
    assert "Teacher: 40.0 AP, +19.5 above the baseline's mean (headroom on test)" in md
    # baseline - tbd on seed 0 only (seed 1 of tbd is missing): -4.0, no interval, no verdict yet
    pending = "pending (1 of 2 seeds)"
    assert "| baseline |  | 2 | 20.5 ± 0.7 |" in md and f"| -4.00 [n/a, n/a] | {pending} |" in md
    # and against the baseline: the baseline's own cells empty, tbd - baseline = +4.0 on seed 0
    assert f"| -4.00 [n/a, n/a] | {pending} |  |  | 0/2 " in md
    assert f"| tbd | x2 | 1 | 24.0 | 24.0 |  |  | 4.00 [n/a, n/a] | {pending} |" in md
    # auto 24.5 against the chosen x2's 25.0
    assert "| tbd | 24.5 | 25.0 (x2) | -0.5 | HD 0.5, TFD 2 |" in md
    payload = json.loads((tmp_path / "res" / "results.json").read_text())
    assert payload["protocol"] == smoke["file"]
    assert payload["settings"]["protocol_sha256"] == smoke["sha256"]
    assert (tmp_path / "res" / "accuracy_v2.png").is_file()
    assert (tmp_path / "res" / "curves.png").is_file()
    # an investigation (`--phase tune`) ends with every tune run and no test run: not "partial"
    write_report(tmp_path / "inv", smoke, {**state, "test": [], "auto": []}, Recorded(),
                 [{"wall_s": 60.0}], "abc", model_gflops_of=lambda c: {"total": 0.5})
    inv = (tmp_path / "inv" / "results.md").read_text()
    assert "Status: **tune complete (2/2 runs), no test run**" in inv
    write_report(tmp_path / "inv1", smoke, {**state, "tune": [cal, tune[0]], "test": []},
                 Recorded(), [{"wall_s": 60.0}], "abc", model_gflops_of=lambda c: {"total": 0.5})
    assert "Status: **partial: tune 1/2 runs, test 0/4 runs**" in (
        tmp_path / "inv1" / "results.md").read_text()


def test_auto_weight_runs_start_from_the_published_weights_and_choose_nothing(smoke, tmp_path):
    spec = v2.auto_specs(smoke, 100, ["tbd"])[0]
    assert v2.run_name(spec) == "tune_tbd_auto_s100_i100"
    o = dict(zip(*[iter(v2.train_opts(smoke, spec, Path("o")))] * 2))
    assert o["MODEL.DISTILL.AUTO_WEIGHT.ENABLED"] == "True"
    assert o["MODEL.DISTILL.AUTO_WEIGHT.ITERS"] == "20"  # the smoke's auto_weight_opts
    assert "MODEL.DISTILL.HD.CLS_WEIGHT" not in o  # the config's weights, not multiplied
    rows = [{"method": "baseline", "multiplier": None, "AP": 20.0},
            {"method": "tbd", "multiplier": 1.0, "AP": 21.0},
            {"method": "tbd", "multiplier": 2.0, "AP": 22.0},
            {**spec, "AP": 30.0}]  # better than both, but not a tuning choice
    assert v2.choices_of(smoke, rows) == {"tbd": 2.0}
    lines = [{"iteration": 99, "auto_weight/HD": 0.5}, {"iteration": 119, "total_loss": 1.0},
             {"iteration": 139, "auto_weight/HD": 0.25, "auto_weight/TFD": 2.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines))
    assert v2.auto_scales(tmp_path / "metrics.json") == {"HD": 0.25, "TFD": 2.0}


def test_headroom_gate_evaluates_the_teacher_once_on_tune(tmp_path, smoke, monkeypatch):
    calls = []

    def fake_eval(config, weights, dataset, out, log, env=None):
        calls.append(dataset)
        return {"AP": 48.4, "AP50": 70.0}

    monkeypatch.setattr(v2, "eval_bbox", fake_eval)
    runner = v2.Runner(smoke, tmp_path, jobs=1)
    runner._write(v2.calibration_spec(smoke, 100), {"AP": 48.7})
    h = runner.headroom(100)
    assert calls == ["tbd_bench_tune"]
    assert h["gap"] == pytest.approx(-0.3) and not h["passed"]  # 48.4 - 48.7 < 5
    runner._write(v2.calibration_spec(smoke, 100), {"AP": 40.0})
    assert runner.headroom(100)["passed"] and calls == ["tbd_bench_tune"]  # 8.4 >= 5, recorded
    assert v2.Runner({k: v for k, v in smoke.items() if k != "headroom"}, tmp_path,
                     1).headroom(100) is None


def test_a_headroom_without_its_number_is_refused(tmp_path):
    p = yaml.safe_load((PROTOCOLS / "accuracy_v2_smoke.yaml").read_text())
    p["headroom"] = {"min": 5}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(v2.ProtocolError, match="headroom.min_ap"):
        v2.load_protocol(tmp_path / "p.yaml")


# --------------------------------------------------------------- baseline runs of another file
SMOKE_FILE = "projects/TBD/benchmarks/protocols/accuracy_v2_smoke.yaml"


def _sharing(tmp_path: Path, edit=lambda p: None) -> Path:
    """A copy of the smoke protocol under another name whose baseline runs are the smoke's."""
    p = yaml.safe_load((ROOT / SMOKE_FILE).read_text())
    p.update(name="other", baseline_from=SMOKE_FILE)
    edit(p)
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def test_baseline_runs_are_read_from_the_protocol_they_share(tmp_path, smoke, monkeypatch):
    fake = FakeTrainNet()
    monkeypatch.setattr(v2, "run_logged", fake)
    p = v2.load_protocol(_sharing(tmp_path))
    assert p["baseline_from"] == {"file": SMOKE_FILE, "sha256": smoke["sha256"],
                                  "name": "accuracy_v2_smoke"}
    theirs = v2.Runner(smoke, tmp_path / "smoke_work", jobs=1)
    cal = v2.calibration_spec(smoke, 100)
    theirs._write(cal, {**cal, "AP": 31.5, "curve": curve({50: 30.0, 100: 31.5})})
    mine = v2.Runner(p, tmp_path / "work", jobs=1, baseline_work=tmp_path / "smoke_work")
    row = mine.train(cal)
    assert fake.calls == [] and row["AP"] == 31.5 and row["copied_from"] == SMOKE_FILE
    assert mine.recorded(cal) == row  # copied into this work dir, with its origin
    mine.train({**cal, "seed": 1})  # not recorded there: trained here
    mine.train({**cal, "method": "tbd", "multiplier": 1.0})  # never shared: sees the teacher
    assert len(fake.calls) == 2
    # the default source is that protocol's default work dir
    assert v2.Runner(p, tmp_path / "w2", 1).baseline_work == \
        ROOT / "output/benchmarks/accuracy_v2_smoke"
    assert v2.Runner(smoke, tmp_path / "w3", 1).shared_baseline(cal) is None


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["student"].update(config="projects/TBD/configs/demo/"
                                          "fcos_R50w16_FPN64_teacher.yaml"), "student differs"),
    (lambda p: p["schedule"].update(lr_step=0.5), "schedule differs"),
    (lambda p: p["splits"].update(tune="tbd_demo_test"), "splits differs"),
    (lambda p: p["tuning"].update(seed=7), "tuning.seed differs"),
    (lambda p: p["methods"][0].update(opts=["SOLVER.BASE_LR", "0.01"]), r"methods \(baseline\)"),
    (lambda p: p.update(baseline_from="projects/TBD/benchmarks/protocols/none.yaml"),
     "no such file"),
])
def test_sharing_baseline_runs_is_refused_when_they_are_not_the_same_runs(tmp_path, edit,
                                                                         message):
    path = _sharing(tmp_path, edit)
    with pytest.raises(v2.ProtocolError, match=message) as e:
        v2.load_protocol(path)
    assert str(path) in str(e.value) and "baseline_from" in str(e.value)


def test_a_protocol_cannot_share_its_own_baseline_runs(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text(_sharing(tmp_path).read_text().replace(SMOKE_FILE, str(path)))
    with pytest.raises(v2.ProtocolError, match="names this file itself"):
        v2.load_protocol(path)


def test_report_says_which_baseline_runs_were_shared(tmp_path, smoke):
    from tbd_benchmarks.accuracy_v2_report import write_report

    p = v2.load_protocol(_sharing(tmp_path))
    cal = {**v2.calibration_spec(p, 100), "AP": 20.0, "copied_from": SMOKE_FILE,
           "curve": curve({20: 5.0, 40: 10.0, 60: 18.0, 80: 19.9, 100: 20.0})}

    class Recorded:
        work, jobs = tmp_path, 1

        def recorded(self, spec):
            return cal if spec == v2.calibration_spec(p, 100) else None

    state = {"calibration": [{**st.calibration_verdict(cal["curve"], 100, 100.0), "run": "c"}],
             "tune": [cal], "choices": {}, "teacher": None, "test": [], "auto": [],
             "headroom": None}
    write_report(tmp_path / "res", p, state, Recorded(), [{"wall_s": 1.0}], "abc",
                 model_gflops_of=lambda c: {"total": 0.5})
    md = (tmp_path / "res" / "results.md").read_text()
    assert f"Baseline runs are shared with `{SMOKE_FILE}` (sha256 `{smoke['sha256'][:12]}`" in md
    assert "1 are its runs (read from its work dir or its results), not trained again." in md
    assert f"**converged** (the run of `{SMOKE_FILE}`: the same baseline run)." in md


def test_teacher_test_row_is_evaluated_once_with_harmony(tmp_path, smoke, monkeypatch):
    calls = []
    monkeypatch.setattr(v2, "eval_bbox", lambda c, w, dataset, o, log, env=None:
                        calls.append(dataset) or {"AP": 50.9})
    monkeypatch.setattr(v2, "infer_time", lambda log: 0.02)
    runner = v2.Runner(smoke, tmp_path, jobs=1)
    monkeypatch.setattr(runner, "harmony", lambda *a: {"harmonious_proportion": 0.2,
                                                       "score_iou_spearman": 0.6})
    row = runner.teacher()
    assert calls == ["tbd_bench_test"] and row["AP"] == 50.9 and row["split"] == "test"
    assert row["infer_s_per_image"] == 0.02 and row["harmonious_proportion"] == 0.2
    assert runner.teacher() == row and calls == ["tbd_bench_test"]  # recorded: not again
