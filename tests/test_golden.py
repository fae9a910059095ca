"""The loss values of seeded training steps match those recorded before the refactor.

``tests/golden/losses.json`` was written by ``python -m tests.golden.record`` on the commit it
names (the last one before the distillers, the meta-arch and the teacher were moved); the same
steps must give the same values to 1e-6 relative, for every distiller and with distillation off.
"""

import json

import pytest
import torch

from .golden.record import CASES, OUT, run_case_fixed_executor

GOLDEN = json.loads(OUT.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_losses_match_the_recorded_steps(name, tmp_path):
    torch.set_num_threads(1)  # as recorded
    recorded = GOLDEN["cases"][name]
    replayed = run_case_fixed_executor(CASES[name], tmp_path)
    assert len(replayed) == len(recorded) == GOLDEN["steps"]
    for step, (got, want) in enumerate(zip(replayed, recorded)):
        assert sorted(got) == sorted(want), (name, step)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, step, key)
