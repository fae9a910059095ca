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
