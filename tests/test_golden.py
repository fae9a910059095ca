"""The loss values of seeded training steps match those recorded before the refactor.

``tests/golden/losses.json`` was written by ``python -m tests.golden.record`` on the commit it
names (the last one before the distillers, the meta-arch and the teacher were moved); the same
steps, replayed in a fresh process as recorded, must give the same values to 1e-6 relative, for
every distiller and with distillation off.
"""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT
from .golden.record import CASES, OUT

GOLDEN = json.loads(OUT.read_text())


@pytest.fixture(scope="module")
def replayed() -> dict:
    out = subprocess.run([sys.executable, "-m", "tests.golden.record", "--print"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CASES))
def test_losses_match_the_recorded_steps(name, replayed):
    recorded = GOLDEN["cases"][name]
    assert len(replayed[name]) == len(recorded) == GOLDEN["steps"]
    for step, (got, want) in enumerate(zip(replayed[name], recorded)):
        assert sorted(got) == sorted(want), (name, step)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, step, key)
