"""Seeded training steps of a tiny teacher/student pair, per distiller: the refactor's witness.

``python -m tests.golden.record`` (from the repository root) writes ``tests/golden/losses.json``
with the loss values of a few SGD steps for each distiller and the commit they came from;
``tests/test_golden.py`` replays the same steps (``--print``: the values as JSON on stdout, nothing
written) in a fresh process and compares them, within what another CPU's float32 kernels
change (see there). Weights are set from each parameter's name, not from the construction order,
so that moving code (which changes the order in which modules draw from the RNG) does not change
the numbers; only a change of what the losses compute does.
"""

from __future__ import annotations

import json
import subprocess
import zlib
from pathlib import Path

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from ..conftest import make_batch, tiny_distill_cfg

OUT = Path(__file__).resolve().parent / "losses.json"
# Each distiller alone, TBD (HD + TFD), and distillation off (stock RetinaNet losses).
CASES = {"HD": ["HD"], "TFD": ["TFD"], "TBD": ["HD", "TFD"], "FRS": ["FRS"], "FGD": ["FGD"],
         "off": []}
STEPS = 3
LR = 1e-3


def _init_by_name(named: dict[str, torch.Tensor]) -> None:
    """Overwrite every tensor with values drawn from a generator seeded by its name."""
    with torch.no_grad():
        for name, t in sorted(named.items()):
            if not t.is_floating_point():
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            fan_in = t[0].numel() if t.dim() > 1 else 0
            scale = fan_in ** -0.5 if fan_in else 0.05  # keeps activations O(1) at any depth
            values = torch.randn(t.shape, generator=g) * scale
            if "norm" in name and name.endswith("weight"):  # normalisation scales near 1
                values = values + 1.0
            t.copy_(values)


def build(cfg: CfgNode) -> torch.nn.Module:
    model = build_model(cfg)
    _init_by_name(dict(model.named_parameters()))
    teacher = getattr(model, "teacher", None)
    if teacher is not None:
        _init_by_name({f"teacher.{k}": v for k, v in teacher.named_parameters()})
    return model


def run_case(losses: list[str], tmp_dir: Path) -> list[dict[str, float]]:
    """Loss values of STEPS plain SGD steps (no trainer; no warm-up: schedule factor 1)."""
    cfg = tiny_distill_cfg(tmp_dir, losses=tuple(losses))
    torch.manual_seed(0)
    model = build(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    out = []
    for step in range(STEPS):
        batch = make_batch(2, seed=step, empty=(1,) if step == STEPS - 1 else ())
        with EventStorage(step):  # Detectron2's losses log scalars to it
            loss_dict = model(batch)
        total = sum(loss_dict.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        out.append({k: float(v.detach()) for k, v in sorted(loss_dict.items())})
    return out


def record_all(tmp_dir: Path) -> dict:
    return {name: run_case_fixed_executor(losses, tmp_dir) for name, losses in CASES.items()}


def run_case_fixed_executor(losses: list[str], tmp_dir: Path) -> list[dict[str, float]]:
    """``run_case`` with TorchScript's graph optimisation off. Detectron2's scripted focal loss
    otherwise runs another graph from its second call in a process on; with it off from the
    process's start, a case's values do not depend on the cases before it. (Once a graph was
    optimised, turning it off no longer gives those values: hence the fresh process.)"""
    with torch.jit.optimized_execution(False):
        return run_case(losses, tmp_dir)


def main(argv: list[str]) -> None:
    import logging
    import tempfile

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # stdout carries the JSON only
    with tempfile.TemporaryDirectory() as d:
        cases = record_all(Path(d))
    if "--print" in argv:
        print(json.dumps(cases))
        return
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    OUT.write_text(json.dumps({"commit": commit, "steps": STEPS, "cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT} from commit {commit}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
