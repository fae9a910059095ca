"""The v2 benchmark's diagnostics: loss windows, curve gaps and the report, checked by hand on
recorded runs (nothing is trained or evaluated: the harmony results are pre-written)."""

import json

import pytest

from tbd_benchmarks import accuracy_v2 as v2
from tbd_benchmarks import accuracy_v2_diagnostics as diag

from .conftest import ROOT

SMOKE = ROOT / "projects/TBD/benchmarks/protocols/accuracy_v2_smoke.yaml"


def write_lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_loss_windows_average_each_term_over_a_sixteenth(tmp_path):
    def row(i, cls, loc, hd):
        return {"iteration": i, "loss_fcos_cls": cls, "loss_fcos_loc": loc, "loss_hd_cls": hd}

    write_lines(tmp_path / "metrics.json", [
        row(4, 1.0, 0.5, 2.0), row(9, 0.8, 0.3, 1.0),  # start: [0, 10)
        row(74, 0.4, 0.2, 0.6),  # middle: [70, 80)
        row(80, 50.0, 50.0, 50.0),  # in no window
        row(154, 9.0, 9.0, 9.0), row(154, 0.2, 0.1, 0.3),  # logged again after a resume: last
        {"iteration": 159, "bbox/AP": 40.0},  # an evaluation, no loss
    ])
    start, middle, end = diag.loss_windows(tmp_path / "metrics.json", 160, {"loss_hd_cls"})
    assert (start["from"], start["to"], middle["from"], middle["to"], end["from"], end["to"]) \
        == (0, 10, 70, 80, 150, 160)
    assert start["terms"] == pytest.approx({"loss_fcos_cls": 0.9, "loss_fcos_loc": 0.4,
                                            "loss_hd_cls": 1.5})
    assert start["detection"] == pytest.approx(1.3) and start["distillation"] == pytest.approx(1.5)
    assert start["ratio"] == pytest.approx(1.5 / 1.3)
    assert (middle["detection"], middle["distillation"]) == pytest.approx((0.6, 0.6))
    assert (end["detection"], end["distillation"], end["ratio"]) == pytest.approx((0.3, 0.3, 1.0))


def test_loss_windows_of_the_baseline_and_of_an_empty_window(tmp_path):
    write_lines(tmp_path / "metrics.json", [{"iteration": 2, "loss_fcos_cls": 0.7}])
    start, middle, end = diag.loss_windows(tmp_path / "metrics.json", 160, {"loss_hd_cls"})
    assert start["detection"] == pytest.approx(0.7)
    assert start["distillation"] is None and start["ratio"] is None  # no distillation term
    assert middle["detection"] is None and middle["terms"] == {}


def test_curve_gaps_are_differences_at_the_same_iteration():
    run = [{"iter": 2000, "AP": 23.3}, {"iter": 3000, "AP": 30.0}, {"iter": 4000, "AP": 35.7}]
    base = [{"iter": 2000, "AP": 16.0}, {"iter": 4000, "AP": 30.8}]
    gaps = [g["gap"] for g in diag.curve_gaps(run, base)]
    assert gaps[0] == pytest.approx(7.3) and gaps[1] is None and gaps[2] == pytest.approx(4.9)


def test_distillation_losses_are_the_registered_distillers():
    names = diag.distill_loss_names()
    assert {"loss_hd_cls", "loss_hd_reg", "loss_tfd", "loss_pkd", "loss_mgd"} <= names
    assert not names & {"loss_fcos_cls", "loss_cls", "loss_box_reg"}


def harmony(path, proportion, spearman):
    path.mkdir(parents=True)
    path.joinpath("harmony.json").write_text(json.dumps({
        "num_predictions": 100, "harmonious_proportion": proportion,
        "score_iou_spearman": spearman, "mean_score": 0.4, "mean_iou": 0.75}))


def test_report_from_recorded_runs(tmp_path):
    smoke, work = v2.load_protocol(SMOKE), tmp_path / "work"
    runner = v2.Runner(smoke, work, jobs=1)
    base = v2.calibration_spec(smoke, 100)
    def curve(*aps):  # the smoke's 5 evaluations (the calibration needs 5)
        return [{"iter": 20 * (k + 1), "AP": ap} for k, ap in enumerate(aps)]

    runner._write(base, {**base, "AP": 20.0, "curve": curve(5.0, 10.0, 15.0, 18.0, 20.0)})
    x1, x2 = v2.tune_specs(smoke, 100, ["tbd"])
    runner._write(x1, {**x1, "AP": 22.5, "curve": curve(9.0, 12.0, 15.0, 17.5, 22.5)})
    runner._write(x2, {**x2, "failed": "non-finite loss"})
    runner._write({"split": "tune", "method": "teacher", "multiplier": None, "seed": 0,
                   "iters": 0}, {"AP": 47.7})
    write_lines(work / v2.run_name(base) / "metrics.json",
                [{"iteration": 3, "loss_fcos_cls": 2.0}, {"iteration": 97, "loss_fcos_cls": 1.0}])
    write_lines(work / v2.run_name(x1) / "metrics.json",
                [{"iteration": 3, "loss_fcos_cls": 2.0, "loss_hd_cls": 3.0},
                 {"iteration": 97, "loss_fcos_cls": 0.5, "loss_hd_cls": 0.25}])
    harmony(work / "diag_teacher_h", 0.18, 0.63)
    harmony(work / f"diag_{v2.run_name(base)}_h", 0.17, 0.59)
    harmony(work / f"diag_{v2.run_name(x1)}_h", 0.225, 0.56)

    diag.main(["--protocol", str(SMOKE), "--work-dir", str(work), "--output", str(tmp_path)])
    md = (tmp_path / "diagnostics.md").read_text()
    assert "| run | 20 | 40 | 60 | 80 | 100 |" in md
    assert "| baseline | 5.0 | 10.0 | 15.0 | 18.0 | 20.0 |" in md
    assert "| tbd x1 | 9.0 (+4.0) | 12.0 (+2.0) | 15.0 (+0.0) | 17.5 (-0.5) | 22.5 (+2.5) |" in md
    # the end window of 100 iterations is [93.75, 100): iteration 97, ratio 0.25 / 0.5
    assert "| tbd x1 | end (94-100) | 0.500 | 0.250 | 0.50 | loss_hd_cls 0.250 |" in md
    assert "| baseline | start (0-7) | 2.000 | - | - | - |" in md
    assert "| teacher | 47.7 | 100 | 18.0 | 0.630 | 0.400 | 0.750 |" in md
    assert "| tbd x1 | 22.5 | 100 | 22.5 | 0.560 |" in md
    assert "`tune_tbd_x2_s100_i100` (non-finite loss)" in md
    payload = json.loads((tmp_path / "diagnostics.json").read_text())
    assert payload["protocol_sha256"] == smoke["sha256"] and payload["iters"] == 100
    assert [r["run"] for r in payload["runs"]] == [v2.run_name(base), v2.run_name(x1)]

    # a fresh clone: the run jsons come back from the results, the run folders do not; the
    # entries diagnosed before are kept, saying when they were computed
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for f in work.glob("*.json"):
        (fresh / f.name).write_text(f.read_text())
    harmony(fresh / "diag_teacher_h", 0.18, 0.63)
    diag.main(["--protocol", str(SMOKE), "--work-dir", str(fresh), "--output", str(tmp_path)])
    again = json.loads((tmp_path / "diagnostics.json").read_text())
    stamp = {"date": payload["date"], "commit": payload["commit"]}
    assert again["runs"] == [{**r, "computed": stamp} for r in payload["runs"]]
    assert f"`{v2.run_name(x1)}` ({payload['date']}, commit" in \
        (tmp_path / "diagnostics.md").read_text()
    # ... only from diagnostics of this very protocol file
    (tmp_path / "diagnostics.json").write_text(json.dumps({**payload, "protocol_sha256": "0"}))
    with pytest.raises(SystemExit, match="tune_baseline_s100_i100/metrics.json: missing"):
        diag.main(["--protocol", str(SMOKE), "--work-dir", str(fresh), "--output", str(tmp_path)])


def test_refused_before_a_calibration_or_without_a_work_dir(tmp_path):
    with pytest.raises(SystemExit, match="--work-dir .*no such folder"):
        diag.main(["--protocol", str(SMOKE), "--work-dir", str(tmp_path / "none"),
                   "--output", str(tmp_path / "res")])
    with pytest.raises(SystemExit, match="no calibrated schedule"):
        diag.main(["--protocol", str(SMOKE), "--work-dir", str(tmp_path),
                   "--output", str(tmp_path / "res")])
    assert not (tmp_path / "res").exists()  # nothing written


def test_a_recorded_run_without_its_folder_is_refused_naming_the_file(tmp_path):
    smoke = v2.load_protocol(SMOKE)
    runner = v2.Runner(smoke, tmp_path, jobs=1)
    base = v2.calibration_spec(smoke, 100)
    runner._write(base, {**base, "AP": 20.0, "curve": [{"iter": 20 * (k + 1), "AP": 5.0 * k}
                                                     for k in range(5)]})
    with pytest.raises(SystemExit, match="tune_baseline_s100_i100/metrics.json: missing"):
        diag.main(["--protocol", str(SMOKE), "--work-dir", str(tmp_path), "--no-harmony",
                   "--output", str(tmp_path / "res")])
    assert not (tmp_path / "res").exists()


def test_a_restored_run_never_diagnosed_keeps_its_curve_alone(tmp_path):
    """A row restored from committed results (its folder never was in this work dir, and no
    earlier diagnostics have it): its recorded curve against the baseline's, nothing else."""
    smoke, work = v2.load_protocol(SMOKE), tmp_path / "work"
    runner = v2.Runner(smoke, work, jobs=1)
    base = v2.calibration_spec(smoke, 100)
    runner._write(base, {**base, "AP": 20.0,
                         "curve": [{"iter": 20 * (k + 1), "AP": 5.0 * k} for k in range(5)]})
    write_lines(work / v2.run_name(base) / "metrics.json",
                [{"iteration": 3, "loss_fcos_cls": 2.0}, {"iteration": 97, "loss_fcos_cls": 1.0}])
    x1 = v2.tune_specs(smoke, 100, ["tbd"])[0]
    runner._write(x1, {**x1, "AP": 21.0, "restored_from": "results.json",
                       "curve": [{"iter": 20 * (k + 1), "AP": 5.0 * k + 1.0} for k in range(5)]})
    diag.main(["--protocol", str(SMOKE), "--work-dir", str(work), "--no-harmony",
               "--output", str(tmp_path / "res")])
    md = (tmp_path / "res" / "diagnostics.md").read_text()
    assert "| tbd x1 | 1.0 (+1.0) | 6.0 (+1.0) | 11.0 (+1.0) | 16.0 (+1.0) | 21.0 (+1.0) |" in md
    assert "| tbd x1 | start" not in md  # no loss windows without its metrics.json
    assert "Curve only (restored from committed results" in md and "`tune_tbd_x1_s100_i100`" in md
    entry = json.loads((tmp_path / "res" / "diagnostics.json").read_text())["runs"][1]
    assert entry["curve_only"] == "results.json" and entry["loss_windows"] is None
