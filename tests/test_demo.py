"""The demo: its shipped teacher and its quick mode, end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tbd.checkpoint.io import sha256_file
from tbd_tools import demo

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_teacher_matches_its_sha256_and_size_limit():
    weights = demo.TEACHER_DIR / "model_final.pth"
    assert weights.stat().st_size <= 10 * 10**6
    assert demo.check_teacher_file(weights) == (demo.TEACHER_DIR / "SHA256").read_text().strip()


def test_a_damaged_teacher_is_refused_with_the_command_to_recreate_it(tmp_path):
    shutil.copy(demo.TEACHER_DIR / "SHA256", tmp_path / "SHA256")
    weights = tmp_path / "model_final.pth"
    weights.write_bytes((demo.TEACHER_DIR / "model_final.pth").read_bytes()[:-10])
    with pytest.raises(SystemExit, match="make_demo_teacher.py") as err:
        demo.check_teacher_file(weights)
    assert sha256_file(weights) in str(err.value)


def test_quick_mode_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "TBD_DATASETS": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "projects/TBD/tools/demo.py", "--quick", "--output",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in res["rows"]] == ["teacher", "baseline student", "TBD student"]
    assert all(r["AP"] is None or 0 <= r["AP"] <= 100 for r in res["rows"])
    # the shipped teacher, evaluated in this run, scores what its training recorded
    curve = json.loads((demo.TEACHER_DIR / "curve.json").read_text())["evaluations"]
    assert res["rows"][0]["AP"] == pytest.approx(curve[-1]["bbox/AP"], abs=0.05)
    assert (out / "demo.png").stat().st_size > 10_000
    assert "Quick mode" in proc.stdout and "| TBD student | 20 |" in proc.stdout
    check = json.loads((out / "tbd" / "teacher_check.json").read_text())
    assert check["dataset"] == "tbd_demo_test"
    assert check["bbox"]["AP"] == pytest.approx(curve[-1]["bbox/AP"], abs=0.05)


def test_make_demo_teacher_packages_a_finished_run_of_any_teacher_config(tmp_path):
    """--skip-training: the weights alone (no optimizer state), their sha256, and the run's
    evaluations as the curve, under the config given (here the benchmark's longer teacher)."""
    import torch

    from tbd_tools import make_demo_teacher

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {"w": torch.ones(2, 3).t()}, "optimizer": {"state": 1}},
               run / "model_final.pth")
    (run / "metrics.json").write_text("\n".join(json.dumps(r) for r in [
        {"iteration": 1999, "bbox/AP": 30.0}, {"iteration": 3999, "total_loss": 1.0},
        {"iteration": 3999, "bbox/AP": 40.0}]))
    config = "projects/TBD/configs/demo/fcos_R50w16_FPN64_teacher_16k.yaml"
    out = tmp_path / "teacher"
    assert make_demo_teacher.main(["--skip-training", "--config", config, "--run-dir", str(run),
                                   "--output", str(out)]) == 0
    saved = torch.load(out / "model_final.pth", weights_only=True)
    assert list(saved) == ["model"] and saved["model"]["w"].is_contiguous()
    assert (out / "SHA256").read_text().strip() == sha256_file(out / "model_final.pth")
    curve = json.loads((out / "curve.json").read_text())
    assert curve["config"] == config
    assert [(e["iteration"], e["bbox/AP"]) for e in curve["evaluations"]] == [(2000, 30.0),
                                                                             (4000, 40.0)]
