"""Benchmark helpers: the statistics they report (no timing is asserted anywhere)."""

import json
import os
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tbd_benchmarks import accuracy, accuracy_protocol, accuracy_report, grad_norms, logs, speed
from tbd_benchmarks import teacher_curve as curve
from tbd_tools import model_zoo_table

from .conftest import ROOT

BENCH = ROOT / "projects" / "TBD" / "benchmarks"




def test_bootstrap_ratio_constant_and_noisy():
    ratio, lo, hi = speed.bootstrap_ratio(np.full(10, 3.0), [np.full(10, 1.0), np.full(10, 2.0)])
    assert ratio == lo == hi == 1.0
    rng = np.random.default_rng(0)
    num = 10 + rng.normal(0, 1, 50)
    ratio, lo, hi = speed.bootstrap_ratio(num, [np.full(50, 5.0)])
    assert ratio == pytest.approx(np.median(num) / 5.0)
    assert lo < ratio < hi


def test_run_specs_cover_the_protocol():
    specs = accuracy_protocol.run_specs(accuracy_protocol.PROFILES["cpu"])
    main = [s for s in specs if not s["indicative"]]
    methods = ("baseline", "crosskd", "fgd", "frs", "mgd", "pkd", "tbd")  # tbd.METHODS, in order
    assert accuracy_protocol.MAIN_METHODS == methods
    assert sorted({s["method"] for s in main}) == sorted(methods)
    assert all(len([s for s in main if s["method"] == m]) == 3 for m in ("baseline", "tbd"))
    # seed-major: an interrupted profile already has every method on seed 0
    assert [(s["method"], s["seed"]) for s in main[:8]] == [
        *((m, 0) for m in methods), ("baseline", 1)]
    forms = {s["hs_form"] for s in specs if s["method"] == "tbd"}
    assert forms == {"harmony", "aligned", "consistency"}
    variants = {s["variant"]: s["opts"] for s in specs if s.get("variant")}
    assert variants["tfd_dynamic"] == ["MODEL.DISTILL.TFD.BALANCE_MODE", "dynamic"]
    assert all(s["indicative"] for s in specs if s.get("variant"))
    assert len({accuracy_protocol.run_name(s) for s in specs}) == len(specs)  # unique folders


def _row(method, seed, ap, indicative=False, form=None):
    row = {"method": method, "hs_form": form, "seed": seed, "indicative": indicative}
    row.update({k: ap for k in logs.METRICS})
    row.update(harmonious_proportion=0.5, score_iou_spearman=0.1,
               infer_s_per_image=0.04 + 0.01 * (seed or 0))
    return row


def test_aggregate_and_pooled_std_hand_computed():
    rows = [_row("teacher", None, 40.0), _row("baseline", 0, 10.0), _row("baseline", 1, 12.0),
            _row("baseline", 2, 14.0), _row("tbd", 0, 15.0, form="harmony"),
            _row("tbd", 1, 16.0, form="harmony"), _row("hd", 0, 11.0, True, "harmony")]
    agg = {a["row"]: a for a in accuracy_report.aggregate(rows)}
    assert agg["baseline"]["AP"] == 12.0 and agg["baseline"]["AP_std"] == 2.0
    assert agg["hd"]["AP_std"] is None and agg["hd"]["indicative"]
    # pooled over the main student rows: ((3-1)*4 + (2-1)*0.5) / (2 + 1)
    expected = ((2 * 4.0 + 1 * 0.5) / 3) ** 0.5
    assert accuracy_report.pooled_std(rows) == pytest.approx(expected)
    assert statistics.stdev([15.0, 16.0]) ** 2 == pytest.approx(0.5)
    settings = {"profile": "cpu", "iters": 1, "train": "a", "val": "b"}
    md = accuracy_report.markdown(accuracy_report.aggregate(rows), settings,
                                  accuracy_report.pooled_std(rows))
    assert "| hd* | 1 |" in md and "12.0 ± 2.0" in md
    assert "| infer ms/img |" in md and "| 50 ± 10 |" in md  # 0.04, 0.05, 0.06 s
    cost = {"teacher": {"total": 2.5, "backbone_fpn": 0.8, "head": 1.7},
            "student": {"total": 0.7, "backbone_fpn": 0.6, "head": 0.1}}
    md = accuracy_report.markdown([], {"profile": "cpu", "iters": 1, "train": "a", "val": "b",
                                "gflops_per_image": cost, "jobs": 2}, None)
    assert ("teacher 2.50 GFLOPs (backbone+FPN 0.80, head 1.70), student 0.70 (0.60, 0.10)"
            in md and "one thread, beside another run" in md)
    md = accuracy_report.markdown([], {"profile": "full", "iters": 1, "train": "a", "val": "b",
                                "invocations": 2, "wall_minutes_all_invocations": 90.5}, None)
    assert "Wall time: 90.5 min over 2 invocation(s) of the benchmark, not complete yet." in md


def test_infer_time_is_read_from_the_evaluators_log(tmp_path):
    log = tmp_path / "run.log"
    assert logs.infer_time(log) is None  # no log (a run from before logs were kept)
    log.write_text(
        "[11/26 21:14:37 d2.evaluation.evaluator]: Total inference time: 0:00:28.263081 "
        "(0.057097 s / iter per device, on 1 devices)\n"
        "[11/26 21:14:37 d2.evaluation.evaluator]: Total inference pure compute time: 0:00:26 "
        "(0.053068 s / iter per device, on 1 devices)\n")
    assert logs.infer_time(log) == 0.053068


def test_model_gflops_head_hand_computed():
    from tbd.config import load_config

    config = "projects/TBD/configs/shapes/retinanet_R18_FPN64_student.yaml"
    cfg = load_config(str(ROOT / config))
    cost = accuracy.model_gflops(str(ROOT / config))
    # 128x128 input: P3-P7 at strides 8..128 have 16^2 + 8^2 + 4^2 + 2^2 + 1^2 = 341 positions.
    # Per position, 3x3 convs (multiply-adds, fvcore's unit): NUM_CONVS C->C convs in each of the
    # two subnets, then C -> A*K class logits and C -> A*4 box deltas.
    c, k = cfg.MODEL.FPN.OUT_CHANNELS, cfg.MODEL.RETINANET.NUM_CLASSES
    a = len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0]) * len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])
    assert (c, k, a, cfg.MODEL.RETINANET.NUM_CONVS) == (64, 5, 9, 2)
    head = 341 * 9 * c * (2 * 2 * c + a * k + a * 4) / 1e9
    assert cost["head"] == pytest.approx(head)
    assert cost["total"] == pytest.approx(cost["backbone_fpn"] + cost["head"])


def test_invocations_add_up_across_resumed_runs(tmp_path):
    accuracy.record_invocation(tmp_path, "a", 60.0, 1, "c1")
    accuracy.record_invocation(tmp_path, "b", 30.0, 1, "c2")
    calls = accuracy.record_invocation(tmp_path, "b", 90.0, 2, "c2")  # b finished another run
    assert [(c["started"], c["wall_s"], c["runs_finished"]) for c in calls] == [
        ("a", 60.0, 1), ("b", 90.0, 2)]


def test_student_runs_get_the_benchmark_teacher(tmp_path, monkeypatch):
    cmds = []
    stale = tmp_path / "tbd_harmony_s0" / "metrics.json"
    monkeypatch.setattr(accuracy, "sh", lambda cmd, log: cmds.append((cmd, stale.exists())))
    monkeypatch.setattr(accuracy, "last_eval", lambda path: {"AP": 1.0})
    monkeypatch.setattr(accuracy, "harmony", lambda *a: {})
    args = type("Args", (), {"teacher_config": "t.yaml", "teacher_weights": "t.pth",
                             "opts": ["MODEL.DISTILL.WARMUP_ITERS", "200"]})
    profile = accuracy_protocol.PROFILES["smoke"]
    stale.parent.mkdir()
    stale.write_text("{}")  # left by an interrupted invocation
    for method in ("baseline", "tbd"):
        spec = {"method": method, "hs_form": "harmony" if method == "tbd" else None, "seed": 0,
                "indicative": False}
        assert accuracy.train_student(spec, args, profile, tmp_path)["AP"] == 1.0
    (base, _), (tbd, stale_seen) = cmds
    assert not stale_seen  # the unfinished run was removed before retraining
    assert "MODEL.DISTILL.TEACHER.CONFIG" not in base
    i = tbd.index("MODEL.DISTILL.TEACHER.CONFIG")
    assert tbd[i + 1:i + 4] == ["t.yaml", "MODEL.DISTILL.TEACHER.WEIGHTS", "t.pth"]
    assert tbd[-2:] == ["MODEL.DISTILL.WARMUP_ITERS", "200"]  # --opts: last, so they win
    assert "MODEL.DISTILL.WARMUP_ITERS" not in base


def test_a_variant_runs_chosen_methods_in_its_own_folders(tmp_path):
    specs = accuracy_protocol.run_specs(dict(accuracy_protocol.PROFILES["cpu"], seeds=[0, 1]),
                                        ("tbd",), False)
    assert [accuracy_protocol.run_name(s) for s in specs] == ["tbd_harmony_s0", "tbd_harmony_s1"]
    teacher = tmp_path / "t.pth"
    teacher.write_bytes(b"")
    base = ["--teacher-weights", str(teacher), "--opts", "MODEL.DISTILL.WARMUP_ITERS"]
    for extra in (["200"], ["200", "MODEL.DISTILL.HS.FORM", "--work-dir", "w", "--output", "o"]):
        with pytest.raises(SystemExit, match="KEY VALUE pairs and needs its own --work-dir"):
            accuracy.main(base + extra)  # no folders of its own; an odd number of --opts
    md = accuracy_report.markdown([], {"profile": "cpu", "iters": 1, "train": "a", "val": "b",
                                "extra_opts": ["K", "1"]}, None)
    assert "Every distilled run adds `K 1`." in md
    # a variant that sets the HS form labels its TBD runs by it (and needs --no-ablations)
    opts = ["SOLVER.BASE_LR", "0.1", "MODEL.DISTILL.HS.FORM", "consistency"]
    labelled = accuracy_protocol.label_by_opts(specs, opts)
    assert [accuracy_protocol.run_name(s) for s in labelled] == [
        "tbd_consistency_s0", "tbd_consistency_s1"]
    assert [accuracy_report.label(s) for s in labelled] == ["tbd (consistency HS)"] * 2
    with pytest.raises(SystemExit, match="add --no-ablations"):
        accuracy.main(["--teacher-weights", str(teacher), "--work-dir", "w", "--output", "o",
                       "--opts", *opts])


def test_teacher_curve_lists_checkpoints_in_training_order(tmp_path):
    (tmp_path / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 3000\n")
    for name in ("model_0001999.pth", "model_0000999.pth", "model_final.pth", "other.pth"):
        (tmp_path / name).write_bytes(b"")
    assert [(i, p.name) for i, p in curve.checkpoints(tmp_path)] == [
        (1000, "model_0000999.pth"), (2000, "model_0001999.pth"), (3000, "model_final.pth")]
    (tmp_path / "model_0002999.pth").write_bytes(b"")  # final == the last periodic checkpoint
    assert [i for i, _ in curve.checkpoints(tmp_path)] == [1000, 2000, 3000]
    row = {"run": "r", "iters": 1000, "AP": 1.25, "AP50": 2.0, "AP75": None, "APs": 0.0,
           "APm": 3.0}
    assert "| r | 1000 | 1.2 | 2.0 | n/a | 0.0 | 3.0 |" in curve.markdown([row], "val")


def test_work_dir_of_another_teacher_is_refused(tmp_path):
    (tmp_path / "teacher.json").write_text(json.dumps(
        {"AP": 4.8, "teacher_config": "a.yaml", "teacher_weights": "a.pth"}))
    args = type("Args", (), {"teacher_config": "a.yaml", "teacher_weights": "a.pth"})
    assert accuracy.teacher_row(args, accuracy_protocol.PROFILES["smoke"], tmp_path)["AP"] == 4.8
    args.teacher_weights = "b.pth"
    with pytest.raises(SystemExit, match="Give another --work-dir"):
        accuracy.teacher_row(args, accuracy_protocol.PROFILES["smoke"], tmp_path)


def test_model_zoo_table_names_the_benchmarks_teacher():
    shapes = "projects/TBD/configs/shapes"
    new = {"teacher_config": f"{shapes}/retinanet_R18_FPN256_teacher.yaml"}
    assert model_zoo_table.teacher_of(new) == ("R18-FPN256", new["teacher_config"], 9000)
    # results from before accuracy.py recorded its teacher: the R34-FPN128 teacher
    assert model_zoo_table.teacher_of({}) == (
        "R34-FPN128", f"{shapes}/retinanet_R34_FPN128_teacher.yaml", 3000)


def test_model_zoo_table_refuses_speed_of_another_teacher():
    r18 = {"teacher_config": "projects/TBD/configs/shapes/retinanet_R18_FPN256_teacher.yaml"}
    model_zoo_table.check_same_teacher(r18, dict(r18), "speed.json")
    model_zoo_table.check_same_teacher({}, {}, "speed.json")  # both from before the key: R34
    with pytest.raises(SystemExit, match="speed.py --teacher-config .*R18_FPN256"):
        model_zoo_table.check_same_teacher(r18, {}, "speed.json")


def _fake_benchmark(monkeypatch, fake_train, written: list) -> None:
    """accuracy.main without training, teacher, FLOP count or plots; results.md goes to written."""
    monkeypatch.setattr(accuracy, "train_student", fake_train)
    monkeypatch.setattr(accuracy, "teacher_row", lambda *a: {
        "method": "teacher", "hs_form": None, "seed": None, "indicative": False, "AP": 40.0})
    monkeypatch.setattr(accuracy, "model_gflops",
                        lambda config: {"total": 1.0, "backbone_fpn": 0.5, "head": 0.5})
    monkeypatch.setattr(accuracy, "plot", lambda agg, path: None)
    monkeypatch.setattr(accuracy, "write_results",
                        lambda out, name, settings, rows, md, commit: written.append(md))


def test_a_resumed_profile_reports_its_finished_runs_first(tmp_path, monkeypatch):
    calls, written = [], []

    def fake_train(spec, args, profile, runs):
        calls.append(accuracy_protocol.run_name(spec))
        return {**spec, "AP": 1.0}

    _fake_benchmark(monkeypatch, fake_train, written)
    (tmp_path / "tbd_harmony_s1.json").write_text("{}")  # finished by an earlier invocation
    teacher = tmp_path / "t.pth"
    teacher.write_bytes(b"")
    accuracy.main(["--teacher-weights", str(teacher), "--profile", "smoke", "--seeds", "0", "1",
                   "--methods", "baseline", "tbd", "--no-ablations", "--work-dir",
                   str(tmp_path), "--output", str(tmp_path / "out")])
    assert calls == ["tbd_harmony_s1", "baseline_s0", "tbd_harmony_s0", "baseline_s1"]
    assert "| tbd | 1 |" in written[0]  # the first results.md already has the finished run
    assert "not complete yet" in written[0] and "not complete yet" not in written[-1]


def test_a_diverged_run_is_a_result_and_other_failures_stop(tmp_path, monkeypatch):
    def sh(cmd, log):
        log.write_text("...\nFloatingPointError: Loss became infinite or NaN at iteration=7!\n"
                       if "1" in cmd[cmd.index("SEED") + 1] else "...\nKeyError: 'MODEL.X'\n")
        raise RuntimeError("failed (1)")

    monkeypatch.setattr(accuracy, "sh", sh)
    args = type("Args", (), {"teacher_config": "t.yaml", "teacher_weights": "t.pth", "opts": []})
    spec = {"method": "tbd", "hs_form": "harmony", "seed": 1, "indicative": False}
    row = accuracy.train_student(spec, args, accuracy_protocol.PROFILES["smoke"], tmp_path)
    assert row["failed"] == "Loss became infinite or NaN at iteration=7!"
    assert json.loads((tmp_path / "tbd_harmony_s1.json").read_text())["failed"] == row["failed"]
    with pytest.raises(RuntimeError, match="failed"):  # not a divergence: nothing recorded
        accuracy.train_student(dict(spec, seed=0), args, accuracy_protocol.PROFILES["smoke"],
                               tmp_path)
    assert not (tmp_path / "tbd_harmony_s0.json").exists()
    # the diverged seed is counted, listed and left out of the mean and the pooled spread
    rows = [_row("tbd", 0, 15.0, form="harmony"), _row("tbd", 2, 17.0, form="harmony"), row,
            _row("baseline", 0, 10.0), _row("baseline", 1, 12.0)]
    agg = {a["row"]: a for a in accuracy_report.aggregate(rows)}
    assert agg["tbd"]["n_seeds"] == 2 and agg["tbd"]["AP"] == 16.0
    assert accuracy_report.pooled_std(rows) == pytest.approx(2.0 ** 0.5)  # both variances are 2
    md = accuracy_report.markdown(list(agg.values()), {"profile": "cpu", "iters": 1, "train": "a",
                                                "val": "b"}, None)
    assert "| tbd | 2 (+1 failed) | 16.0 ± 1.4 |" in md
    assert "- tbd, seed 1: Loss became infinite or NaN at iteration=7!" in md


def test_a_failed_run_stops_the_benchmark_after_recording_the_others(tmp_path, monkeypatch):
    written = []

    def fake_train(spec, args, profile, runs):
        if spec["method"] == "frs":
            raise RuntimeError("train_net.py failed (-9)")
        return {**spec, "AP": 1.0}

    _fake_benchmark(monkeypatch, fake_train, written)
    teacher = tmp_path / "t.pth"
    teacher.write_bytes(b"")
    with pytest.raises(RuntimeError, match="1 run\\(s\\) failed: frs_s0"):
        accuracy.main(["--teacher-weights", str(teacher), "--profile", "smoke", "--seeds", "0",
                       "--methods", "baseline", "frs", "tbd", "--no-ablations", "--work-dir",
                       str(tmp_path), "--output", str(tmp_path / "out")])
    assert "| baseline | 1 |" in written[-1]  # recorded before the failure stopped it
    # (tbd_harmony_s0 is cancelled or, if the worker had already started it, recorded)
    assert json.loads((tmp_path / "invocations.json").read_text())[-1]["runs_finished"] >= 1


def test_a_dotted_run_name_keeps_its_whole_name_in_its_log(tmp_path, monkeypatch):
    logs = []

    def sh(cmd, log):  # analyze_harmony.py, faked: its log path and its harmony.json
        logs.append(log)
        out = Path(cmd[cmd.index("--output") + 1])
        out.mkdir()
        (out / "harmony.json").write_text('{"harmonious_proportion": 0.1, '
                                          '"score_iou_spearman": 0.5}')

    monkeypatch.setattr(accuracy, "sh", sh)
    name = accuracy_protocol.run_name({"method": "tbd", "hs_form": "harmony", "variant": "hd_bg0.5",
                              "seed": 0})
    res = accuracy.harmony("c.yaml", "w.pth", "val", tmp_path / f"{name}_h", [])
    assert res == {"harmonious_proportion": 0.1, "score_iou_spearman": 0.5}
    assert logs == [tmp_path / "tbd_hd_bg0.5_s0_h.log"]  # not tbd_hd_bg0.log


def test_grad_norms_logs_each_step_before_it_then_stops(tmp_path):
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([a, b], lr=1.0)
    path = tmp_path / "norms.jsonl"
    with open(path, "w") as out:
        opt = grad_norms.logging_optimizer(opt, {id(a): "a", id(b): "b"}, out, iters=1)
        a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0, 12.0])
        opt.step()  # logged, then applied
        assert b.tolist() == [0.0, 0.0, -12.0]
        with pytest.raises(grad_norms._Stop):
            opt.step()  # the step after the last one to log: logged, not applied
    assert b.tolist() == [0.0, 0.0, -12.0]
    first = json.loads(path.read_text().splitlines()[0])
    assert first["total"] == pytest.approx(13.0)  # sqrt(5^2 + 12^2)
    assert first["top"] == [[12.0, "b"], [5.0, "a"]] and first["median"] == 8.5
    assert len(path.read_text().splitlines()) == 2


def test_grad_norms_runs_train_net_for_the_steps_asked(tmp_path, tiny_datasets):
    from .conftest import tiny_distill_cfg, write_cfg

    cfg = tiny_distill_cfg(tmp_path)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (tiny_datasets[0],), (tiny_datasets[1],)
    cfg.SOLVER.MAX_ITER, cfg.OUTPUT_DIR = 10, str(tmp_path / "out")
    path = tmp_path / "logs" / "norms.jsonl"  # its folder is created
    assert grad_norms.main(["--iters", "2", "--output", str(path), "--",
                            "--config-file", write_cfg(cfg, tmp_path / "cfg.yaml")]) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["it"] for r in rows] == [0, 1]
    for r in rows:  # the student's parameters only (the teacher is frozen), largest first
        norms = [n for n, _ in r["top"]]
        assert norms == sorted(norms, reverse=True) and r["median"] <= norms[0] <= r["total"]
        assert all(name.split(".")[0] in ("backbone", "head", "distillers") for _, name in r["top"])
    assert not (tmp_path / "out" / "model_final.pth").exists()  # stopped, nothing saved
    # the project's trainer is left as it was: later trainings in this process log nothing
    from tbd.engine import DistillTrainer

    assert "build_optimizer" not in vars(DistillTrainer)


def test_the_recorded_thread_count_is_the_one_runs_get(monkeypatch):
    monkeypatch.setattr(accuracy, "THREADS", {})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert accuracy.threads_per_run(8) == 8  # torch's default
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # inherited by the runs
    assert accuracy.threads_per_run(8) == 2
    monkeypatch.setattr(accuracy, "THREADS", {"OMP_NUM_THREADS": "1"})  # --jobs > 1
    assert accuracy.threads_per_run(8) == 1


def test_grad_norms_summary_finds_the_spikes(tmp_path):
    path = tmp_path / "run.jsonl"
    rows = [(0, 2.0, 1.0, "a"), (1, 40.0, 30.0, "head.b"), (2, 3.0, 2.0, "a"),
            (3, 15.0, 11.0, "c")]
    path.write_text("".join(json.dumps({"it": i, "total": t, "median": 0.1, "top": [[n, name]]})
                            + "\n" for i, t, n, name in rows))
    table = grad_norms.summary([str(path)], spike=10.0)
    # largest: 30 at step 1; above 10: steps 1 and 3; median of totals (2, 3, 15, 40): 9
    assert table.splitlines()[-1] == "| run.jsonl | 4 | 30.0 (1, `head.b`) | 2: 1, 3 | 9.00 |"


@pytest.mark.parametrize("stages,expected", [
    (None, ["speed.py --device cuda --coco --batch 8 --output",
            "amp_check.py", "accuracy.py",
            "speed.py --device cuda --coco --batch 8 --amp --amp-dtype bf16"]),
    ("accuracy", ["accuracy.py"]),
])
def test_gpu_checks_runs_the_stages_asked(tmp_path, stages, expected):
    # stub python3 and nvidia-smi: records each python3 call, so no GPU or dataset is needed
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    calls = tmp_path / "calls.txt"
    for name in ("python3", "nvidia-smi"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "JOBS": "3"}
    if stages:
        env["STAGES"] = stages
    else:
        env.pop("STAGES", None)
    subprocess.run(["bash", str(BENCH / "gpu_checks.sh"), "teacher.pth", "abc", str(out)],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    scripts = [c for c in calls.read_text().splitlines() if "benchmarks/" in c]
    assert len(scripts) == len(expected)
    for call, part in zip(scripts, expected):
        assert part in call
    accuracy_call = next(c for c in scripts if "accuracy.py" in c)
    assert "--profile gpu --jobs 3" in accuracy_call
    assert "--teacher-weights teacher.pth" in accuracy_call
    copied = sorted(p.name for p in out.iterdir())  # results only, named by stage
    assert all(n.startswith(("speed_", "amp_", "accuracy_")) for n in copied), copied


def test_speed_amp_dtype_is_the_one_asked_or_the_devices_default():
    assert speed.amp_dtype("cuda", None) == "fp16"
    assert speed.amp_dtype("cpu", None) == "bf16"
    assert speed.amp_dtype("cuda", "bf16") == "bf16"
    args = speed.parse_args(["--device", "cuda", "--amp", "--amp-dtype", "bf16"])
    assert speed.precision(args) == "AMP bf16"
    assert speed.precision(speed.parse_args(["--device", "cuda:0", "--amp"])) == "AMP fp16"
    assert speed.precision(speed.parse_args(["--amp-dtype", "bf16"])) == "fp32"


def test_speed_report_hand_computed_with_and_without_memory(tmp_path):
    args = speed.parse_args(["--output", str(tmp_path), "--reps", "2"])
    args.size = [128, 128]
    variants = speed.STEP_VARIANTS + speed.INFER_VARIANTS
    t = {v: np.full(2, 1.0) for v in variants}
    t["tbd_step"] = np.full(2, 3.0)  # 3 / (1 + 1)
    speed.report(args, variants, t, {"tbd.distill.HD": 0.1}, {}, memory="pending")
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["settings"]["memory"] == "pending"
    assert "not measured yet" in (tmp_path / "results.md").read_text()
    tbd = next(r for r in res["rows"] if r.get("method") == "tbd")
    assert tbd["step_over_floor"] == pytest.approx(1.5) and tbd["mem_over_floor"] is None
    mem = {v: 10.0 for v in variants} | {"teacher_forward": 5.0, "tbd_step": 18.0}
    speed.report(args, variants, t, {"tbd.distill.HD": 0.1}, mem, memory="measured")
    res = json.loads((tmp_path / "results.json").read_text())
    tbd = next(r for r in res["rows"] if r.get("method") == "tbd")
    assert tbd["mem_over_floor"] == pytest.approx(18 / 15)  # 18 / (10 + 5)
    assert "not measured yet" not in (tmp_path / "results.md").read_text()


def test_speed_writes_timings_before_the_memory_stage(tmp_path, monkeypatch):
    class FakeRunner:  # no models: each variant "takes" 1 ms, the TBD step 3
        def __init__(self, args, variants):
            pass

        def timed(self, variant):
            return 3.0 if variant == "tbd_step" else 1.0

    def memory_stage_stopped(args, variants):
        raise RuntimeError("time limit")

    monkeypatch.setattr(speed, "Runner", FakeRunner)
    monkeypatch.setattr(speed, "profile_shares", lambda runner: {})
    monkeypatch.setattr(speed, "measure_memory", memory_stage_stopped)
    with pytest.raises(RuntimeError, match="time limit"):
        speed.main(["--output", str(tmp_path), "--reps", "2", "--warmup", "0"])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["settings"]["memory"] == "pending"
    tbd = next(r for r in res["rows"] if r.get("method") == "tbd")
    assert tbd["step_over_floor"] == pytest.approx(1.5)  # 3 / (1 + 1)


def test_fcos_indicative_statistics_by_hand():
    """Paired differences 2, 3, 4: mean 3, sd 1, t(0.975, 2) = 4.3027 -> 3 +- 2.4841; 0 failures
    of 3: Clopper-Pearson upper bound 1 - 0.025**(1/3) = 0.7076."""
    from tbd_benchmarks import fcos_indicative as f

    p = f.paired([3.0, 4.0, 5.0], [1.0, 1.0, 1.0])
    assert p["mean"] == 3.0
    assert p["ci95"] == pytest.approx([3 - 2.48414, 3 + 2.48414], abs=1e-4)
    assert f.failure_interval(0, 3) == pytest.approx([0.0, 1 - 0.025 ** (1 / 3)], abs=1e-9)
    rows = [{"method": m, "seed": s, "AP": ap, "status": "ok" if ap >= 1 else "failed"}
            for m, aps in (("baseline", [2.0, 3.0, 0.5]), ("TBD", [5.0, 6.0, 4.0]),
                           ("FGD", [3.0, 3.5, 2.0])) for s, ap in enumerate(aps)]
    summary = f.summarise(rows, ["baseline", "TBD", "FGD"], [0, 1, 2])
    base = summary["methods"]["baseline"]
    assert base["failures"] == 1 and base["mean"] == pytest.approx(11 / 6)
    assert base["mean_without_failures"] == pytest.approx(2.5)
    assert summary["paired"]["TBD - baseline"]["mean"] == pytest.approx((3 + 3 + 3.5) / 3)
    assert summary["paired"]["TBD - FGD"]["mean"] == pytest.approx((2 + 2.5 + 2) / 3)
